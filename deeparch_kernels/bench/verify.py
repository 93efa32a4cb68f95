"""Verification, before anything is timed: every selected backend of every op on the cases of its
spec (specs.py: fresh random data, odd shapes, both layouts, NaN/+Inf/-Inf planted) against its
float64 reference, then whole models through deeparch_kernels.verify.

A case checks the output's dtype, shape and layout, NaN/Inf exactly where the reference has them
(for the stock "aten" and "reference" convolutions extra non-finite outputs, a NaN smeared over
a Winograd/FFT tile, are noted, not failed), then ``testing.rel_err`` against
``testing.op_tolerance`` (fp32 1e-5, 5e-3 for fp32 convolutions under TF32; fp16/bf16 1e-2). On
CUDA the output is poisoned: the allocator is handed a NaN-filled block of its size just before
the call, so an element the op forgets to write shows up. Statuses: pass, fail (wrong numbers),
and ``testing.classify``'s error, skip (the backend refuses the inputs) and missing (no kernel).
"""
from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..testing import FAIL, PASS, STATUSES, classify, nonfinite_mismatch, op_tolerance, rel_err
from .cases import dtype_name
from .specs import SPECS

log = logging.getLogger("deeparch_kernels.bench")


@dataclass
class Check:
    op: str
    backend: str
    dtype: str
    case: str
    memory_format: str
    status: str  # testing.STATUSES: pass | fail | error | skip | missing
    rel_err: Optional[float] = None
    tol: Optional[float] = None
    message: str = ""


def same_layout(shape, strides, expected) -> bool:
    """Strides equal where they mean something: dims of size > 1 of a non-empty tensor."""
    return any(d == 0 for d in shape) or all(a == b for d, a, b in zip(shape, strides, expected) if d > 1)


def summarize(results: Sequence[Check]) -> dict:
    return {s: sum(c.status == s for c in results) for s in STATUSES}


class Verifier:
    def __init__(self, device: torch.device, backends: Sequence[str], dtypes: Sequence[torch.dtype],
                 ops: Sequence[str], *, seed: int, quick: bool = False):
        self.device, self.backends, self.dtypes, self.ops = device, list(backends), list(dtypes), list(ops)
        self.gen, self.quick = torch.Generator().manual_seed(seed), quick

    def interp(self, backend: str) -> bool:
        """Triton on a CPU runs in its interpreter: tiny cases only."""
        return backend == "triton" and self.device.type == "cpu"

    def run(self) -> List[Check]:
        results: List[Check] = []
        with warnings.catch_warnings():
            # NaN/Inf inputs make numpy (the Triton interpreter) warn about invalid values
            warnings.simplefilter("ignore", RuntimeWarning)
            for backend, dt in itertools.product(self.backends, self.dtypes):
                new = [self.check(op, backend, dt, label, fmt, fn)
                       for spec in SPECS.values() if set(spec.ops) & set(self.ops)
                       for op, label, fmt, fn in spec.verify_cases(self, backend, dt)]
                worst = max((c.rel_err for c in new if c.rel_err is not None and c.rel_err != float("inf")),
                            default=None)
                summary = ", ".join(f"{v} {k}" for k, v in summarize(new).items() if v)
                log.info(f"verify {backend:9s} {dtype_name(dt)}: {summary or 'nothing to check'}"
                         + (f" (max rel err {worst:.1e})" if worst is not None else ""))
                results += new
        return results

    def check(self, op: str, backend: str, dt: torch.dtype, label: str, fmt: str, fn) -> Check:
        """One case: its output's dtype, shape, layout, non-finite positions, then the error."""
        chk = Check(op, backend, dtype_name(dt), label, fmt, PASS, tol=op_tolerance(op, dt, self.device))
        try:
            out, ref, strides, allow_spread = fn()
            if out.dtype != dt:
                raise AssertionError(f"dtype {out.dtype}, expected {dt}")
            if tuple(out.shape) != tuple(ref.shape):
                raise AssertionError(f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
            if not same_layout(out.shape, out.stride(), strides):
                raise AssertionError(f"output strides {out.stride()}, expected {tuple(strides)} (memory format)")
            if (why := nonfinite_mismatch(out, ref, allow_spread)) is not None:
                raise AssertionError(why)
            chk.rel_err = rel_err(out.cpu(), ref)
            spread = int((~torch.isfinite(out.cpu()) & torch.isfinite(ref)).sum()) if allow_spread else 0
            if spread:
                chk.message = f"{spread} extra non-finite outputs (the stock conv algorithm spreads NaN/Inf)"
            if not chk.rel_err <= chk.tol:
                raise AssertionError(f"relative error {chk.rel_err:.3g} > tolerance {chk.tol:g}")
        except AssertionError as e:
            chk.status, chk.message = FAIL, str(e)
        except Exception as e:  # noqa: BLE001 - every failure is a result
            chk.status, chk.message = classify(e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return chk


def verify_models(device: torch.device, names: Sequence[str], backends: Sequence[str],
                  dtypes: Sequence[torch.dtype], *, seed: int, image_size: int = 64, batch: int = 2) -> List[Check]:
    """Whole models, ours vs torchvision with the same weights, through deeparch_kernels.verify
    (eval logits; train logits and every parameter's gradient after one backward pass; its
    tolerances: 1e-4 fp32, 1e-2 or twice torchvision's own error for fp16/bf16), channels_last."""
    from ..verify import verify_model

    out: List[Check] = []
    for name, b, dt in itertools.product(names, backends, dtypes):
        r = verify_model(name, device=device, dtype=dt, batch=batch, backend=b, image_size=image_size,
                         channels_last=True, seed=seed)
        chk = Check("model", b, dtype_name(dt), f"{name} batch {batch} {image_size}x{image_size} "
                    + "+".join(r.modes or ["eval", "train"]), "channels_last", r.status,
                    rel_err=None if r.error or r.max_rel_err != r.max_rel_err else r.max_rel_err,
                    tol=max((m.tol for m in r.modes.values()), default=None),
                    message=r.error or ("" if r.passed else str(r)))
        out.append(chk)
        log.info(f"verify model {name} [{b}, {dtype_name(dt)}]: {chk.status}"
                 + (f" (max rel err {chk.rel_err:.1e})" if chk.rel_err is not None else "")
                 + (f" {chk.message}" if chk.status != PASS else ""))
    return out
