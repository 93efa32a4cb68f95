"""PNG plots drawn from a stored result (never from live numbers): speedup of each of our
backends over eager, per case, one figure per op family; model throughput per provider.

matplotlib is optional: without it ``draw`` returns no files and the reason, and the run goes on.
``deeparch-bench plot RESULT.json`` redraws them from a file."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from .report import _group_key, groups


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt, None
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken backend
        return None, f"matplotlib is not importable ({type(e).__name__}: {e}); pip install matplotlib for plots"


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
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.5))
        width = 0.8 / len(series)
        for j, (prov, vals) in enumerate(series.items()):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, [v if v else 0 for v in vals], width, label=prov)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs eager (x)")
        ax.set_title(f"{title}: {title_dev}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(f"{stem}-{fam}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    mrows = [r for r in rows if r["section"] == "model" and r.get("images_per_s")]
    if mrows:
        grps = groups(mrows)
        labels = [f"{k[2]}\n{g[0]['shape'][0]} {k[3]} {k[5]}" for k, g in grps.items()]
        provs = list(dict.fromkeys(r["provider"] for r in mrows))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4.5))
        width = 0.8 / len(provs)
        for j, prov in enumerate(provs):
            vals = [next((r["images_per_s"] for r in g if r["provider"] == prov), 0) for g in grps.values()]
            ax.bar([i + (j - (len(provs) - 1) / 2) * width for i in range(len(labels))], vals, width, label=prov)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("images/s")
        ax.set_title(f"model throughput: {title_dev}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(f"{stem}-models.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out, None
