"""PNG plots drawn from a stored result (never from live numbers): speedup of each of our
backends over eager, per case, one figure per op family; model throughput per provider.

matplotlib is optional: without it ``draw`` returns no files and the reason, and the run goes on.
``deeparch-bench plot RESULT.json`` redraws them from a file."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .report import _group_key, groups


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt, None
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken backend
        return None, f"matplotlib is not importable ({type(e).__name__}: {e}); pip install matplotlib for plots"


def _bars(plt, labels: List[str], series: Dict[str, List[float]], ylabel: str, title: str,
          path: Path, width_per_label: float, rotation: int = 0,
          ref_line: Optional[float] = None) -> Path:
    """One grouped bar chart (a bar per series at each label), saved to ``path``."""
    fig, ax = plt.subplots(figsize=(max(6, width_per_label * len(labels) + 2), 4.5))
    width = 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, label=name)
    if ref_line is not None:
        ax.axhline(ref_line, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    if rotation:
        ax.set_xticklabels(labels, rotation=rotation, ha="right", fontsize=7)
    else:
        ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(result: dict, stem: Path) -> Tuple[List[Path], Optional[str]]:
    plt, why = _pyplot()
    if plt is None:
        return [], why
    out: List[Path] = []
    rows = result.get("timings") or []
    title_dev = f"{result['env']['device_name']} ({result['env']['device']})"
    for fam, title in (("add_relu", "residual add + ReLU"), ("fused_conv2d", "fused conv + bias (+res) + ReLU")):
        frows = [r for r in rows if r["section"] == "op" and _group_key(r)[1] == fam]
        grps = groups(frows)
        if not grps:
            continue
        labels, series = [], {}
        for i, (key, grp) in enumerate(grps.items()):
            _, _, case, dtype, fmt, form = key
            labels.append(f"{case}\n{dtype}" + (f" {form}" if form else ""))
            for r in grp:
                if r["provider"] in ("eager", "torchvision"):
                    continue
                series.setdefault(r["provider"], [None] * len(grps))[i] = r.get("speedup_vs_eager")
        if not series:
            continue
        vals = {prov: [v if v else 0 for v in vs] for prov, vs in series.items()}
        out.append(_bars(plt, labels, vals, "speedup vs eager (x)", f"{title}: {title_dev}",
                         Path(f"{stem}-{fam}.png"), width_per_label=0.9, rotation=60, ref_line=1.0))
    mrows = [r for r in rows if r["section"] == "model" and r.get("images_per_s")]
    if mrows:
        grps = groups(mrows)
        labels = [f"{k[2]}\n{g[0]['shape'][0]} {k[3]} {k[5]}" for k, g in grps.items()]
        provs = list(dict.fromkeys(r["provider"] for r in mrows))
        vals = {prov: [next((r["images_per_s"] for r in g if r["provider"] == prov), 0)
                       for g in grps.values()] for prov in provs}
        out.append(_bars(plt, labels, vals, "images/s", f"model throughput: {title_dev}",
                         Path(f"{stem}-models.png"), width_per_label=1.2))
    return out, None
