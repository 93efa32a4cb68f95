"""Fused residual add + ReLU in Triton: ``out = relu(x + identity)``, one pass.

Memory-bound (3 * n * itemsize bytes): each program streams one BLOCK of contiguous elements,
in fp32, with 64-bit offsets. The ReLU keeps NaN (``where(v < 0, 0, v)``), as torch.relu does.
Loads are widened to fp32 right away: that is also what makes bf16 exact in the CPU interpreter.
"""
import torch
import triton
import triton.language as tl

from ._common import cast_out, exact_bf16, wrap_triton


@triton.jit
def add_relu_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    a = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    v = a + b
    v = tl.where(v < 0.0, 0.0, v)
    tl.store(out_ptr + offs, cast_out(v, out_ptr, EXACT_BF16), mask=mask)


def _block(n: int, device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":  # the CPU interpreter: few, large programs
        return 8192, 4
    return (4096, 8) if n >= (1 << 22) else (1024, 4)


def add_relu(x: torch.Tensor, identity: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes relu(x + identity) into ``out``. All three must share one dense layout (the op
    layer arranges it); ``out`` may alias ``x`` (elementwise, each element read before written)."""
    n = out.numel()
    if n == 0:
        return out
    block, warps = _block(n, out.device)
    grid = (triton.cdiv(n, block),)
    wrap_triton(add_relu_kernel)[grid](x, identity, out, n, BLOCK=block,
                                       EXACT_BF16=exact_bf16(out.dtype), num_warps=warps)
    return out
