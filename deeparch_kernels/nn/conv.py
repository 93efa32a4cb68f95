"""``FusedConvReLU2d`` and ``FusedConvAddReLU2d``: an nn.Conv2d whose forward is
``relu?(conv(x) + bias + residual?)`` as one ``fused_conv2d`` call.

``FusedConvReLU2d.from_conv(conv, bn=None)`` makes one from an existing conv (the same
parameters and hooks), or folds an eval-mode BatchNorm into it once (a frozen snapshot, as
torch.ao's fuse_conv_bn_eval; to keep BatchNorm for training use FusedSequential or
deeparch_kernels.fuse.fuse). Convolutions fused_conv2d can't run (groups != 1, dilation != 1,
non-zero padding modes) are refused at construction (NotImplementedError).
"""
from __future__ import annotations

from typing import Optional

import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..ops.conv import forget_prepacked, prepack
from ._torchscript import NoTorchScript, refuse_jit_trace
from .common import (check_backend_name, conv_padding, conv_relu_blocker, fused_conv, is_recorded,
                     rebuild_as, unsupported_reason)

__all__ = ["FusedConvAddReLU2d", "FusedConvReLU2d"]

torch.fx.wrap("fused_conv")  # one call_function node under torch.fx (see common.py)


class FusedConvReLU2d(NoTorchScript, nn.Conv2d):
    """``relu?(conv2d(x, weight) + bias + residual?)`` as one ``fused_conv2d`` call.

    A drop-in nn.Conv2d (same constructor, ``weight``/``bias`` parameters, state_dict) plus
    ``relu`` (default True) and ``backend``. ``forward(x, residual=None)``: the residual, when
    given, is added before the ReLU in the same kernel. groups, dilation and padding modes that
    fused_conv2d can't run raise NotImplementedError here, at construction.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, relu: bool = True, backend: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        why = unsupported_reason(self)
        if why is not None:
            raise NotImplementedError(f"{type(self).__name__}: {why}; keep an nn.Conv2d for it")
        self.relu = relu
        self.backend = check_backend_name(backend)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, relu: bool = True,
                  backend: str = "auto") -> "FusedConvReLU2d":
        """The fused module computing ``relu?(bn?(conv(x)))``.

        Without ``bn`` it is conv itself as the fused class, like torch.ao's fuse_modules: the
        same parameters and buffers, its forward pre-hooks (so torch.nn.utils.weight_norm,
        spectral_norm and prune keep computing the weight) and state_dict hooks. A conv whose
        hooks see its own output, or whose weight is parametrized (torch.nn.utils.parametrize),
        is refused (ValueError; conv_relu_blocker says why). With ``bn`` (conv and bn in eval
        mode) the BatchNorm is folded once by torch.nn.utils.fusion.fuse_conv_bn_weights into
        new parameters: a frozen inference module (to keep BatchNorm for training, use
        FusedSequential or deeparch_kernels.fuse.fuse).
        """
        why = unsupported_reason(conv)
        if why is not None:
            raise NotImplementedError(f"{cls.__name__}.from_conv: {why}")
        if bn is None:
            why = conv_relu_blocker(conv) if relu or parametrize.is_parametrized(conv) else None
            if why is not None:
                raise ValueError(f"{cls.__name__}.from_conv: conv can't be fused: {why}")
            fused = rebuild_as(cls, conv)
        else:
            if conv.training or bn.training:
                raise ValueError(f"{cls.__name__}.from_conv folds BatchNorm in eval mode only: call "
                                 ".eval() on conv and bn first (to keep BatchNorm for training use "
                                 "FusedSequential or deeparch_kernels.fuse.fuse)")
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"{cls.__name__}.from_conv: bn has no running statistics "
                                 "(track_running_stats=False), so there is nothing to fold")
            if conv._forward_pre_hooks:
                raise ValueError(f"{cls.__name__}.from_conv: conv has forward pre-hooks (e.g. "
                                 "torch.nn.utils.weight_norm, spectral_norm or prune, which "
                                 "compute its weight when it is called), which a frozen fold "
                                 "would skip: remove them first, use the torch.nn.utils."
                                 "parametrizations versions, or keep conv and bn in a "
                                 "FusedSequential (deeparch_kernels.fuse.fuse), which runs them")
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                        bn.eps, bn.weight, bn.bias)
            fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, True, conv.padding_mode,
                        device="meta", relu=relu, backend=backend)
            fused.weight, fused.bias = w, b
        fused.relu = relu
        fused.backend = check_backend_name(backend)
        return fused.train(conv.training)

    def train(self, mode: bool = True):
        w = self._parameters.get("weight")
        if w is not None:
            forget_prepacked(w)  # a fresh start on the CPU's prepacked copies (see FoldCache)
        return super().train(mode)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        refuse_jit_trace(self)
        w = self._parameters.get("weight")
        if w is not None and not self.training and isinstance(x, Tensor) and x.device.type == "cpu" \
                and not is_recorded(x):
            prepack(w)  # inference on the CPU: the cpu backend may keep it prepacked for oneDNN
        return fused_conv(x, self.weight, self.bias, self.stride, conv_padding(self), residual,
                          self.relu, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"


class FusedConvAddReLU2d(FusedConvReLU2d):
    """``relu(conv2d(x1, weight) + bias + x2)``: torch.ao.nn.intrinsic.ConvAddReLU2d's
    ``forward(x1, x2)`` as one fused_conv2d call (``relu=False`` leaves out the ReLU)."""

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x1, x2)
