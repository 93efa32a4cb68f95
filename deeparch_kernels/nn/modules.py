"""The fused modules' names as they were before nn/ was split by job (see __init__.py): kept for
code (and pickled models) that import them from ``deeparch_kernels.nn.modules``."""
from .add_relu import FusedAddReLU  # noqa: F401
from .blocks import FusedBasicBlock, FusedBottleneck  # noqa: F401
from .common import (check_backend_name, conv_epilogue, conv_relu_blocker, fused_conv,  # noqa: F401
                     has_hooks, unsupported_reason)
from .conv import FusedConvAddReLU2d, FusedConvReLU2d  # noqa: F401
from .folding import ConvBNFolding, FoldCache, bn_scale_shift, fold_conv_bn  # noqa: F401
from .sequential import BACKEND_MODULES, FusedSequential, get_backends, set_backend  # noqa: F401

