"""What "correct" means, in one place: the tests, ``backend="auto"``'s check, model verification
(deeparch_kernels.verify) and ``deeparch-bench`` all measure with these.

``mismatch(actual, expected, bound)`` says how ``actual`` differs from ``expected`` -- shape,
dtype, memory format, NaN and +/-Inf positions (exactly), then finite values elementwise within
``bound`` -- or returns None. Error bounds are the op's business (each op file derives its own
from the dtype's rounding unit, ``unit_roundoff``).

``rel_err`` / ``op_tolerance`` / ``OP_TOL``: an op's error against its float64 reference and its
bound; ``nonfinite_mismatch``; ``classify`` (what an exception from a backend means: skip,
missing, error); ``MODEL_TOL``, ``MODEL_NAMES``, ``BENCH_MODELS``, ``reference_model`` and
``randomize_batchnorm`` for whole models against torchvision.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

__all__ = ["BENCH_MODELS", "MODEL_NAMES", "MODEL_TOL", "OP_TOL", "STATUSES", "TF32_TOL", "classify",
           "mismatch", "nonfinite_mismatch", "op_tolerance", "randomize_batchnorm", "reference_model",
           "rel_err", "unit_roundoff"]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next representable number: the relative error of one
    rounding to ``dtype`` (2^-24 for float32, 2^-11 float16, 2^-8 bfloat16, 2^-53 float64)."""
    return torch.finfo(dtype).eps / 2


def _where(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor) -> str:
    idx = tuple(int(i) for i in mask.nonzero()[0])
    return (f"{int(mask.sum())} of {mask.numel()} elements, e.g. at {idx}: got "
            f"{actual[idx].item()!r}, expected {expected[idx].item()!r}")


def mismatch(actual: torch.Tensor, expected: torch.Tensor,
             bound: Union[torch.Tensor, float]) -> Optional[str]:
    """Why ``actual`` is not ``expected`` (None when it is), checking in this order: a tensor,
    the shape, the dtype, the memory format (when ``expected`` is unambiguously contiguous or
    channels_last, ``actual`` must be too), NaN where and only where expected has NaN, +/-Inf
    exactly where expected has them, and ``|actual - expected| <= bound`` elsewhere."""
    if not isinstance(actual, torch.Tensor):
        return f"returned a {type(actual).__name__}, not a tensor"
    for what, got, want in (("shape", tuple(actual.shape), tuple(expected.shape)),
                            ("dtype", actual.dtype, expected.dtype), ("device", actual.device, expected.device)):
        if got != want:
            return f"{what} {got}, expected {want}"
    if expected.dim() == 4:
        for fmt in (torch.contiguous_format, torch.channels_last):
            other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
            if expected.is_contiguous(memory_format=fmt) and not expected.is_contiguous(memory_format=other) \
                    and not actual.is_contiguous(memory_format=fmt):
                return f"memory format: strides {actual.stride()}, expected {fmt} {expected.stride()}"
    if expected.numel() == 0:
        return None
    wide = torch.float64
    a, e = actual.detach().to(wide), expected.detach().to(wide)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return "NaN mismatch: " + _where(nan_a ^ nan_e, actual, expected)
    inf_e = torch.isinf(e)
    bad_inf = (inf_e | torch.isinf(a)) & (a != e)
    if bool(bad_inf.any()):
        return "Inf mismatch: " + _where(bad_inf, actual, expected)
    finite = ~(nan_e | inf_e)
    err = torch.where(finite, (a - e).abs(), torch.zeros((), dtype=wide, device=a.device))
    b = bound.detach().to(wide) if isinstance(bound, torch.Tensor) else torch.tensor(bound, dtype=wide)
    over = err > b.to(err.device)
    if bool(over.any()):
        ratio = (err / b.to(err.device).clamp_min(1e-300))[over].max().item()
        return f"error beyond the bound (up to {ratio:.3g}x it): " + _where(over, actual, expected)
    return None


# -- measuring against a reference (the tests, deeparch_kernels.verify, deeparch-bench) ----------
# Relative-error bounds of an op against its float64 reference, per dtype; fp32 convolutions on
# a GPU with TF32 allowed get TF32_TOL (TF32, as torch's own).
OP_TOL: Dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOL = 5e-3
# A whole model against torchvision in float32 (TF32 off), logits and gradients.
MODEL_TOL: Dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# The torchvision models deeparch_kernels.models builds, and the three the benchmarks time.
MODEL_NAMES: Tuple[str, ...] = (
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
)
BENCH_MODELS: Tuple[str, ...] = ("vgg16", "resnet18", "resnet50")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| over the elements where ``ref`` is finite, in float64: inf when
    the shapes differ or ``out`` is not finite where ``ref`` is; 0 when no element is finite."""
    if out.shape != ref.shape:
        return float("inf")
    ref = ref.detach().to(torch.float64)
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    diff = (out.detach().to(device=ref.device, dtype=torch.float64) - ref)[finite].abs().max().item()
    if diff != diff:  # NaN in out where ref is finite
        return float("inf")
    return diff / max(ref[finite].abs().max().item(), 1e-30)


def op_tolerance(op: str, dtype: torch.dtype, device: torch.device) -> float:
    """The bound on ``rel_err`` of ``op`` in ``dtype`` against its float64 reference."""
    from ._precision import conv_allows_tf32

    if op == "fused_conv2d" and dtype == torch.float32 and device.type == "cuda" and conv_allows_tf32():
        return TF32_TOL
    return OP_TOL[dtype]


def nonfinite_mismatch(out: torch.Tensor, ref: torch.Tensor, allow_spread: bool = False) -> Optional[str]:
    """Why out's NaN/+Inf/-Inf positions differ from ref's, or None. ``allow_spread``: extra NaN
    in out are allowed (a stock Winograd/FFT convolution smears a NaN over its tile)."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        o, r = f(out), f(ref)
        if (name != "NaN" or not allow_spread) and not torch.equal(o, r):
            return (f"{name} positions differ from the reference ({int((r & ~o).sum())} missing, "
                    f"{int((o & ~r).sum())} extra)")
    lost = int((~torch.isfinite(ref) & torch.isfinite(out)).sum()) if allow_spread else 0
    return f"{lost} non-finite reference values came out finite" if lost else None


# What a failed call means: a result status and a one-line message.
PASS, FAIL, ERROR, SKIP, MISSING = "pass", "fail", "error", "skip", "missing"
STATUSES = (PASS, FAIL, ERROR, SKIP, MISSING)


def classify(e: BaseException) -> Tuple[str, str]:
    """(status, message) for an exception a backend raised: SKIP (BackendUnavailable: it refuses
    these inputs), MISSING (no kernel registered for the device, or a module not there), ERROR."""
    from .backends import BackendUnavailable

    if isinstance(e, BackendUnavailable):
        return SKIP, str(e)
    text = str(e).strip()
    msg = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
    if isinstance(e, (ImportError, NotImplementedError)) or (
            isinstance(e, RuntimeError) and ("Could not run" in text or "no kernel" in text.lower())):
        return MISSING, msg
    return ERROR, msg


# -- reference models --------------------------------------------------------------------------
def randomize_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Give every BatchNorm2d non-default statistics and affine parameters (so that folding is
    really tested); returns model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def reference_model(name: str, *, seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """torchvision's ``name`` with random weights (seeded) and randomised BatchNorm, on the CPU."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed))
