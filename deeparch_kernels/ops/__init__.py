"""The op registry: every ``deeparch::`` custom op — schema, fake (meta) implementation,
autograd, and the backend implementations registered with the dispatch rule
(deeparch_kernels.backends). One file per op:

  add_relu.py      deeparch::add_relu, deeparch::add_relu_, deeparch::add_relu_triton(_)
  conv.py          deeparch::fused_conv2d, deeparch::fused_conv2d_triton, deeparch::fused_conv2d_cutlass,
                   deeparch::fused_conv2d_auto
  bn_fold.py       deeparch::bn_scale_shift (the fused modules' BatchNorm fold)

The C++ CPU/CUDA implementations live in csrc/ and register themselves for these schemas
(TORCH_LIBRARY_IMPL) when deeparch_kernels._C is imported, which happens here, after the
schemas are defined; so do the Autograd kernels of add_relu and fused_conv2d (csrc/autograd.cpp).
"""
from ._lib import lib  # noqa: F401  (defines the deeparch namespace)
from .add_relu import add_relu, add_relu_  # noqa: F401
from .conv import fused_conv2d  # noqa: F401
from . import bn_fold  # noqa: F401
from .add_relu import register_python_autograd as _add_relu_python_autograd
from .conv import register_python_autograd as _conv_python_autograd
from .. import _ext

_ext.load()
# The C++ ops' autograd: csrc/autograd.cpp registers it when the extension loads (no Python on
# the call path); without that extension, or with an old one, Python registers the same backward.
if not (_ext.build_info() or {}).get("cpp_autograd"):
    _add_relu_python_autograd()
    _conv_python_autograd()
