"""Helpers shared by the Triton kernels.

Triton's CPU interpreter (TRITON_INTERPRET=1) holds bf16 as raw uint16: arithmetic must be done
after ``.to(tl.float32)``, and its fp32 -> bf16 conversion truncates instead of rounding to
nearest even. ``cast_out`` does the rounding by hand there, so interpreter results are
bit-identical to the GPU's; on the GPU it is the plain conversion.
"""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def wrap_triton(kernel):
    """torch.library.wrap_triton, except for the kernels of Triton's CPU interpreter: under
    TRITON_INTERPRET=1 ``@triton.jit`` makes an InterpretedFunction, which torch <= 2.11's
    wrap_triton rejects ("only works on functions annotated with triton.jit"); torch >= 2.12
    returns it unchanged, as this does on every version. GPU kernels are wrapped as usual, so
    torch.compile sees into the triton_op."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


def exact_bf16(dtype: torch.dtype) -> bool:
    """The constexpr for cast_out: round bf16 by hand (interpreter only)."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def _to_bf16_rne(v):
    u = v.to(tl.uint32, bitcast=True)
    r = u + 0x7FFF + ((u >> 16) & 1)  # round to nearest, ties to even
    r = tl.where(v != v, u | 0x400000, r)  # NaN stays a (quiet) NaN
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_out(v, out_ptr, EXACT_BF16: tl.constexpr):
    """fp32 ``v`` converted to out_ptr's element type, rounded to nearest even."""
    if EXACT_BF16:
        return _to_bf16_rne(v)
    else:
        return v.to(out_ptr.dtype.element_ty)
