"""PNG plots drawn from a stored result (never from live numbers): per op family (specs.py) the
speedup of each provider over its baseline, per case, out-of-place and in-place forms in separate
panels (in-place rows are measured against torchvision's in-place pattern, the others against
eager); model throughput per provider. Each backend keeps one colour in every figure, the
baselines are grey and hatched, and the whiskers are the p20-p80 spread.

matplotlib is optional: without it ``draw`` returns no files and the reason, and the run goes on.
``deeparch-bench plot RESULT.json`` redraws them from a file."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .report import groups
from .specs import SPECS

BACKEND_ORDER = ("cuda", "triton", "cpu", "aten", "reference", "auto", "cutlass")
BASELINE_STYLE = {"compile": ("0.45", "//"), "conv-only": ("0.75", ".."), "torchvision": ("0.6", "xx"),
                  "eager": ("0.85", "")}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        return __import__("matplotlib.pyplot").pyplot, None
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken backend
        return None, f"matplotlib is not importable ({type(e).__name__}: {e}); pip install matplotlib for plots"


def _style(plt, r: dict) -> dict:
    """One colour per backend in every figure (ours under torch.compile dotted); baselines grey
    and hatched."""
    if r["kind"] == "baseline":
        colour, hatch = BASELINE_STYLE.get(r["provider"], ("0.5", "--"))
        return dict(color=colour, hatch=hatch, edgecolor="black", linewidth=0.4)
    b = r.get("backend") or r["provider"]
    i = BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER) + sum(map(ord, b)) % 4
    return dict(color=plt.get_cmap("tab10")(i), edgecolor="black", linewidth=0.4,
                hatch=".." if r["provider"].startswith("compile:") else None)


def _panel(plt, ax, grps: Dict[Tuple, List[dict]], value, ylabel: str, ref_line: Optional[float]) -> None:
    """Grouped bars, a bar per provider at each case, with p20-p80 whiskers."""
    provs = list(dict.fromkeys(r["provider"] for g in grps.values() for r in g if value(r)))
    width = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        xs, ys, lo, hi, style = [], [], [], [], None
        for i, g in enumerate(grps.values()):
            r = next((r for r in g if r["provider"] == p and value(r)), None)
            if r is not None:
                v, a, b = value(r)
                xs.append(i + (j - (len(provs) - 1) / 2) * width)
                ys.append(v)
                lo.append(max(0.0, v - a))
                hi.append(max(0.0, b - v))
                style = style or _style(plt, r)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, error_kw={"linewidth": 0.7}, label=p, **style)
    if ref_line is not None:
        ax.axhline(ref_line, color="black", linewidth=0.8)
    labels = [f"{k[2]}\n" + (f"batch {g[0]['shape'][0]} " if k[0] == "model" else "") + k[3]
              + (f" {k[5]}" if k[5] and k[1] != "add_relu" else "") for k, g in grps.items()]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                       fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _speedup(r: dict):
    """(speedup over the row's baseline, at p80, at p20), from the speedup derive() stored; None
    for a row not timed against one."""
    s = r.get("speedup_vs_eager")
    return (s, s * r["median_ms"] / r["p80_ms"], s * r["median_ms"] / r["p20_ms"]) if s else None


def draw(result: dict, stem: Path) -> Tuple[List[Path], Optional[str]]:
    plt, why = _pyplot()
    if plt is None:
        return [], why
    out: List[Path] = []
    rows = result.get("timings") or []
    dev = f"{result['env']['device_name']} ({result['env']['device']})"
    for spec in SPECS.values():
        panels = []
        for inplace in (False, True):
            frows = [r for r in rows if r["section"] == "op" and r["op"] in spec.ops
                     and r["op"].endswith("_") == inplace and r["provider"] not in ("eager", "torchvision")]
            if any(_speedup(r) for r in frows):
                base = "torchvision's in-place add_ + relu_" if inplace else "eager PyTorch"
                panels.append((groups(frows), f"{'in place' if inplace else 'out of place'}: speedup over\n"
                               f"{base} (x, > 1: faster)"))
        if not panels:
            continue
        n = max(len(g) for g, _ in panels)
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 0.9 * n + 3), 4.2 * len(panels)), squeeze=False)
        for ax, (grps, ylabel) in zip(axes[:, 0], panels):
            _panel(plt, ax, grps, _speedup, ylabel, 1.0)
        axes[0, 0].set_title(f"{spec.title}: {dev}", fontsize=9)
        out.append(_save(plt, fig, Path(f"{stem}-{spec.name}.png")))
    mrows = [r for r in rows if r["section"] == "model" and r.get("images_per_s")]
    if mrows:
        fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(groups(mrows)) + 3), 4.5))
        _panel(plt, ax, groups(mrows),
               lambda r: (r["images_per_s"], r["shape"][0] / (r["p80_ms"] * 1e-3), r["shape"][0] / (r["p20_ms"] * 1e-3))
               if r.get("images_per_s") else None, "images/s (higher: faster)", None)
        ax.set_title(f"model throughput (inference): {dev}", fontsize=9)
        out.append(_save(plt, fig, Path(f"{stem}-models.png")))
    return out, None


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
