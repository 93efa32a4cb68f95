"""fused_conv2d's argument rules in Python: one function, worded as csrc/conv_args.cpp (the C++
kernels' TORCH_CHECKs), shared by the public function (ops/conv.py, after it has normalised its
arguments) and the raw Triton launcher (triton/conv.py, which tests and benchmarks call
directly). What only one of them has stays there: the public function's unbatched inputs,
floating-point check and residual broadcasting; the launcher's dtypes, device and exact
residual.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .ops._lib import check, check_dense


def check_conv_args(op: str, x, weight, bias, residual, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int] = (1, 1),
                    groups: int = 1) -> Tuple[int, int, int, int]:
    """Raise (TypeError or ValueError, the message naming the argument) unless x (N, C, H, W),
    weight (K, C/groups, kh, kw), bias (K,) or None and residual (a tensor or None) are dense
    tensors on x's device, weight and bias in x's dtype, and stride, padding, dilation (pairs
    of ints) and groups make a convolution with at least one output pixel. Returns the output
    shape (N, K, Ho, Wo). The residual's dtype and shape are the caller's to check."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None and name in ("bias", "residual"):
            continue
        check(isinstance(t, torch.Tensor), op, lambda: f"{name} must be a tensor"
              f"{' or None' if name in ('bias', 'residual') else ''}, got {type(t).__name__}", TypeError)
        check_dense(op, t, name)
    check(x.dim() == 4, op, lambda: f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    check(weight.dim() == 4, op, lambda: f"weight must be 4-D (K, C/groups, kh, kw), got shape "
          f"{tuple(weight.shape)}")
    check(groups >= 1 and x.shape[1] % groups == 0 and weight.shape[0] % groups == 0, op,
          lambda: f"groups={groups} must be >= 1 and divide x's {x.shape[1]} channels and weight's "
                  f"{weight.shape[0]} output channels")
    check(stride[0] >= 1 and stride[1] >= 1, op, lambda: f"stride must be >= 1, got {tuple(stride)}")
    check(padding[0] >= 0 and padding[1] >= 0, op, lambda: f"padding must be >= 0, got {tuple(padding)}")
    check(dilation[0] >= 1 and dilation[1] >= 1, op, lambda: f"dilation must be >= 1, got {tuple(dilation)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None:
            check(t.device == x.device, op, lambda: f"{name} must be on x's device {x.device}, got {t.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check(t.dtype == x.dtype, op, lambda: f"{name} must have x's dtype {x.dtype}, got {t.dtype} "
                  "(as for conv2d; under autocast both are cast)", TypeError)
    check(weight.shape[1] * groups == x.shape[1], op,
          lambda: f"weight has {weight.shape[1]} input channels per group but x has {x.shape[1]} "
                  f"channels (groups={groups}): weight must be (K, C/groups, kh, kw)")
    N, _, H, W = x.shape
    K, _, kh, kw = weight.shape
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1  # the dilated kernel
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    check(Hp >= eh and Wp >= ew, op, lambda: f"the padded input ({Hp}x{Wp}) is smaller than the "
          f"kernel ({kh}x{kw}" + ("" if tuple(dilation) == (1, 1) else f", dilation {tuple(dilation)}") + ")")
    if bias is not None:
        check(tuple(bias.shape) == (K,), op, lambda: f"bias must have shape ({K},), got {tuple(bias.shape)}")
    return (N, K, (Hp - eh) // stride[0] + 1, (Wp - ew) // stride[1] + 1)


def expected_residual(op: str, residual: Optional[torch.Tensor], x: torch.Tensor,
                      out_shape: Sequence[int]) -> None:
    """The kernels' residual: x's dtype and the output's shape exactly (csrc/conv_args.cpp)."""
    if residual is None:
        return
    check(residual.dtype == x.dtype, op, lambda: f"residual must have x's dtype {x.dtype}, got "
          f"{residual.dtype}", TypeError)
    check(tuple(residual.shape) == tuple(out_shape), op, lambda: f"residual must have the output's "
          f"shape {tuple(out_shape)}, got {tuple(residual.shape)}")
