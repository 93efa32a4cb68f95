"""``deeparch-bench compare A.json B.json``: two result files side by side. Rows are matched on
(section, op, case, dtype, memory format, form, provider); the ratio is B's median time over A's
(< 1: B is faster). Rows present in only one file are counted, not shown."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from .report import _f, geomean, table
from .schema import validate


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a result file ({e})") from None
    if errors := validate(data):
        raise ValueError(f"{path}: not a valid deeparch-bench result: " + "; ".join(errors[:5]))
    return data


def row_key(r: dict) -> Tuple:
    return (r["section"], r["op"], r["case"], r["dtype"], r["memory_format"], r.get("form"), r["provider"])


def compare(a: dict, b: dict, *, markdown: bool = False) -> str:
    ra, rb = ({row_key(r): r for r in x["timings"] if r.get("median_ms")} for x in (a, b))
    common = [k for k in ra if k in rb]
    body: List[List[str]] = []
    per_provider: Dict[str, List[float]] = {}
    for k in common:
        ta, tb = ra[k]["median_ms"], rb[k]["median_ms"]
        per_provider.setdefault(k[6], []).append(ratio := tb / ta)
        body.append([k[1], k[2] + (f" {k[5]}" if k[5] else ""), k[3], k[6], f"{ta:.4g}", f"{tb:.4g}",
                     f"{ratio:.3f}", _f(ra[k].get("speedup_vs_eager"), ".2f"), _f(rb[k].get("speedup_vs_eager"), ".2f")])
    lines = [f"{n}: {r['env']['device_name']} ({r['env']['device']}), torch {r['env']['torch']}, commit "
             f"{(r['env'].get('git') or {}).get('commit') or '?'}, {r['created']}" for n, r in (("A", a), ("B", b))]
    if a["env"]["device_name"] != b["env"]["device_name"]:
        lines.append("warning: different devices; absolute times do not compare, speedups (vs eager) do")
    lines.append(f"{len(common)} rows in both; {len(ra) - len(common)} only in A, {len(rb) - len(common)} only in B")
    if body:
        lines.append(table(["op", "case", "dtype", "provider", "A ms", "B ms", "B/A", "A vs eager", "B vs eager"],
                           body, markdown=markdown, right=(4, 5, 6, 7, 8)))
        summ = [[p, str(len(v)), f"{geomean(v):.3f}", f"{min(v):.3f}", f"{max(v):.3f}"]
                for p, v in per_provider.items()]
        lines.append(table(["provider", "rows", "geomean B/A", "min", "max"], summ, markdown=markdown,
                           right=(1, 2, 3, 4)))
    return ("\n\n" if markdown else "\n").join(lines) + "\n"
