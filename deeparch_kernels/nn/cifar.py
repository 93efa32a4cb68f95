"""The two module kinds the CIFAR-style nets of the ResNet paper (section 4.2) need beyond
torchvision's blocks:

  ShortcutA         option A of the paper: a parameter-free shortcut for a block that changes
                    resolution or width. The identity subsampled with the block's stride
                    (``x[:, :, ::s, ::s]``) and widened with zero channels appended after the
                    input's, so ``FusedBasicBlock(..., downsample=ShortcutA(...))`` has exactly
                    the parameters of the plain block beside it. (Option B is torchvision's
                    ``Sequential(conv1x1, BatchNorm2d)``, which FusedBasicBlock already folds.)
  FusedPlainBlock   FusedBasicBlock without its shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``,
                    the building block of the paper's "plain" nets. Same constructor, submodules
                    and state_dict as FusedBasicBlock (no ``downsample``); in eval mode each
                    conv + BN + ReLU is one fused_conv2d (BN folded), in training BN runs as
                    torch's module.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import FusedBasicBlock
from .common import is_channels_last

__all__ = ["FusedPlainBlock", "ShortcutA"]


class ShortcutA(nn.Module):
    """``x[:, :, ::stride, ::stride]`` with ``out_channels - in_channels`` zero channels appended:
    the ResNet paper's option-A shortcut (no parameters, no buffers)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ShortcutA: {name} must be a positive int, got {v!r}")
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA: out_channels ({out_channels}) < in_channels ({in_channels}): "
                             "option A only pads channels with zeros, it never drops any")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        torch._check(x.dim() == 4 and x.shape[1] == self.in_channels,
                     lambda: f"ShortcutA: expected an (N, {self.in_channels}, H, W) input, "
                             f"got shape {tuple(x.shape)}")
        channels_last = is_channels_last(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        extra = self.out_channels - self.in_channels
        y = F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x
        # the input's layout (the strided view of a channels_last tensor may not keep it)
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class FusedPlainBlock(FusedBasicBlock):
    """FusedBasicBlock with no shortcut (the ResNet paper's plain-net block). Same constructor
    and state_dict; ``downsample`` must be None (the block's conv1 carries stride and width)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, *, backend: str = "auto") -> None:
        if downsample is not None:
            raise ValueError("FusedPlainBlock has no shortcut, so no downsample: pass "
                             "downsample=None (use FusedBasicBlock for a residual block)")
        super().__init__(inplanes, planes, stride, None, groups, base_width, dilation, norm_layer,
                         backend=backend)

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto") -> "FusedPlainBlock":
        if getattr(block, "downsample", None) is not None:
            raise ValueError("FusedPlainBlock.from_block: the block has a downsample, which a plain "
                             "block would drop; convert it to FusedBasicBlock instead")
        return super().from_block(block, backend)

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=self.relu)
        return self._conv_bn("conv2", out, self.conv2, self.bn2, relu=self.relu)
