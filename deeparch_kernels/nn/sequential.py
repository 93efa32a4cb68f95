"""``FusedSequential``, and the per-model backend (``set_backend``, ``get_backends``).

``FusedSequential`` is an nn.Sequential that runs each Conv2d -> BatchNorm2d (-> ReLU) run of its
children as one fused convolution in eval mode (BatchNorm folded, see folding.py); the children
(hence the state_dict keys) are torch's own, and in training they run unchanged.
"""
from __future__ import annotations

from typing import Dict, Sequence

from torch import nn

from .add_relu import FusedAddReLU
from .common import check_backend_name, is_bn, is_plain_conv, is_relu, rebuild_as
from .conv import FusedConvReLU2d
from .folding import ConvBNFolding

__all__ = ["BACKEND_MODULES", "FusedSequential", "bn_run", "get_backends", "set_backend"]


def bn_run(mods: Sequence[nn.Module], i: int) -> int:
    """Length of the Conv2d -> BatchNorm2d (-> ReLU) run starting at mods[i], or 0."""
    if i + 1 < len(mods) and is_plain_conv(mods[i]) and is_bn(mods[i + 1]):
        return 3 if i + 2 < len(mods) and is_relu(mods[i + 2]) else 2
    return 0


class FusedSequential(ConvBNFolding, nn.Sequential):
    """nn.Sequential that runs every Conv2d -> BatchNorm2d (-> ReLU) run of its children as one
    fused convolution (BN folded) in eval mode, and as torch's modules in training.

    The children are not replaced, so the state_dict is the nn.Sequential's (VGG-BN's
    ``features.N`` keys stay) and the result is always the plain Sequential's. The runs are found
    at each call, so appending or replacing children is fine. ``from_sequential`` converts one.
    """

    def __init__(self, *args, backend: str = "auto"):
        super().__init__(*args)
        self._init_folding(backend)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, backend: str = "auto") -> "FusedSequential":
        fused = rebuild_as(cls, seq)
        fused._init_folding(backend)
        return fused

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if isinstance(out, FusedSequential):
            out.backend = self.backend
        return out

    def forward(self, x):
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            n = bn_run(mods, i)
            if n:
                x = self._conv_bn(str(i), x, mods[i], mods[i + 1],
                                  relu=mods[i + 2] if n == 3 else None)
                i += n
            else:
                x = mods[i](x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


# The module kinds that hold a ``backend`` (every fused module is one of them).
BACKEND_MODULES = (FusedConvReLU2d, ConvBNFolding, FusedAddReLU)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every fused module of ``model`` (the per-model default); returns model."""
    check_backend_name(backend)
    for m in model.modules():
        if isinstance(m, BACKEND_MODULES):
            m.backend = backend
    return model


def get_backends(model: nn.Module) -> Dict[str, str]:
    """{module path: backend} for every fused module of ``model``."""
    return {name: m.backend for name, m in model.named_modules() if isinstance(m, BACKEND_MODULES)}
