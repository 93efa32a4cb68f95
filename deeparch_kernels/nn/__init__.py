"""Fused modules (see modules.py): drop-ins for torch/torchvision modules with the same
state_dict, calling deeparch_kernels.fused_conv2d / add_relu."""
from .add_relu import FusedAddReLU
from .modules import (
    ConvBNFolding,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConvAddReLU2d,
    FusedConvReLU2d,
    FusedSequential,
    fold_conv_bn,
    get_backends,
    set_backend,
    unsupported_reason,
)

__all__ = [
    "ConvBNFolding",
    "FusedAddReLU",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConvAddReLU2d",
    "FusedConvReLU2d",
    "FusedSequential",
    "fold_conv_bn",
    "get_backends",
    "set_backend",
    "unsupported_reason",
]
