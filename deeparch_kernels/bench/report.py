"""Readable output of a result: the console table, the markdown file, the file names.

Speedups are baseline_ms / ms: above 1 means faster than eager (or torch.compile)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..testing import STATUSES
from .specs import FAMILY, SPECS

LAYOUT = {"channels_last": "CL", "contiguous": "NCHW"}
TIMING_NOTE = ("\n\nTimes in ms (median, p20-p80); speedup = baseline ms / ms (> 1: faster); %roof = achieved "
               "GB/s over the measured streaming bandwidth (add+ReLU; bytes counted per form, see roofline.py; "
               "none for cache-resident cases) or TFLOP/s over the measured matmul rate (conv).")


def _f(v, fmt: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return none
    return format(v, fmt)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False,
          right: Iterable[int] = ()) -> str:
    right = set(right)
    if markdown:
        rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"
        return "\n".join(["| " + " | ".join(headers) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def groups(rows: Sequence[dict]) -> Dict[Tuple, List[dict]]:
    """Rows by (section, op family, case, dtype, memory format, form)."""
    out: Dict[Tuple, List[dict]] = {}
    for r in rows:
        key = (r["section"], FAMILY[r["op"]].name if r["op"] in FAMILY else r["op"], r["case"], r["dtype"],
               r["memory_format"], r.get("form"))
        out.setdefault(key, []).append(r)
    return out


def _x(v) -> str:
    return _f(v, ".2f") + ("x" if v else "")


def _section(title: str, text: str, markdown: bool) -> str:
    return (f"### {title}\n\n" if markdown else f"== {title} ==\n") + text


NAN_KEPT = {True: "kept", False: "LOST"}  # a model row's nan_kept: NaN in, NaN out where eager has it


def _timing_table(rows: Sequence[dict], rate: Tuple[str, str, str], markdown: bool) -> str:
    """A row per provider, the case's lead cells on its first row only; ``rate``: (header, key,
    format) of the rate column."""
    model = rows[0]["section"] == "model"
    body = []
    for grp in groups(rows).values():
        for j, r in enumerate(grp):
            lead = [r["case"], f"{r['shape'][0]} {r['dtype']}", r["form"]] if model else [
                r["case"] + (f" {r['form']}" if r.get("form") else ""),
                f"{r['dtype']} {LAYOUT.get(r['memory_format'], r['memory_format'])}"]
            timed = [f"{r['median_ms']:.4g}", f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"] if r.get("median_ms") \
                else [r["status"], ""]
            pct = [] if model else [_f(r.get("roofline_pct"), ".0f")]
            errs = [_f(r.get("max_rel_err"), ".1e"), NAN_KEPT.get(r.get("nan_kept"), "")] if model else []
            body.append([c if j == 0 else "" for c in lead]
                        + [r["provider"], *timed, _f(r.get(rate[1]), rate[2]), *pct,
                           _x(r.get("speedup_vs_eager")), _x(r.get("speedup_vs_compile")), *errs]
                        + [(f"compile {r['compile_s']:.1f} s " if r.get("compile_s") else "") + (r.get("note") or "")])
    head = (["model", "batch", "form"] if model else ["case", "dtype"]) + ["provider", "ms", "p20-p80", rate[0]] \
        + ([] if model else ["%roof"]) + ["vs eager", "vs compile"] + (["err vs tv", "NaN"] if model else []) + ["note"]
    first = head.index("ms")
    return table(head, body, markdown=markdown, right=range(first, len(head) - 1))


def timing_tables(rows: Sequence[dict], *, markdown: bool = False) -> List[str]:
    """One table per op family (specs.py), then one of the whole models."""
    out = []
    for spec in [*SPECS.values(), None]:
        part = [r for r in rows if (r["section"] == "model" if spec is None else
                                    r["section"] == "op" and r["op"] in spec.ops)]
        if part:
            title, rate = (spec.title, (*spec.rate, ".3g")) if spec else (
                "whole models (inference)", ("img/s", "images_per_s", ".4g"))
            out.append(_section(title, _timing_table(part, rate, markdown), markdown))
    return out


def geomean(vals: Sequence[float]) -> Optional[float]:
    vals = [v for v in vals if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def summary_table(rows: Sequence[dict], *, markdown: bool = False) -> Optional[str]:
    """Per op and our provider: geometric-mean speedup vs eager and vs compile, min-max range."""
    seen: Dict[Tuple, List[dict]] = {}
    for r in rows:
        if r["kind"] == "ours" and r.get("median_ms"):
            seen.setdefault((r["op"], r["provider"], r["dtype"]), []).append(r)

    def spread(vals):
        return f"{geomean(vals):.2f}x ({min(vals):.2f}-{max(vals):.2f})" if vals else "-"

    body = [[*key, str(len(rs)), spread([r["speedup_vs_eager"] for r in rs if r.get("speedup_vs_eager")]),
             spread([r["speedup_vs_compile"] for r in rs if r.get("speedup_vs_compile")])] for key, rs in seen.items()]
    head = ["op", "ours", "dtype", "cases", "vs eager: geomean (min-max)", "vs compile: geomean (min-max)"]
    return _section("summary: our backends vs eager and torch.compile (speedup, >1 = faster)",
                    table(head, body, markdown=markdown, right=(3, 4, 5)), markdown) if body else None


def backends_table(result: dict, *, markdown: bool = False) -> str:
    body = [[n, "yes" if a["available"] else "no", a["reason"]] for n, a in result["backends"].items()]
    return table(["backend", "available", "why not"], body, markdown=markdown)


def verification_text(result: dict, *, markdown: bool = False, limit: int = 30) -> str:
    ver = result.get("verification")
    if ver is None:
        return "verification: skipped (--no-verify)"
    s = ver["summary"]
    head = (f"verification (seed {ver['seed']}, float64 reference): {s['pass']} passed, {s['fail']} failed, "
            f"{s['error']} errors, {s['skip']} skipped" + (f", {s['missing']} with no kernel" if s["missing"] else ""))
    per: Dict[Tuple, List[dict]] = {}
    for c in ver["results"]:
        per.setdefault((c["op"], c["backend"], c["dtype"]), []).append(c)
    body = [[*key, " ".join(f"{n} {k}" for k in STATUSES if (n := sum(c["status"] == k for c in cs))),
             _f(max((c["rel_err"] for c in cs if c["rel_err"] is not None), default=None), ".1e"),
             _f(cs[0]["tol"], "g")] for key, cs in per.items()]
    bad = [c for c in ver["results"] if c["status"] in ("fail", "error")]
    not_run = {(c["op"], c["backend"]): c["message"] for c in ver["results"] if c["status"] in ("missing", "skip")}
    lines = [head, table(["op", "backend", "dtype", "results", "max rel err", "tol"], body, markdown=markdown,
                         right=(4, 5))]
    lines += [f"  {c['status'].upper()}: {c['op']} [{c['backend']}, {c['dtype']}, {c['memory_format']}] "
              f"{c['case']}: {c['message']}" for c in bad[:limit]]
    lines += [f"  ... and {len(bad) - limit} more (see the JSON file)"] if len(bad) > limit else []
    lines += [f"  not run: {op} [{b}]: {msg}" for (op, b), msg in list(not_run.items())[:limit]]
    return ("\n\n" if markdown else "\n").join(lines)


def ceilings_text(result: dict) -> str:
    c = result.get("ceilings")
    if not c:
        return "ceilings: not measured"
    parts = [f"streaming {c['copy']['gbps']:.4g} GB/s (read + write, {c['copy']['bytes'] / 2**20:.0f} MiB moved)"]
    parts += [f"matmul {dt}{' (TF32)' if m.get('tf32') else ''} {m['tflops']:.4g} TFLOP/s ({m['n']}^3)"
              if "tflops" in m else f"matmul {dt}: {m.get('error')}" for dt, m in c["matmul"].items()]
    return "measured ceilings: " + "; ".join(parts)


def _malloc(env: dict) -> str:
    kept = env.get("malloc_kept_bytes")
    return "system malloc" if not kept else f"malloc keeps {kept >> 20} MiB freed"


def header_text(result: dict) -> str:
    e, git = result["env"], result["env"].get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    isa = (f" [{e['cpu_capability']}, oneDNN bf16 {'yes' if e.get('onednn_bf16') else 'no'}"
           f" (native bf16: {e.get('cpu_bf16_isa') or 'none'}), "
           f"{e.get('cpu_threads')} threads, {_malloc(e)}]" if e.get("cpu_capability") else "")
    return (f"deeparch-bench on {e['device']} ({e['device_name']}){isa}, torch {e['torch']}, triton {e.get('triton')}, "
            f"cuda {e.get('cuda')}, cudnn {e.get('cudnn')}, commit {commit}, {result['created']}")


def render(result: dict, *, markdown: bool = False) -> str:
    timed = result.get("ceilings") is not None or result.get("timings")
    if markdown:
        parts = [f"# deeparch-bench: {result['env']['device_name']} ({result['env']['device']})", header_text(result),
                 "## backends\n\n" + backends_table(result, markdown=True),
                 "## verification\n\n" + verification_text(result, markdown=True),
                 "## timing\n\n" + (ceilings_text(result) + TIMING_NOTE if timed else "skipped (--no-bench)")]
    else:
        parts = [header_text(result), "backends:\n" + backends_table(result), verification_text(result)]
        parts += [ceilings_text(result)] if result.get("ceilings") else []
    rows = result.get("timings") or []
    parts += timing_tables(rows, markdown=markdown)
    if summary := summary_table(rows, markdown=markdown):
        parts.append(summary)
    excl = (result.get("auto") or {}).get("exclusions") or []
    if excl:
        parts.append(("## auto refused\n\n" if markdown else "auto refused:\n") + "\n".join(
            f"- {e['op']} {e['backend']} on {e['device']} ({', '.join(e['key'])}): {e['reason']}" for e in excl))
    if result.get("notes"):
        parts.append(("## notes\n\n" if markdown else "notes:\n") + "\n".join(f"- {n}" for n in result["notes"]))
    parts.append(f"wall time {result['wall_s']:.1f} s; exit code {result['exit_code']}")
    return "\n\n".join(parts) + "\n"


def result_stem(result: dict, out_dir: Path) -> Path:
    """<out>/<date>-<device slug>, with -2, -3... when that is taken."""
    base = f"{result['created'][:10]}-{result['env']['device_slug']}"
    stem, n = out_dir / base, 2
    while stem.with_suffix(".json").exists():
        stem = out_dir / f"{base}-{n}"
        n += 1
    return stem


def write(result: dict, out_dir: Path, *, plots: bool = True) -> Dict[str, object]:
    """Write <stem>.json, <stem>.md and the plots; returns the paths and why plots are missing."""
    from .plots import draw  # (plots.py imports this module)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result, out_dir)
    jpath, mpath = stem.with_suffix(".json"), stem.with_suffix(".md")
    jpath.write_text(json.dumps(result, indent=1, default=str) + "\n")
    mpath.write_text(render(result, markdown=True))
    pngs, why = draw(result, stem) if plots else ([], None)
    return {"json": jpath, "markdown": mpath, "plots": pngs, "plots_skipped": why}
