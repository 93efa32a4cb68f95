"""torch's TF32 rule for fp32 convolutions, read and set without tripping over its two APIs.

torch >= 2.9 has per-backend, per-op settings (``torch.backends.cudnn.conv.fp32_precision``:
"tf32", "ieee", or "none" = inherit from ``torch.backends.cudnn.fp32_precision``, then from
``torch.backends.fp32_precision``) beside the legacy ``torch.backends.cudnn.allow_tf32``. Once
a program sets conv and RNN differently through the new API, merely *reading* the legacy flag
raises RuntimeError, so the library reads the conv setting itself.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch


def _new_api() -> bool:
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def conv_allows_tf32() -> bool:
    """True when torch runs fp32 convolutions on TF32 tensor cores (its default)."""
    if not _new_api():
        return bool(torch.backends.cudnn.allow_tf32)
    b = torch.backends
    for p in (b.cudnn.conv.fp32_precision, getattr(b.cudnn, "fp32_precision", "none"),
              getattr(b, "fp32_precision", "none")):
        if p in ("tf32", "ieee"):
            return p == "tf32"
    return False  # "none" all the way up: what the legacy allow_tf32 = False leaves behind


def key(device_type: str) -> Tuple[object, ...]:
    """The settings a convolution's result and speed depend on, for caching per setting: on CUDA
    whether fp32 convolutions may use TF32; on the CPU oneDNN's fp32 precision and the number
    of threads (which changes which kernel is fastest)."""
    if device_type == "cuda":
        return ("tf32" if conv_allows_tf32() else "ieee",)
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "conv", None)
    return (getattr(mkldnn, "fp32_precision", "none"), torch.get_num_threads())


def _state() -> Optional[Tuple[str, ...]]:
    if not _new_api():
        return None
    b = torch.backends
    return (b.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision,
            b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision)


def _restore(state: Tuple[str, ...]) -> None:
    b = torch.backends
    (b.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision,
     b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision) = state


def _legacy() -> Optional[Tuple[bool, bool]]:
    """(matmul, cudnn) legacy allow_tf32 flags, or None where torch refuses to read them."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # conv and RNN set apart through the new API
        return None


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Exact fp32 convolutions and matmuls inside; every setting as it was afterwards (the
    legacy flags, which torch also keeps apart from the per-op ones, then the per-op ones)."""
    legacy, state = _legacy(), _state()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
        if state is not None:
            _restore(state)
