"""Eval-mode BatchNorm after a convolution as a per-channel ``y * scale + shift``: what the fused
modules fold into a convolution's weight and bias (deeparch_kernels.nn.folding.FoldCache).

  schema      deeparch::bn_scale_shift(Tensor running_mean, Tensor running_var, Tensor? weight,
                                       Tensor? bias, Tensor? conv_bias, float eps)
                                       -> (Tensor scale, Tensor shift)
  cpu         csrc/cpu/bn_fold.cpp: one pass over the K channels, in one call (the eager fold
              check runs it for every (conv, BN) pair at every call: ~3 us instead of ~33 us
              for the five torch ops below)
  reference   ``bn_scale_shift`` below, torch ops, differentiable (traced graphs, other devices)

scale = weight / sqrt(running_var + eps), shift = bias + (conv_bias - running_mean) * scale, in
fp32 (fp64 for a float64 BatchNorm); a missing weight is 1, a missing bias or conv_bias 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from ._lib import lib

lib.define("bn_scale_shift(Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
           "Tensor? conv_bias, float eps) -> (Tensor, Tensor)")


def bn_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], conv_bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """The formula in torch ops (differentiable)."""
    wide = torch.promote_types(running_var.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(wide) + eps)
    if weight is not None:
        scale = scale * weight.to(wide)
    mean = running_mean.to(wide)
    centred = -mean if conv_bias is None else conv_bias.to(wide) - mean
    shift = centred * scale if bias is None else torch.addcmul(bias.to(wide), centred, scale)
    return scale, shift


@torch.library.register_fake("deeparch::bn_scale_shift")
def _fake(running_mean, running_var, weight, bias, conv_bias, eps):
    wide = torch.promote_types(running_var.dtype, torch.float32)
    return running_var.new_empty(running_var.shape, dtype=wide), running_var.new_empty(running_var.shape, dtype=wide)


def scale_shift(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], conv_bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """bn_scale_shift, in one C++ call for CPU tensors needing no gradient when the extension
    is built (same formula, same dtypes; values within an ulp of the torch ops')."""
    if running_var.device.type == "cpu" and _ext.cpu_reason() is None and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias, conv_bias))):
        return torch.ops.deeparch.bn_scale_shift.default(running_mean, running_var, weight, bias, conv_bias, eps)
    return bn_scale_shift(running_mean, running_var, weight, bias, conv_bias, eps)
