"""Whole models: VGG16, ResNet-18, ResNet-50 (inference), torchvision eager vs torch.compile vs
ours, images/s at the throughput batch and latency at batch 1.

Ours is ``deeparch_kernels.models.<name>`` built from torchvision's weights (verify.fused_model),
so its output is compared with torchvision's (max_rel_err per row). Models get random weights
and randomised BatchNorm statistics (testing.reference_model); inputs are random images. Every
provider also gets one image with a NaN pixel: ``nan_kept`` says whether NaN comes out where
torchvision eager puts it.

On a CPU, torch.compile runs with inductor's freezing (what a CPU deployment uses: weights
prepacked for oneDNN, conv epilogues fused) at both batches, and ours is compiled too
("compile:fused", backend auto); on a GPU torchvision is compiled at the throughput batch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch._inductor import config as inductor_config

from ..testing import classify, reference_model, rel_err
from ..timing import Budget, Timer, synchronize
from .cases import dtype_name
from .opbench import derive, time_rows
from .schema import ModelRow

log = logging.getLogger("deeparch_kernels.bench")
COMPILED_OURS = "compile:fused"  # the provider of ours under torch.compile (CPU)


def build_fused(tv: torch.nn.Module, name: str, backend: str) -> torch.nn.Module:
    """Ours, with the weights of ``tv`` (torchvision's, float32 on the CPU), in eval mode."""
    from ..verify import fused_model

    return fused_model(name, tv, backend=backend).eval()


class ModelBench:
    def __init__(self, device: torch.device, timer: Timer, budget: Budget, *, names: Sequence[str],
                 backends: Sequence[str], dtype: torch.dtype, batch: int, image: int,
                 latency: bool, compile_: bool, seed: int):
        self.device, self.timer, self.budget = device, timer, budget
        self.names, self.backends = list(names), list(backends)
        self.dtype, self.batch, self.image, self.compile, self.seed = dtype, batch, image, compile_, seed
        self.latency = latency and batch != 1
        self.notes: List[str] = ["models: ours built with deeparch_kernels.models from torchvision's weights"]
        self.compile_guess = 60.0 if device.type == "cuda" else 30.0  # seconds, for the budget

    def _first_call(self, row: ModelRow, model: Callable, x: torch.Tensor) -> Optional[torch.Tensor]:
        """One untimed call (compilation, autotuning, cuDNN's search): the output, or None, the row marked."""
        try:
            with torch.inference_mode():
                out = model(x)
            synchronize(self.device)
            return out
        except Exception as e:  # noqa: BLE001
            row.status, row.note = classify(e)
            return None

    def _compiled(self, row: ModelRow, model: torch.nn.Module, x: torch.Tensor):
        """(torch.compile(model), its first output), compiled by that first call; (None, None),
        the row marked, when skipped or when it raised."""
        if not self.compile or not self.budget.allows(self.compile_guess):
            row.status, row.note = "skipped", "time budget" if self.compile else "model compile off (--no-compile)"
            return None, None
        cm = torch.compile(model)
        t0 = time.perf_counter()
        out = self._first_call(row, cm, x)
        row.compile_s = time.perf_counter() - t0 if out is not None else None
        return (cm, out) if out is not None else (None, None)

    def run(self) -> List[dict]:
        # On a CPU the whole section runs with inductor's freezing: a compiled model traced with it
        # is guarded on it (ours reads it), so every call must see the same setting.
        with inductor_config.patch(freezing=self.device.type == "cpu" and self.compile):
            return self._run()

    def _run(self) -> List[dict]:
        rows: List[dict] = []
        for i, name in enumerate(self.names, 1):
            if self.budget.left() <= 0:
                self.notes.append(f"models: {name} skipped (time budget spent)")
                log.info(f"[model {i}/{len(self.names)}] {name}: skipped (time budget spent)")
                continue
            t_case = time.perf_counter()
            tv = reference_model(name, seed=self.seed).eval()
            place = dict(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
            ours: Dict[str, object] = {}  # backend or COMPILED_OURS -> our model, or what building it raised
            # on a CPU also ours under torch.compile (backend auto): what users get
            compiled = [(COMPILED_OURS, "auto")] if self.compile and self.device.type == "cpu" else []
            for key, b in [(b, b) for b in self.backends] + compiled:
                try:
                    ours[key] = build_fused(tv, name, b).to(**place)
                except Exception as e:  # noqa: BLE001
                    ours[key] = e
            tv = tv.to(**place)
            case_rows = []
            for batch, form in [(self.batch, "throughput")] + ([(1, "latency")] if self.latency else []):
                case_rows += self._run_batch(name, tv, ours, batch, form)
            lost = sorted({f"{r.provider} at batch {r.shape[0]}" for r in case_rows if r.nan_kept is False})
            if lost:  # on a CPU, torch.compile fuses oneDNN's ReLU post-op, which turns NaN into 0
                self.notes.append(f"models: {name} {dtype_name(self.dtype)}: NaN in the input does not come out where torch eager "
                                  f"puts it from {', '.join(lost)} (column NaN: LOST)")
            rows += [asdict(r) for r in case_rows]
            log.info(f"[model {i}/{len(self.names)}] {name} batch {self.batch} {dtype_name(self.dtype)}: "
                     + ", ".join(f"{r.provider}{'' if r.form == 'throughput' else '@1'} "
                                 + (f"{r.images_per_s:.4g} img/s" if r.images_per_s else r.status) for r in case_rows)
                     + f" [{time.perf_counter() - t_case:.1f} s]")
            del tv, ours
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return rows

    def _run_batch(self, name: str, tv, ours: Dict[str, object], batch: int, form: str) -> List[ModelRow]:
        x = torch.randn(batch, 3, self.image, self.image, device=self.device).to(
            self.dtype).contiguous(memory_format=torch.channels_last)

        def row(provider, kind, backend=None):
            return ModelRow("model", "model", name, [batch, 3, self.image, self.image], dtype_name(self.dtype),
                            "channels_last", str(self.device), provider, kind, backend, "torchvision",
                            form=form, net=name)

        cpu = self.device.type == "cpu"
        torch._dynamo.reset()  # each batch compiled for its own static shapes
        r = row("torchvision", "baseline")
        ref = self._first_call(r, tv, x)
        timed = [(r, tv)]
        if form == "throughput" or cpu:
            r = row("compile", "baseline")
            timed.append((r, self._compiled(r, tv, x)[0]))
        for b, m in ours.items():
            r = row(b, "ours", "auto") if b == COMPILED_OURS else row(f"fused:{b}", "ours", b)
            if isinstance(m, Exception):
                r.status, r.note = classify(m)
                m = None
            elif b == COMPILED_OURS:  # compiled by its first call, whose output is compared
                m, out = self._compiled(r, m, x)
            elif (out := self._first_call(r, m, x)) is None:
                m = None
            if m is not None and ref is not None:  # torchvision's weights: compare the outputs
                r.max_rel_err = rel_err(out.float(), ref.double())
                if not torch.isfinite(out).all():
                    r.note = "non-finite outputs"
            timed.append((r, m))
        rows = [r for r, _ in timed]
        live = [(r, m) for r, m in timed if m is not None and r.status == "ok"]
        x_nan = x.clone()  # made as x was (not an inference tensor): no recompile for it
        x_nan[0, :, x.shape[2] // 2, x.shape[3] // 2] = float("nan")
        with torch.inference_mode():
            time_rows(self.timer, rows, {r.provider: (lambda m=m: m(x)) for r, m in live})
            nan_at = {r.provider: m(x_nan).isnan() for r, m in live}
        for r, _ in live:  # against torchvision eager's NaN (no verdict when it did not run)
            r.nan_kept = bool(torch.equal(nan_at[r.provider], nan_at["torchvision"])) if "torchvision" in nan_at else None
        for r in rows:
            r.images_per_s = batch / (r.median_ms * 1e-3) if r.median_ms else None
        torch._dynamo.reset()
        derive(rows, {})
        return rows
