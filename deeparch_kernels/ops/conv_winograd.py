"""Winograd F(2x2, 3x3) convolution for the CPU, in torch ops: 3x3, stride 1, padding 1, fp32,
channels_last. It multiplies 2.25x less than a direct convolution (16 products per 2x2 outputs
and input channel instead of 36), so it can be faster than oneDNN's direct convolution where that
one runs at the FMA peak (VGG's and ResNet's large layers), and its rounding error is below the
direct one's (the transforms' coefficients are 0, +-1/2, +-1).

  U = G g G^T      per (output, input) channel, once per weight   (transform_weight)
  V = B^T d B      per 4x4 input tile (stride 2) and input channel (two strided passes)
  M = V U          16 batched GEMMs: (tiles x C) @ (C x K)          (torch.bmm: MKL/oneDNN)
  Y = A^T M A      per tile: its 2x2 outputs (two passes, the second writes the output)

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), F(2x2, 3x3).

NaN and Inf: a non-finite input spreads over its whole 4x4 tile here, where a direct convolution
keeps it to the outputs whose window holds it; and the two orders of summation could overflow at
different places. ``conv3x3`` therefore runs only when the input is finite and small enough that
neither can overflow (``safe``: one max-abs reduction over the input); the caller runs the direct
convolution otherwise, so NaN and Inf come out exactly as torch gives them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# F(2x2, 3x3): y = A^T [(G g G^T) * (B^T d B)] A
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# |x| * (largest L1 norm of a filter) below this: no partial sum of either method can overflow
# (Winograd's intermediates are at most 16x the direct ones': 4x in V, 4x in U).
_SAFE = 1e30


def transform_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(U, bound): U = G g G^T as a (16, C, K) fp32 tensor (computed in float64), and the
    largest L1 norm of a filter (for ``safe``; inf when a weight is not finite)."""
    g = torch.tensor(_G, dtype=torch.float64)
    w = weight.detach().to(torch.float64)
    u = torch.einsum("ai,kcij,bj->abck", g, w, g)
    K, C = weight.shape[0], weight.shape[1]
    l1 = float(w.abs().sum(dim=(1, 2, 3)).max()) if w.numel() else 0.0
    if not torch.isfinite(w).all():
        l1 = float("inf")
    return u.reshape(16, C, K).to(torch.float32).contiguous(), l1


def safe(x: torch.Tensor, bound: float) -> bool:
    """x is finite and small enough that neither summation order can overflow (see above)."""
    m = float(x.abs().amax())  # NaN if x holds a NaN (then the comparison is False)
    return m * bound < _SAFE


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor],
            residual: Optional[torch.Tensor]) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) (+ residual) for x (N, C, H, W) fp32 channels_last and
    u = transform_weight(g)[0]; the output is channels_last."""
    N, C, H, W = x.shape
    K = u.shape[2]
    Th, Tw = (H + 1) // 2, (W + 1) // 2
    T = N * Th * Tw
    xh = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous for channels_last
    # The zero-padded input, (N, 2Th+2, 2Tw+2, C): border zeroed, interior copied.
    xp = x.new_empty(N, 2 * Th + 2, 2 * Tw + 2, C)
    xp[:, 0].zero_()
    xp[:, H + 1:].zero_()
    xp[:, 1:H + 1, 0].zero_()
    xp[:, 1:H + 1, W + 1:].zero_()
    xp[:, 1:H + 1, 1:W + 1].copy_(xh)
    # Rows: t_a = sum_i B^T[a, i] d_i over the tile's rows i (rows 2t + i of xp).
    r = [xp[:, i:i + 2 * Th:2] for i in range(4)]  # (N, Th, 2Tw+2, C) views
    t = (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])
    # Columns: V[a, b] = sum_j B^T[b, j] t_a[..., j]; written straight into V.
    v = x.new_empty(16, T, C)
    for a in range(4):
        c = [t[a][:, :, j:j + 2 * Tw:2] for j in range(4)]  # (N, Th, Tw, C) views
        out = [v[4 * a + b].view(N, Th, Tw, C) for b in range(4)]
        torch.sub(c[0], c[2], out=out[0])
        torch.add(c[1], c[2], out=out[1])
        torch.sub(c[2], c[1], out=out[2])
        torch.sub(c[1], c[3], out=out[3])
    m = torch.bmm(v, u)  # (16, T, K)
    if bias is not None:
        m[5].add_(bias)  # A^T[r, 1] = A^T[s, 1] = 1 for every r, s: M[1, 1] reaches every output
    m = m.view(4, 4, N, Th, Tw, K)
    # Rows of A^T: p_r = sum_a A^T[r, a] M[a]; then columns, into the output's strided views.
    p = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])  # each (4, N, Th, Tw, K)
    y = x.new_empty(N, 2 * Th, 2 * Tw, K)
    for rr in range(2):
        q = p[rr]
        torch.add(q[0] + q[1], q[2], out=y[:, rr::2, 0::2])
        torch.sub(q[1] - q[2], q[3], out=y[:, rr::2, 1::2])
    if 2 * Th != H or 2 * Tw != W:
        y = y[:, :H, :W].contiguous()
    y = y.permute(0, 3, 1, 2)  # (N, K, H, W), channels_last
    if residual is not None:
        y.add_(residual)
    return y
