"""``FusedBasicBlock`` and ``FusedBottleneck``: torchvision's ResNet blocks (same constructor,
submodules and state_dict) whose conv + BatchNorm (+ residual) + ReLU run as one fused_conv2d
each in eval mode (BatchNorm folded, see folding.py), and whose residual add + ReLU is one
add_relu in training. Usable as ``torchvision.models.ResNet(FusedBasicBlock, ...)``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .common import rebuild_as
from .folding import ConvBNFolding

__all__ = ["FusedBasicBlock", "FusedBottleneck"]


class _FusedBlock(ConvBNFolding):
    """What FusedBasicBlock and FusedBottleneck share: torchvision's block constructor plus
    ``backend=``, ``from_block`` (adopting an existing block's submodules), the repr."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, *, backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        self._init_folding(backend)

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto"):
        """The fused block holding ``block``'s own submodules (shared, not copied)."""
        fused = rebuild_as(cls, block)
        fused._init_folding(backend)
        return fused

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusedBasicBlock(_FusedBlock, BasicBlock):
    """torchvision's BasicBlock (same constructor, submodules and state_dict) with
    ``relu(bn1(conv1(x)))`` and ``relu(bn2(conv2(.)) + identity)`` each one fused_conv2d in eval
    mode (and the downsample's conv1x1 + BN folded), and the residual add + ReLU one add_relu in
    training. Usable as ``torchvision.models.ResNet(FusedBasicBlock, ...)``."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=self.relu)
        return self._conv_bn("conv2", out, self.conv2, self.bn2, relu=self.relu,
                             residual=lambda: self._shortcut(x))


class FusedBottleneck(_FusedBlock, Bottleneck):
    """torchvision's Bottleneck (same constructor, submodules and state_dict), fused as
    FusedBasicBlock: conv1 and conv2 (+BN+ReLU) one fused_conv2d each in eval mode, conv3 + BN +
    residual + ReLU one fused_conv2d. A conv2 with groups or dilation (ResNeXt, dilated ResNets)
    runs as torch's conv + BN."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=self.relu)
        out = self._conv_bn("conv2", out, self.conv2, self.bn2, relu=self.relu)
        return self._conv_bn("conv3", out, self.conv3, self.bn3, relu=self.relu,
                             residual=lambda: self._shortcut(x))
