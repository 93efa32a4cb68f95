"""The ``deeparch`` torch.library namespace and the argument helpers the op files share."""
from __future__ import annotations

import operator
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch._prims_common import suggest_memory_format

lib = torch.library.Library("deeparch", "DEF")  # noqa: TOR901 - schemas are defined in Python

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

# The dtypes our kernels (cpu, cuda, triton) take; stock PyTorch (aten, reference) runs the rest.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Message = Union[str, Callable[[], str]]


def check(cond, op: str, msg: Message, exc=ValueError) -> None:
    """Raise ``exc`` with '<op>: <msg>' unless cond. ``msg`` may be a callable, formatted only
    when the check fails (so that a passing check builds no string from symbolic shapes)."""
    if not cond:
        raise exc(f"{op}: {msg() if callable(msg) else msg}")


def fx_proxy(*args):
    """The torch.fx Proxy among args (symbolic_trace is tracing the caller), or None."""
    for a in args:
        if isinstance(a, torch.fx.Proxy):
            return a
    return None


def check_dense(op: str, t: torch.Tensor, name: str) -> None:
    """Nested and sparse tensors: a clear refusal instead of an internal error."""
    check(not t.is_nested, op, lambda: f"{name} is a nested tensor; pass each component as a "
          "dense tensor (or torch.nested.to_padded_tensor)", TypeError)
    check(t.layout == torch.strided, op, lambda: f"{name} has layout {t.layout}; only dense "
          "(strided) tensors are supported: convert with .to_dense()", TypeError)


def int_pair(v, op: str, name: str) -> Tuple[int, int]:
    """An int or a sequence of one or two ints (anything with ``__index__``: Python and numpy
    ints, 0-d integer tensors), as torch.nn.functional.conv2d takes them, as a pair."""
    try:
        return (operator.index(v),) * 2
    except TypeError:
        pass
    try:
        items = [operator.index(i) for i in v]
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a sequence of 1 or 2 ints, got {v!r}") from None
    check(len(items) in (1, 2), op, lambda: f"{name} must have 1 or 2 values, got {len(items)}: {v!r}")
    return (items[0], items[-1])


def output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format torch's conv2d gives its output: channels_last when x or weight
    suggests it (``Tensor.suggest_memory_format``, as ATen's convolution decides), else
    contiguous. csrc/common.h applies the same rule."""
    cl = torch.channels_last
    return cl if _suggests_channels_last(x) or _suggests_channels_last(weight) else torch.contiguous_format


# (shape, strides) -> suggest_memory_format(t) == channels_last: torch's Python rule costs ~1.5 us
# a tensor, and every fused layer asks it several times a call. Bounded; eager only (traced code
# and symbolic shapes ask torch's rule).
_SUGGESTS_CL: Dict[tuple, bool] = {}


def _suggests_channels_last(t: torch.Tensor) -> bool:
    if t.layout != torch.strided:
        return False
    if torch.compiler.is_compiling():  # (a lookup by shape would specialise symbolic sizes)
        return suggest_memory_format(t) == torch.channels_last
    try:
        key = (t.shape, t.stride())
        hit = _SUGGESTS_CL.get(key)
    except TypeError:  # symbolic sizes or strides
        return suggest_memory_format(t) == torch.channels_last
    if hit is None:
        if len(_SUGGESTS_CL) >= 4096:
            _SUGGESTS_CL.clear()
        hit = _SUGGESTS_CL[key] = suggest_memory_format(t) == torch.channels_last
    return hit


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one block of memory with no gaps or overlaps, in some dim
    order (what a flat kernel can walk): the strides, sorted, are the running product of sizes."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_OVERLAP_MSG = ("unsupported operation: some elements of the input tensor and the written-to "
                "tensor refer to a single memory location. Please clone() the tensor before "
                "performing the operation.")
_INTERNAL_MSG = ("unsupported operation: more than one element of the written-to tensor refers "
                 "to a single memory location. Please clone() the tensor before performing the "
                 "operation.")


def check_inplace_overlap(op: str, out: torch.Tensor, other: torch.Tensor) -> None:
    """torch's rule for an in-place write of ``out`` that reads ``other`` (ATen's
    assert_no_internal_overlap + assert_no_partial_overlap, MemoryOverlap.cpp): refuse an
    ``out`` whose elements share memory (a stride-0 dimension), and an ``other`` that overlaps
    ``out`` partially (the very same view is fine: each element is read before it is written).
    Where ATen can't tell cheaply (strided views) it does not refuse, and neither does this; our
    kernels then compute densely and copy back, which is safe."""
    if out.numel() <= 1:
        return
    if any(st == 0 and sz > 1 for sz, st in zip(out.shape, out.stride())):
        raise RuntimeError(f"{op}: {_INTERNAL_MSG}")
    if other.numel() == 0 or out.device != other.device:
        return
    if not (is_non_overlapping_and_dense(out) and is_non_overlapping_and_dense(other)):
        return
    if out.untyped_storage().data_ptr() != other.untyped_storage().data_ptr():
        return
    a0, b0 = out.data_ptr(), other.data_ptr()
    a1, b1 = a0 + out.numel() * out.element_size(), b0 + other.numel() * other.element_size()
    if a0 == b0 and a1 == b1:
        if out.stride() != other.stride():
            raise RuntimeError(f"{op}: {_OVERLAP_MSG}")
        return
    if a0 < b1 and b0 < a1:
        raise RuntimeError(f"{op}: {_OVERLAP_MSG}")


def cpu_kernel_inputs(x: torch.Tensor, residual: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """(x, residual, bias) in the layouts our C++ CPU conv kernels (winograd, gemm) take:
    channels_last x and residual, a contiguous bias; each copied only where it is not so already."""
    cl = torch.channels_last
    if not x.is_contiguous(memory_format=cl):
        x = x.contiguous(memory_format=cl)
    if residual is not None and not residual.is_contiguous(memory_format=cl):
        residual = residual.contiguous(memory_format=cl)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return x, residual, bias


def cpu_kernel_output(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """An empty (N, out_channels, H, W) tensor like the one our C++ CPU conv kernels (winograd,
    gemm) allocate for their output: x's dtype and device, channels_last (their fakes use it)."""
    return torch.empty((x.shape[0], out_channels, x.shape[2], x.shape[3]), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)
