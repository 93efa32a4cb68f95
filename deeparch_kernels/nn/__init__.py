"""Fused modules (see modules.py, and cifar.py for the ResNet paper's CIFAR-style plain block and
option-A shortcut): drop-ins for torch/torchvision modules with the same state_dict, calling
deeparch_kernels.fused_conv2d / add_relu."""
from . import cifar as _cifar, modules as _modules
from .cifar import *  # noqa: F401,F403
from .modules import *  # noqa: F401,F403  (modules.__all__ is the public list)

__all__ = [*_modules.__all__, *_cifar.__all__]
