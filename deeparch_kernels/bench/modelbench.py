"""Whole models: VGG16, ResNet-18, ResNet-50 (inference), torchvision eager vs torch.compile vs
ours, images/s at the throughput batch and latency at batch 1.

Ours is built by ``deeparch_kernels.models.<name>(weights=<torchvision's state_dict>,
backend=...)``, or, without the models package, ``deeparch_kernels.fuse.fuse(tv_model,
backend=..., inplace=False)``: torchvision's weights either way, so ours' output is compared
with torchvision's (max relative error, recorded per row). Both are imported lazily: while
neither is there the models section reports "not available yet" and the rest of the run goes on.

Models get random weights (no download) and randomised BatchNorm statistics, so that folding
BatchNorm into the convolutions is exercised; inputs are random images.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import dtype_name
from ..timing import Budget, Timer, synchronize
from .verify import classify, rel_err

MODEL_NAMES = ("vgg16", "resnet18", "resnet50")


def fused_builder() -> Tuple[Optional[Callable], str]:
    """(build(tv_model, name, backend, state_dict) -> our model, how) or (None, why not).

    Preferred: ``deeparch_kernels.models.<name>(weights=<torchvision's state_dict>,
    backend=...)`` (the builders take torchvision's state_dict keys); else
    ``deeparch_kernels.fuse.fuse(tv_model, backend=..., inplace=False)``. Either way ours has
    torchvision's weights, so its output is compared with torchvision's."""
    errors = []
    try:
        from .. import models as dkm  # type: ignore[attr-defined]

        missing = [n for n in MODEL_NAMES if not callable(getattr(dkm, n, None))]
        if missing:
            raise ImportError(f"no builder for {', '.join(missing)} yet")

        def build(tv, name, backend, state_dict):
            m = getattr(dkm, name)(weights=state_dict, backend=backend)
            p = next(tv.parameters())
            return m.eval().to(device=p.device, dtype=p.dtype, memory_format=torch.channels_last)

        return build, "deeparch_kernels.models"
    except Exception as e:  # noqa: BLE001 - not written yet, or broken: say which
        errors.append(f"deeparch_kernels.models: {e}")
    try:
        from ..fuse import fuse  # type: ignore[import-not-found]

        if not callable(fuse):
            raise ImportError("deeparch_kernels.fuse.fuse is not callable")

        def build(tv, name, backend, state_dict):
            try:
                return fuse(tv, backend=backend, inplace=False)
            except TypeError:  # a signature without inplace=
                return fuse(copy.deepcopy(tv), backend=backend)

        return build, "deeparch_kernels.fuse.fuse"
    except Exception as e:  # noqa: BLE001
        errors.append(f"deeparch_kernels.fuse: {e}")
    return None, "not available yet (" + "; ".join(errors) + ")"


def _randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def torchvision_model(name: str, seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    m = getattr(torchvision.models, name)(weights=None).eval()
    _randomize_bn(m, torch.Generator().manual_seed(seed))
    return m


def _row(name, provider, kind, backend, batch, image, dtype, fmt, device, form) -> dict:
    return {"section": "model", "op": "model", "case": name, "shape": [batch, 3, image, image],
            "weight_shape": None, "stride": None, "padding": None, "form": form, "net": name,
            "dtype": dtype_name(dtype), "memory_format": fmt, "device": str(device), "bytes": None,
            "flops": None, "provider": provider, "kind": kind, "backend": backend,
            "eager_provider": "torchvision", "median_ms": None, "p20_ms": None, "p80_ms": None,
            "reps": 0, "compile_s": None, "status": "ok", "note": "", "gbps": None, "tflops": None,
            "roofline_pct": None, "speedup_vs_eager": None, "speedup_vs_compile": None,
            "images_per_s": None, "max_rel_err": None}


class ModelBench:
    def __init__(self, device: torch.device, timer: Timer, budget: Budget, *, names: Sequence[str],
                 backends: Sequence[str], dtype: torch.dtype, batch: int, image: int,
                 latency: bool, compile_: bool, seed: int, log: Callable[[str], None] = lambda s: None):
        self.device, self.timer, self.budget = device, timer, budget
        self.names, self.backends = list(names), list(backends)
        self.dtype, self.batch, self.image = dtype, batch, image
        self.latency = latency and batch != 1
        self.compile = compile_
        self.seed = seed
        self.log = log
        self.notes: List[str] = []
        self.compile_guess = 60.0 if device.type == "cuda" else 150.0

    def _first_call(self, row: dict, model: Callable, x: torch.Tensor) -> Optional[torch.Tensor]:
        """One untimed call (compilation, autotuning, cuDNN's search): the output, or None with
        the row marked."""
        try:
            with torch.inference_mode():
                out = model(x)
            synchronize(self.device)
            return out
        except Exception as e:  # noqa: BLE001
            row["status"], row["note"] = classify(e)
            return None

    def _compiled(self, row: dict, tv: torch.nn.Module, x: torch.Tensor) -> Optional[Callable]:
        if not self.compile:
            row["status"], row["note"] = "skipped", "model compile off (--no-compile, or CPU: --compile-models)"
            return None
        if not self.budget.allows(self.compile_guess):
            row["status"], row["note"] = "skipped", "time budget"
            return None
        torch._dynamo.reset()
        cm = torch.compile(tv)
        t0 = time.perf_counter()
        if self._first_call(row, cm, x) is None:
            return None
        row["compile_s"] = time.perf_counter() - t0
        return cm

    def run(self) -> List[dict]:
        build, how = fused_builder()
        if build is None:
            self.notes.append(f"models: ours {how}; torchvision eager and torch.compile are still timed")
        else:
            self.notes.append(f"models: ours built with {how} from torchvision's weights")
        rows: List[dict] = []
        fmt = "channels_last"
        for i, name in enumerate(self.names, 1):
            if self.budget.left() <= 0:
                self.notes.append(f"models: {name} skipped (time budget spent)")
                self.log(f"[model {i}/{len(self.names)}] {name}: skipped (time budget spent)")
                continue
            t_case = time.perf_counter()
            tv = torchvision_model(name, self.seed)
            state_dict = {k: v.detach().clone() for k, v in tv.state_dict().items()}  # fp32, CPU
            tv = tv.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
            ours: Dict[str, object] = {}  # backend -> our model, or the exception building it
            for b in self.backends:
                if build is None:
                    continue
                try:
                    ours[b] = build(tv, name, b, state_dict)
                except Exception as e:  # noqa: BLE001
                    ours[b] = e
            batches = [(self.batch, "throughput")] + ([(1, "latency")] if self.latency else [])
            case_rows: List[dict] = []
            for batch, form in batches:
                x = torch.randn(batch, 3, self.image, self.image, device=self.device).to(
                    self.dtype).contiguous(memory_format=torch.channels_last)

                def row(provider, kind, backend=None):
                    return _row(name, provider, kind, backend, batch, self.image, self.dtype, fmt,
                                self.device, form)

                timed: List[tuple] = []  # (row, model)
                r = row("torchvision", "baseline")
                ref = self._first_call(r, tv, x)
                timed.append((r, tv))
                if form == "throughput":
                    r = row("compile", "baseline")
                    cm = self._compiled(r, tv, x)
                    timed.append((r, cm))
                for b in self.backends:
                    r = row(f"fused:{b}", "ours", b)
                    m = ours.get(b)
                    if build is None:
                        r["status"], r["note"] = "missing", "deeparch_kernels.models / .fuse not available yet (see notes)"
                        m = None
                    elif isinstance(m, Exception):
                        r["status"], r["note"] = classify(m)
                        m = None
                    else:
                        out = self._first_call(r, m, x)
                        if out is None:
                            m = None
                        elif ref is not None:  # torchvision's weights: compare the outputs
                            r["max_rel_err"] = rel_err(out.float(), ref.double())
                            if not torch.isfinite(out).all():
                                r["note"] = "non-finite outputs"
                    timed.append((r, m))
                fns = {r["provider"]: (lambda m=m: m(x)) for r, m in timed
                       if m is not None and r["status"] == "ok"}
                with torch.inference_mode():
                    timings, errors = self.timer.many(fns)
                for r, _ in timed:
                    t, err = timings.get(r["provider"]), errors.get(r["provider"])
                    if err is not None:
                        r["status"], r["note"] = classify(err)
                    elif t is not None:
                        r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                                 images_per_s=batch / (t.median_ms * 1e-3))
                    case_rows.append(r)
                if form == "throughput":
                    torch._dynamo.reset()
            _derive_models(case_rows)
            rows += case_rows
            self.log(f"[model {i}/{len(self.names)}] {name} batch {self.batch} {dtype_name(self.dtype)}: "
                     + ", ".join(f"{r['provider']}{'' if r['form'] == 'throughput' else '@1'} "
                                 + (f"{r['images_per_s']:.4g} img/s" if r['images_per_s'] else r['status'])
                                 for r in case_rows)
                     + f" [{time.perf_counter() - t_case:.1f} s]")
            del tv, ours
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return rows


def _derive_models(rows: List[dict]) -> None:
    for form in ("throughput", "latency"):
        group = [r for r in rows if r["form"] == form]
        by = {r["provider"]: r for r in group if r.get("median_ms")}
        for r in group:
            if not r.get("median_ms"):
                continue
            if "torchvision" in by:
                r["speedup_vs_eager"] = by["torchvision"]["median_ms"] / r["median_ms"]
            if "compile" in by:
                r["speedup_vs_compile"] = by["compile"]["median_ms"] / r["median_ms"]
