"""1x1 stride-1 convolutions on the CPU as one GEMM (the ``gemm`` backend of fused_conv2d): fp32,
channels_last, padding 0; the kernel is csrc/cpu/gemm_conv.cpp (the 6x16 micro-kernel it shares
with the Winograd kernel), this file holds its op schema and the weight packing.

A channels_last x is the GEMM's (N*H*W) x C matrix as it lies in memory and the output's rows
are channels_last pixels, so nothing is copied or reordered per call; the weight is packed once
into 16-channel panels. Bias, residual and the NaN-keeping ReLU are applied before the one store
of each output (oneDNN's convolution is followed by a separate ReLU pass, since its fused ReLU
turns NaN into 0). The sum is a plain fp32 dot product, as oneDNN's, so NaN and Inf propagate as
through any direct convolution.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._lib import cpu_kernel_inputs, cpu_kernel_output, lib

lib.define("conv1x1_gemm(Tensor x, Tensor u, Tensor? bias, Tensor? residual, int k, bool relu) -> Tensor")


@torch.library.register_fake("deeparch::conv1x1_gemm")
def _fake(x, u, bias, residual, k, relu):
    return cpu_kernel_output(x, k)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (K, C, 1, 1) weight as the kernel's (ceil(K/16), C, 16) fp32 panels, zero-padded in K."""
    k, c = weight.shape[0], weight.shape[1]
    kp = -(-k // 16) * 16
    w = torch.nn.functional.pad(weight.detach().reshape(k, c).to(torch.float32), (0, 0, 0, kp - k))
    return w.reshape(kp // 16, 16, c).transpose(1, 2).contiguous()


def conv1x1(x: torch.Tensor, u: torch.Tensor, out_channels: int, bias: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """relu?(conv2d(x, w, bias) + residual) for a 1x1 stride-1 fp32 w packed as u = pack_weight(w)."""
    x, residual, bias = cpu_kernel_inputs(x, residual, bias)
    return torch.ops.deeparch.conv1x1_gemm.default(x, u, bias, residual, out_channels, relu)
