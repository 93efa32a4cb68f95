"""Fused modules (see modules.py): drop-ins for torch/torchvision modules with the same
state_dict, calling deeparch_kernels.fused_conv2d / add_relu."""
from .modules import *  # noqa: F401,F403  (modules.__all__ is the public list)
from .modules import __all__  # noqa: F401
