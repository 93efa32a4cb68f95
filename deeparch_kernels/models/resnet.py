"""ResNet-18/34/50/101/152 built on torchvision's own ResNet class with the fused blocks, so the
modules, parameter names and state_dict keys are torchvision's.

``FusedResNet`` is torchvision's ResNet whose stem (conv1 + bn1 + ReLU) also runs as one fused
convolution in eval mode; its blocks are FusedBasicBlock / FusedBottleneck.
"""
from __future__ import annotations

from typing import Any, List, Type, Union

import torch
from torch import Tensor
from torchvision.models import (ResNet101_Weights, ResNet152_Weights, ResNet18_Weights,
                                ResNet34_Weights, ResNet50_Weights, WeightsEnum)
from torchvision.models.resnet import ResNet

from ..nn.blocks import FusedBasicBlock, FusedBottleneck
from ..nn.common import rebuild_as
from ..nn.folding import ConvBNFolding
from ..nn.sequential import set_backend
from . import _weights

__all__ = ["FusedResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


class FusedResNet(ConvBNFolding, ResNet):
    """torchvision's ResNet (same constructor and state_dict) with the stem's conv1 + bn1 + ReLU
    one fused_conv2d in eval mode. Build it with FusedBasicBlock / FusedBottleneck blocks;
    ``backend`` is set on every fused module (deeparch_kernels.nn.set_backend changes it)."""

    def __init__(self, block: Type[Union[FusedBasicBlock, FusedBottleneck]], layers: List[int],
                 *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(block, layers, *args, **kwargs)
        self._init_folding(backend)
        set_backend(self, backend)

    @classmethod
    def from_resnet(cls, model: ResNet, backend: str = "auto") -> "FusedResNet":
        """The fused ResNet holding ``model``'s own submodules (its blocks are not converted
        here: deeparch_kernels.fuse.fuse does both)."""
        fused = rebuild_as(cls, model)
        fused._init_folding(backend)
        return fused

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self._conv_bn("stem", x, self.conv1, self.bn1, relu=self.relu)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(block, layers, enum_cls: Type[WeightsEnum], weights, progress: bool, backend: str,
            **kwargs: Any) -> FusedResNet:
    weights = _weights.resolve(_weights.legacy_pretrained(kwargs, weights, enum_cls), enum_cls)
    _weights.set_num_classes(kwargs, weights)
    model = FusedResNet(block, layers, backend=backend, **kwargs)
    return _weights.load(model, weights, progress)


def resnet18(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> FusedResNet:
    """torchvision.models.resnet18 with fused kernels. ``weights``: None, a
    ResNet18_Weights member (or its name), a state_dict or a path to one; ``**kwargs`` go to
    torchvision's ResNet (num_classes, zero_init_residual, ...)."""
    return _resnet(FusedBasicBlock, [2, 2, 2, 2], ResNet18_Weights, weights, progress, backend, **kwargs)


def resnet34(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> FusedResNet:
    """torchvision.models.resnet34 with fused kernels (arguments as resnet18)."""
    return _resnet(FusedBasicBlock, [3, 4, 6, 3], ResNet34_Weights, weights, progress, backend, **kwargs)


def resnet50(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> FusedResNet:
    """torchvision.models.resnet50 with fused kernels (arguments as resnet18)."""
    return _resnet(FusedBottleneck, [3, 4, 6, 3], ResNet50_Weights, weights, progress, backend, **kwargs)


def resnet101(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> FusedResNet:
    """torchvision.models.resnet101 with fused kernels (arguments as resnet18)."""
    return _resnet(FusedBottleneck, [3, 4, 23, 3], ResNet101_Weights, weights, progress, backend, **kwargs)


def resnet152(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> FusedResNet:
    """torchvision.models.resnet152 with fused kernels (arguments as resnet18)."""
    return _resnet(FusedBottleneck, [3, 8, 36, 3], ResNet152_Weights, weights, progress, backend, **kwargs)
