"""VGG-11/13/16/19 (with and without BatchNorm) on torchvision's own VGG class, with the same
``features.N`` indices and state_dict keys as torchvision:

  without BN   each Conv2d + ReLU pair is FusedConvReLU2d + nn.Identity (one fused_conv2d)
  with BN      ``features`` is a FusedSequential of torch's Conv2d, BatchNorm2d, ReLU: each triple
               is one fused_conv2d (BN folded) in eval mode and torch's modules in training
  classifier   torchvision's, its ReLUs ExactReLU (nn/relu.py: NaN kept under torch.compile)
"""
from __future__ import annotations

from typing import Any, Dict, List, Type, Union

from torch import nn
from torchvision.models import (VGG11_BN_Weights, VGG11_Weights, VGG13_BN_Weights, VGG13_Weights,
                                VGG16_BN_Weights, VGG16_Weights, VGG19_BN_Weights, VGG19_Weights,
                                WeightsEnum)
from torchvision.models.vgg import VGG

from ..nn.conv import FusedConvReLU2d
from ..nn.relu import exact_relus_after_linears
from ..nn.sequential import FusedSequential
from . import _weights

__all__ = ["make_layers", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
           "vgg19_bn"]

# The configurations of the VGG paper (torchvision's cfgs): output channels, "M" = 2x2 max-pool.
CFGS: Dict[str, List[Union[str, int]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512,
          512, 512, "M"],
}


def make_layers(cfg: List[Union[str, int]], batch_norm: bool = False,
                backend: str = "auto") -> nn.Sequential:
    """torchvision.models.vgg.make_layers with fused convolutions; same modules at the same
    indices (and the same random initialisation order)."""
    layers: List[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif batch_norm:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1),
                       nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
        else:
            layers += [FusedConvReLU2d(in_channels, int(v), kernel_size=3, padding=1,
                                       backend=backend), nn.Identity()]
        if v != "M":
            in_channels = int(v)
    if batch_norm:
        return FusedSequential(*layers, backend=backend)
    return nn.Sequential(*layers)


def _vgg(cfg: str, batch_norm: bool, enum_cls: Type[WeightsEnum], weights, progress: bool,
         backend: str, **kwargs: Any) -> VGG:
    weights = _weights.resolve(_weights.legacy_pretrained(kwargs, weights, enum_cls), enum_cls)
    if weights is not None:
        kwargs["init_weights"] = False
    _weights.set_num_classes(kwargs, weights)
    model = VGG(make_layers(CFGS[cfg], batch_norm, backend), **kwargs)
    exact_relus_after_linears(model.classifier)  # NaN kept under torch.compile (nn/relu.py)
    return _weights.load(model, weights, progress)


def vgg11(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg11 with fused kernels. ``weights``: None, a VGG11_Weights member
    (or its name), a state_dict or a path to one; ``**kwargs`` go to torchvision's VGG
    (num_classes, init_weights, dropout)."""
    return _vgg("A", False, VGG11_Weights, weights, progress, backend, **kwargs)


def vgg11_bn(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg11_bn with fused kernels (arguments as vgg11)."""
    return _vgg("A", True, VGG11_BN_Weights, weights, progress, backend, **kwargs)


def vgg13(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg13 with fused kernels (arguments as vgg11)."""
    return _vgg("B", False, VGG13_Weights, weights, progress, backend, **kwargs)


def vgg13_bn(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg13_bn with fused kernels (arguments as vgg11)."""
    return _vgg("B", True, VGG13_BN_Weights, weights, progress, backend, **kwargs)


def vgg16(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg16 with fused kernels (arguments as vgg11)."""
    return _vgg("D", False, VGG16_Weights, weights, progress, backend, **kwargs)


def vgg16_bn(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg16_bn with fused kernels (arguments as vgg11)."""
    return _vgg("D", True, VGG16_BN_Weights, weights, progress, backend, **kwargs)


def vgg19(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg19 with fused kernels (arguments as vgg11)."""
    return _vgg("E", False, VGG19_Weights, weights, progress, backend, **kwargs)


def vgg19_bn(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> VGG:
    """torchvision.models.vgg19_bn with fused kernels (arguments as vgg11)."""
    return _vgg("E", True, VGG19_BN_Weights, weights, progress, backend, **kwargs)
