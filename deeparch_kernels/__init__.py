"""deeparch-kernels: fused convolution + bias (+ residual) + ReLU and fused residual add + ReLU
for VGG/ResNet-style networks, in Triton, C++/CUDA and C++ CPU, as torch.library custom ops.

Layers, each calling only the one below:
  kernels   csrc/ (C++/CUDA, CPU), deeparch_kernels/triton/
  ops       deeparch_kernels/ops/ (the deeparch:: op registry) + deeparch_kernels/backends.py
            (the one dispatch rule)
  functional  add_relu, add_relu_, fused_conv2d (below)
  modules   deeparch_kernels.nn (FusedConvReLU2d, FusedBasicBlock, FusedBottleneck, ...)
  models    deeparch_kernels.models (torchvision-signature VGG/ResNet builders), fuse() (swap an
            existing model's modules), verify() (fused vs torchvision)
  bench     deeparch_kernels.bench + the CLI (deeparch-bench / python -m deeparch_kernels)
"""
from .backends import BACKENDS, Availability, BackendUnavailable, available_backends
from .cpu_memory import keep_freed_memory
from .ops import add_relu, add_relu_, fused_conv2d

from . import models, nn  # noqa: E402  (modules build on the ops above)
from .fuse import FuseReport, fuse  # noqa: E402
from .nn import set_backend  # noqa: E402
from .verify import verify, verify_model, verify_models  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Availability",
    "BackendUnavailable",
    "FuseReport",
    "add_relu",
    "add_relu_",
    "available_backends",
    "fuse",
    "fused_conv2d",
    "keep_freed_memory",
    "models",
    "nn",
    "set_backend",
    "verify",
    "verify_model",
    "verify_models",
]
