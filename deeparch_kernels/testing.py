"""Comparing a kernel's output with stock PyTorch's: what ``backend="auto"`` checks before it
trusts a backend, and what the tests and the main job assert.

``mismatch(actual, expected, bound)`` says how ``actual`` differs from ``expected`` -- shape,
dtype, memory format, NaN and +/-Inf positions (exactly), then finite values elementwise within
``bound`` -- or returns None. Error bounds are the op's business (each op file derives its own
from the dtype's rounding unit, ``unit_roundoff``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["mismatch", "unit_roundoff"]


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
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    if actual.device != expected.device:
        return f"device {actual.device}, expected {expected.device}"
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
