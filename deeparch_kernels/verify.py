"""Verification of fused models against torchvision.

  verify(fused, reference, x)      one pair of models with the same weights: eval-mode logits, and
                                   train-mode logits plus the gradient of every parameter after
                                   one backward pass
  verify_model(name, ...)          builds torchvision's ``name`` with random weights and randomised
                                   BatchNorm statistics, the fused model from its state_dict (the
                                   builder, or fuse()), and verifies them
  verify_models(names, ...)        the same for several builders (the CLI's entry point)

Errors are ``testing.rel_err`` (max |out - ref| / max |ref|, in float64; inf when NaN/Inf sit
elsewhere than in the reference). The reference is
torchvision in float32 (TF32 off); the bounds are ``testing.MODEL_TOL``: 1e-4 for float32 and 1e-2
for float16/bfloat16. For the half
types torchvision's own error in that dtype is measured too, and a result also passes when it is
at most twice that (the error of the dtype itself, which deep networks can exceed 1e-2 with).

The models are run as given (device, dtype); the modes they were in are restored afterwards,
train mode's BatchNorm running statistics are put back and the gradients cleared.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import backends as _backends
from ._precision import no_tf32
from .testing import (MODEL_NAMES, MODEL_TOL as TOL, classify, nonfinite_mismatch, randomize_batchnorm,
                      reference_model, rel_err)

__all__ = ["MODEL_NAMES", "TOL", "ModeResult", "VerifyResult", "randomize_batchnorm", "reference_model",
           "verify", "verify_model", "verify_models"]

@dataclass
class ModeResult:
    mode: str  # "eval" or "train"
    max_rel_err: float  # logits
    tol: float
    passed: bool
    grad_max_rel_err: Optional[float] = None  # train: the worst parameter gradient
    worst_grad: Optional[str] = None  # its parameter name
    torch_err: Optional[float] = None  # half types: torchvision's own error in that dtype
    torch_grad_err: Optional[float] = None


@dataclass
class VerifyResult:
    name: str
    device: str
    dtype: str
    backend: str  # as requested
    resolved: List[str]  # the backends "auto" has chosen on this device and dtype (process-wide)
    batch: int
    image_size: int
    modes: Dict[str, ModeResult] = field(default_factory=dict)
    error: Optional[str] = None  # an exception that stopped the check, "Type: message"
    error_status: Optional[str] = None  # what it means: testing.classify's skip, missing or error

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.modes) and all(m.passed for m in self.modes.values())

    @property
    def status(self) -> str:
        """pass, fail, or error_status when an exception stopped the check."""
        return (self.error_status or "error") if self.error else ("pass" if self.passed else "fail")

    @property
    def max_rel_err(self) -> float:
        errs = [e for m in self.modes.values() for e in (m.max_rel_err, m.grad_max_rel_err)
                if e is not None]
        return max(errs) if errs else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"], d["max_rel_err"] = self.passed, self.max_rel_err
        return d

    def __str__(self) -> str:
        head = (f"{self.name} {self.device} {self.dtype} backend={self.backend}"
                f"{' (' + ','.join(self.resolved) + ')' if self.resolved else ''} "
                f"batch={self.batch} {self.image_size}x{self.image_size}: ")
        if self.error:
            return head + f"ERROR {self.error}"
        parts = []
        for m in self.modes.values():
            s = f"{m.mode} logits {m.max_rel_err:.2e}"
            if m.grad_max_rel_err is not None:
                s += f", grads {m.grad_max_rel_err:.2e} ({m.worst_grad})"
            parts.append(s + f" tol {m.tol:.0e} {'ok' if m.passed else 'FAIL'}")
        return head + "; ".join(parts)


_no_tf32 = no_tf32  # exact fp32 references; settings restored whichever TF32 API set them


@contextlib.contextmanager
def _restored(models: Sequence[nn.Module]) -> Iterator[None]:
    modes = [[m.training for m in model.modules()] for model in models]
    buffers = [{k: v.clone() for k, v in model.state_dict().items()
                if "running_" in k or "num_batches_tracked" in k} for model in models]
    try:
        yield
    finally:
        for model, mode, bufs in zip(models, modes, buffers):
            for m, t in zip(model.modules(), mode):
                m.training = t
            model.load_state_dict(bufs, strict=False)  # (fused modules refold after loading)
            for p in model.parameters():
                p.grad = None


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _forward(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the same dropout masks in every model
        torch.manual_seed(seed)
        return model(x.to(_dtype_of(model)))


def _grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _run(model: nn.Module, x: torch.Tensor, train: bool, seed: int):
    """(logits, None) in eval; (logits, {name: grad}) in train, after backward of
    sum(logits * g) with g random but the same for every model."""
    model.train(train)
    if not train:
        with torch.no_grad():
            return _forward(model, x, seed), None
    for p in model.parameters():
        p.grad = None
    out = _forward(model, x, seed)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64).to(out.device)
    (out.double() * g).sum().backward()
    return out.detach(), _grads(model)


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_err, and inf where NaN/Inf don't sit exactly where the reference has them (rel_err
    alone only looks where the reference is finite)."""
    return float("inf") if nonfinite_mismatch(out, ref) is not None else rel_err(out, ref)


def _grad_err(grads: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Tuple[float, str]:
    worst, name = -1.0, ""
    for n in sorted(ref.keys() | grads.keys()):
        e = _err(grads[n], ref[n]) if n in grads and n in ref else float("inf")
        if e > worst:
            worst, name = e, n
    return worst, name


def verify(fused: nn.Module, reference: nn.Module, x: torch.Tensor, *,
           modes: Iterable[str] = ("eval", "train"), tol: Optional[float] = None,
           lowp_reference: Optional[nn.Module] = None, name: str = "model",
           backend: str = "?", seed: int = 0) -> VerifyResult:
    """Compare ``fused`` with ``reference`` (same weights, same parameter names) on input ``x``.

    eval: logits under no_grad. train: logits, then the gradients of every parameter after one
    backward pass of ``sum(logits * g)`` (g random, fixed); dropout masks are made equal by
    seeding each forward. ``reference`` may have another dtype (the float32 reference for a half
    fused model); ``lowp_reference``, torchvision in the fused model's dtype, gives torchvision's
    own error for the half-type criterion. ``tol`` defaults to TOL[fused dtype].
    """
    dtype = _dtype_of(fused)
    tol = TOL.get(dtype, 1e-4) if tol is None else tol
    result = VerifyResult(name, str(x.device), str(dtype).replace("torch.", ""), backend, [],
                          x.shape[0], x.shape[-1])
    models = [fused, reference] + ([lowp_reference] if lowp_reference is not None else [])
    with _no_tf32(), _restored(models):
        for mode in modes:
            if mode not in ("eval", "train"):
                raise ValueError(f"modes are 'eval' and 'train', got {mode!r}")
            train = mode == "train"
            ref_out, ref_g = _run(reference, x, train, seed)
            out, grads = _run(fused, x, train, seed)
            r = ModeResult(mode, _err(out, ref_out), tol, False)
            if grads is not None:
                r.grad_max_rel_err, r.worst_grad = _grad_err(grads, ref_g)
            if lowp_reference is not None:
                lp_out, lp_g = _run(lowp_reference, x, train, seed)
                r.torch_err = _err(lp_out, ref_out)
                if lp_g is not None:
                    r.torch_grad_err = _grad_err(lp_g, ref_g)[0]

            def ok(err: Optional[float], torch_err: Optional[float]) -> bool:
                return err is None or err <= tol or (torch_err is not None and err <= 2 * torch_err)

            r.passed = ok(r.max_rel_err, r.torch_err) and ok(r.grad_max_rel_err, r.torch_grad_err)
            result.modes[mode] = r
    result.resolved = _resolved(x.device, dtype) if backend == "auto" else [backend]
    return result


def _resolved(device: torch.device, dtype: torch.dtype) -> List[str]:
    picks = {choice for (op, dev, key, _precision), choice in _backends.cached_choices().items()
             if torch.device(dev).type == device.type and key and key[0] == dtype}
    return sorted(picks)


def fused_model(name: str, reference: nn.Module, *, backend: str = "auto",
                via: str = "builder") -> nn.Module:
    """The fused model with ``reference``'s weights: ``deeparch_kernels.models.<name>(weights=
    reference.state_dict())`` (via="builder") or ``fuse(reference)`` (via="fuse")."""
    if via == "fuse":
        from .fuse import fuse

        return fuse(reference, backend=backend, inplace=False)
    if via != "builder":
        raise ValueError(f"via must be 'builder' or 'fuse', got {via!r}")
    from . import models

    num_classes = reference.state_dict()[_last_weight(reference)].shape[0]
    return getattr(models, name)(weights=reference.state_dict(), backend=backend,
                                 num_classes=num_classes)


def _last_weight(model: nn.Module) -> str:
    return [k for k in model.state_dict() if k.endswith("weight")][-1]


def verify_model(name: str, *, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32,
                 batch: int = 2, backend: str = "auto", image_size: int = 64,
                 modes: Iterable[str] = ("eval", "train"), via: str = "builder",
                 num_classes: int = 1000, channels_last: bool = False, seed: int = 0,
                 tol: Optional[float] = None) -> VerifyResult:
    """Build torchvision's ``name`` (random weights, randomised BN) and the fused one with the same
    weights, and verify them on a random batch. Exceptions are caught into ``result.error``."""
    device = torch.device(device)
    result = VerifyResult(name, str(device), str(dtype).replace("torch.", ""), backend, [], batch,
                          image_size)
    try:
        ref = reference_model(name, seed=seed, num_classes=num_classes)
        fused = fused_model(name, ref, backend=backend, via=via)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        lowp = None
        if dtype != torch.float32:
            lowp = copy.deepcopy(ref).to(device=device, dtype=dtype, memory_format=fmt)
        ref = ref.to(device=device, memory_format=fmt)
        fused = fused.to(device=device, dtype=dtype, memory_format=fmt)
        gen = torch.Generator().manual_seed(seed + 2)
        x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
        x = x.contiguous(memory_format=fmt)
        result = verify(fused, ref, x, modes=modes, tol=tol, lowp_reference=lowp, name=name,
                        backend=backend, seed=seed)
    except Exception as e:  # noqa: BLE001 - reported, so that one model does not stop a sweep
        result.error, result.error_status = f"{type(e).__name__}: {e}", classify(e)[0]
    return result


def verify_models(names: Optional[Iterable[str]] = None, **kwargs) -> List[VerifyResult]:
    """verify_model for each name (default: every builder), same keyword arguments."""
    return [verify_model(n, **kwargs) for n in (MODEL_NAMES if names is None else names)]
