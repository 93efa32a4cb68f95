"""Winograd F(m x m, 3x3) convolution for the CPU (the ``winograd`` backend of fused_conv2d): 3x3,
stride 1, padding 1, fp32, channels_last; the kernel is csrc/cpu/winograd.cpp, this file holds
its op schema, the weight transform and the choice of m.

  m = 4: 6x6 input tiles, 36 products per 16 outputs and input channel (4x fewer than a direct
         convolution's 144), on the points 0, +-3/2, +-2/3, inf (fp32 error ~2x the direct
         convolution's; the usual 0, +-1, +-2 give ~8x)
  m = 2: 4x4 tiles, 16 products per 4 outputs (2.25x fewer), for the layers with few tiles,
         where reading m = 4's transformed weight (4x the weight; m = 2's: 1.8x) costs more
         than the products it saves (``tile``)

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).

NaN and Inf: a non-finite input spreads over its whole tile here, where a direct convolution
keeps it to the outputs whose window holds it; and the two orders of summation could overflow at
different places. The kernel therefore finishes only when the input is finite and small enough
that neither can overflow (max|x| * the largest L1 norm of a filter < 1e30, checked while it
reads x); ``conv3x3`` returns None otherwise and the caller runs the direct convolution, so NaN
and Inf come out exactly as torch gives them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._lib import cpu_kernel_inputs, cpu_kernel_output, lib

lib.define("winograd_conv3x3(Tensor x, Tensor u, Tensor? bias, Tensor? residual, int k, bool relu, "
           "int tile, float bound) -> (Tensor, bool)")


@torch.library.register_fake("deeparch::winograd_conv3x3")
def _fake(x, u, bias, residual, k, relu, tile, bound):
    """The output's metadata, as the kernel allocates it (channels_last, x's dtype and device).
    ``ok`` depends on x's values, which a fake tensor has not: the fake says the kernel finished
    (its output is then the convolution's, with exactly this metadata); where it would not,
    ``conv3x3``'s caller runs the direct convolution, whose output has the same metadata."""
    torch._check(tile in (2, 4), lambda: f"winograd_conv3x3: tile must be 2 or 4, got {tile}")
    return cpu_kernel_output(x, k), True

# G of F(m x m, 3x3), exact (the kernel's B^T and A^T are on the same points): U = G g G^T.
_G = {
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    4: ((1, 0, 0), (8 / 65, 12 / 65, 18 / 65), (8 / 65, -12 / 65, 18 / 65),
        (-81 / 130, -27 / 65, -18 / 65), (-81 / 130, 27 / 65, -18 / 65), (0, 0, 1)),
}
# The tile size: the GEMMs M = V U cost about (m+2)^2 * max(T, _U_BOUND_ROWS) per (C, K) pair,
# T the tiles (rounded up to the micro-kernel's 6 rows): with fewer than ~40 tile rows they wait
# on streaming U from memory (in a model the previous layers have evicted it) rather than on the
# FMAs. Measured here (2-core AVX-512 EPYC) it picks the faster of F(2x2) and F(4x4) on ResNet's
# layers with caches flushed between calls (batch 1: m = 4 for 64@56x56 and 128@28x28, m = 2 for
# 256@14x14 and 512@7x7; batch 8: m = 4 for 64@56x56, 128@28x28, 256@14x14), and on 512@14x14
# (m = 2) and 512@28x28 (m = 4) at batch 1 and 512@7x7 at batch 8 (m = 4) with warm caches.
_U_BOUND_ROWS = 40
class Transformed(NamedTuple):
    """A weight's transform for one tile size: ``u`` packed for the kernel's GEMM,
    (m+2)^2 x ceil(K/16) x C x 16 fp32; ``bound`` the largest L1 norm of a filter (inf when
    a weight is not finite: then the kernel never runs)."""
    u: torch.Tensor
    bound: float
    tile: int
    out_channels: int


def tile(x_shape) -> int:
    """m for an input of this shape (N, C, H, W): the cheaper by the cost above."""
    n, _, h, w = x_shape

    def cost(m: int) -> int:
        rows = -(-n * -(-h // m) * -(-w // m) // 6) * 6
        return (m + 2) ** 2 * max(rows, _U_BOUND_ROWS)

    return 4 if cost(4) <= cost(2) else 2


def transform_weight(weight: torch.Tensor, m: int) -> Transformed:
    """U = G g G^T for F(m x m, 3x3), computed in float64, packed for the kernel."""
    g = torch.tensor(_G[m], dtype=torch.float64)
    w = weight.detach().to(torch.float64)
    k, c = weight.shape[0], weight.shape[1]
    a = m + 2
    kp = -(-k // 16) * 16
    u = torch.einsum("ai,kcij,bj->abck", g, w, g)  # (a, a, C, K)
    u = torch.nn.functional.pad(u, (0, kp - k)).reshape(a * a, c, kp // 16, 16)
    u = u.permute(0, 2, 1, 3).to(torch.float32).contiguous()
    bound = float(w.abs().sum(dim=(1, 2, 3)).max()) if w.numel() else 0.0
    if not bool(torch.isfinite(w).all()):
        bound = float("inf")
    return Transformed(u, bound, m, k)


def conv3x3(x: torch.Tensor, t: Transformed, bias: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], relu: bool) -> Optional[torch.Tensor]:
    """relu?(conv2d(x, g, bias, padding=1) + residual) for fp32 x and t = transform_weight(g, m),
    channels_last; None when x is not finite or too large (see above): run the direct one."""
    if t.bound == float("inf"):
        return None
    x, residual, bias = cpu_kernel_inputs(x, residual, bias)
    y, ok = torch.ops.deeparch.winograd_conv3x3.default(x, t.u, bias, residual, t.out_channels, relu,
                                                        t.tile, t.bound)
    return y if ok else None
