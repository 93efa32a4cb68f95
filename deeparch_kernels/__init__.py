"""deeparch-kernels: fused convolution + bias (+ residual) + ReLU and fused residual add + ReLU
for VGG/ResNet-style networks, in Triton, C++/CUDA and C++ CPU, as torch.library custom ops.

Layers, each calling only the one below:
  kernels   csrc/ (C++/CUDA, CPU), deeparch_kernels/triton/
  ops       deeparch_kernels/ops/ (the deeparch:: op registry) + deeparch_kernels/backends.py
            (the one dispatch rule)
  functional  add_relu, add_relu_, fused_conv2d (below)
"""
from .backends import BACKENDS, Availability, BackendUnavailable, available_backends
from .ops import add_relu, add_relu_, fused_conv2d

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Availability",
    "BackendUnavailable",
    "add_relu",
    "add_relu_",
    "available_backends",
    "fused_conv2d",
]
