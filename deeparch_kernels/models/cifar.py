"""CIFAR-style plain and residual nets of the ResNet paper (He et al. 2015, section 4.2), made of
the fused modules: torchvision has none.

    net = cifar_resnet(56)                      # ResNet-56, option-A shortcuts
    net = cifar_resnet(56, plain=True)          # its plain twin: the same parameters, no shortcuts
    net = resnet20(); net = plain56(in_channels=1)

Architecture (depth = 6n + 2): a 3x3 convolution with 16 channels + BN + ReLU (the stem), three
stages of n basic blocks with 16, 32 and 64 channels (the first block of the second and third
stages has stride 2), global average pooling and a linear classifier. Residual blocks are
FusedBasicBlock; where a block changes width and resolution its shortcut is option A (ShortcutA:
subsampled identity + zero channels, no parameters, so a plain net and its residual twin have
exactly the same parameters) or option B (torchvision's conv1x1 + BN). Plain blocks are
FusedPlainBlock. Initialisation is torchvision's ResNet's (He normal, fan_out, for the
convolutions; BN weight 1, bias 0; torch's default for the classifier).

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``-``layer3``, ``fc``), and
the stem's conv + BN + ReLU runs as one fused convolution in eval mode as in FusedResNet.
``norm_layer=torch.nn.Identity`` builds the net without normalisation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..nn.cifar import FusedPlainBlock, ShortcutA
from ..nn.blocks import FusedBasicBlock
from ..nn.common import check_backend_name
from ..nn.folding import ConvBNFolding
from ..nn.sequential import set_backend

__all__ = ["CifarResNet", "cifar_resnet", "plain20", "plain32", "plain44", "plain56", "plain110",
           "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

WIDTHS = (16, 32, 64)


class CifarResNet(ConvBNFolding, nn.Module):
    """The ResNet paper's CIFAR net with ``n`` blocks per stage (depth ``6n + 2``); see the module
    docstring. ``plain=True``: no shortcuts. ``shortcut``: "A" or "B" (residual nets only)."""

    def __init__(self, n: int, *, plain: bool = False, shortcut: str = "A",
                 norm_layer: Optional[Callable[[int], nn.Module]] = None, num_classes: int = 10,
                 in_channels: int = 3, zero_init_residual: bool = False, backend: str = "auto") -> None:
        super().__init__()
        for name, v in (("n", n), ("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CifarResNet: {name} must be a positive int, got {v!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: shortcut must be 'A' (zero-padding identity) or 'B' "
                             f"(conv1x1 + BN projection), got {shortcut!r}")
        check_backend_name(backend)
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.plain, self.shortcut = plain, shortcut
        self.inplanes = WIDTHS[0]
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)  # the stem's, as torchvision's ResNet (fused in eval mode)
        self.layer1 = self._make_layer(WIDTHS[0], n, 1, norm_layer, backend)
        self.layer2 = self._make_layer(WIDTHS[1], n, 2, norm_layer, backend)
        self.layer3 = self._make_layer(WIDTHS[2], n, 2, norm_layer, backend)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(WIDTHS[2], num_classes)

        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual and not plain:
            for m in self.modules():
                if isinstance(m, FusedBasicBlock) and getattr(m.bn2, "weight", None) is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        self._init_folding(backend)
        set_backend(self, backend)

    def _make_layer(self, planes: int, blocks: int, stride: int, norm_layer, backend: str) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            if self.plain:
                layers.append(FusedPlainBlock(self.inplanes, planes, s, norm_layer=norm_layer,
                                              backend=backend))
            else:
                downsample = None
                if s != 1 or self.inplanes != planes:
                    if self.shortcut == "A":
                        downsample = ShortcutA(self.inplanes, planes, s)
                    else:
                        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, s, bias=False),
                                                   norm_layer(planes))
                layers.append(FusedBasicBlock(self.inplanes, planes, s, downsample,
                                              norm_layer=norm_layer, backend=backend))
            self.inplanes = planes
        return nn.Sequential(*layers)

    @property
    def depth(self) -> int:
        return 6 * len(self.layer1) + 2

    def forward(self, x: Tensor) -> Tensor:
        x = self._conv_bn("stem", x, self.conv1, self.bn1, relu=self.relu)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        kind = "plain" if self.plain else f"residual, shortcut {self.shortcut!r}"
        return f"depth={self.depth}, {kind}, backend={self.backend!r}"


def cifar_resnet(depth: int, *, plain: bool = False, shortcut: str = "A",
                 norm_layer: Optional[Callable[[int], nn.Module]] = None, num_classes: int = 10,
                 in_channels: int = 3, zero_init_residual: bool = False,
                 backend: str = "auto") -> CifarResNet:
    """The ResNet paper's CIFAR net of ``depth`` layers (6n + 2: 20, 32, 44, 56, 110, ...):
    residual (FusedBasicBlock, option-A shortcuts by default) or ``plain=True`` (FusedPlainBlock).
    ``norm_layer`` defaults to BatchNorm2d (``torch.nn.Identity``: none)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, "
                         f"110, ...), got {depth!r}")
    return CifarResNet((depth - 2) // 6, plain=plain, shortcut=shortcut, norm_layer=norm_layer,
                       num_classes=num_classes, in_channels=in_channels,
                       zero_init_residual=zero_init_residual, backend=backend)


def _named(depth: int, plain: bool):
    kind = "plain" if plain else "resnet"

    def build(**kwargs) -> CifarResNet:
        return cifar_resnet(depth, plain=plain, **kwargs)

    build.__name__ = build.__qualname__ = f"{kind}{depth}"
    build.__doc__ = (f"{'Plain' if plain else 'ResNet'}-{depth} of the ResNet paper's CIFAR "
                     f"experiments: ``cifar_resnet({depth}{', plain=True' if plain else ''}, **kwargs)``.")
    return build


resnet20, resnet32, resnet44, resnet56, resnet110 = (_named(d, False) for d in (20, 32, 44, 56, 110))
plain20, plain32, plain44, plain56, plain110 = (_named(d, True) for d in (20, 32, 44, 56, 110))
