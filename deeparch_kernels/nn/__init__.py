"""Fused modules: drop-ins for torch/torchvision modules with the same state_dict. They contain no
kernels: every fused computation is one call of ``deeparch_kernels.fused_conv2d`` or
``deeparch_kernels.add_relu``. One file per job:

  conv.py        FusedConvReLU2d     an nn.Conv2d whose forward is ``relu?(conv(x) + bias +
                                     residual?)`` in one op; ``from_conv(conv, bn=None)`` folds an
                                     eval-mode BatchNorm into it once (a frozen snapshot)
                 FusedConvAddReLU2d  the same with the residual required: ``forward(x1, x2)``,
                                     like torch.ao.nn.intrinsic.ConvAddReLU2d
  add_relu.py    FusedAddReLU        ``relu(x + identity)`` (in place with ``inplace=True``)
  relu.py        ExactReLU           nn.ReLU that torch.compile can't fold into oneDNN's linear
                                     (whose ReLU post-op turns NaN into 0): after Linear layers
  folding.py     ConvBNFolding       the mixin behind the modules below: BatchNorm folded into
                                     the convolution in eval mode (FoldCache, fold_conv_bn,
                                     bn_scale_shift; when the fold is taken, and what it sees)
  sequential.py  FusedSequential     an nn.Sequential that runs each Conv2d -> BatchNorm2d (->
                                     ReLU) run of its children as one fused convolution in eval
                                     mode; in training the children run unchanged
                 set_backend,        the per-model default: ``backend`` on every fused module
                 get_backends
  blocks.py      FusedBasicBlock,    torchvision's BasicBlock / Bottleneck (same constructor,
                 FusedBottleneck     submodules, state_dict): conv + BN (+ residual) + ReLU one
                                     fused_conv2d each in eval mode (the downsample folded too),
                                     the residual add + ReLU one add_relu in training
  cifar.py       FusedPlainBlock,    the ResNet paper's CIFAR-style plain block and option-A
                 ShortcutA           shortcut
  common.py      what they share: which convolutions fused_conv2d runs (unsupported_reason),
                 hooks (has_hooks), the one fused_conv2d call (fused_conv, conv_epilogue), ...;
                 used by deeparch_kernels.fuse and deeparch_kernels.models too

torch.fx: the fused modules trace with torch.fx.symbolic_trace (and torchvision's
create_feature_extractor): each fused convolution is one call_function node (``fused_conv``),
each fold a few tensor ops on get_attr nodes; the training flag is read at trace time, as for
any module. TorchScript (torch.jit.script / torch.jit.trace, deprecated by PyTorch) is refused
with an error pointing to torch.compile / torch.export.

Backends: every module takes ``backend=`` ("auto" or one of deeparch_kernels.BACKENDS). An
unknown name raises ValueError at construction; a known backend that can't run the inputs
(e.g. "cuda" for CPU tensors) raises deeparch_kernels.BackendUnavailable, with the reason, at
forward time -- the device is only known then.

Convolutions fused_conv2d can't run (groups != 1, dilation != 1, non-zero padding modes) are
never given to it: the blocks and FusedSequential run them with torch; FusedConvReLU2d refuses
them at construction (NotImplementedError).
"""
from . import blocks, cifar, common, conv, folding, modules, relu, sequential  # noqa: F401
from .add_relu import FusedAddReLU
from .blocks import FusedBasicBlock, FusedBottleneck
from .cifar import FusedPlainBlock, ShortcutA
from .common import unsupported_reason
from .conv import FusedConvAddReLU2d, FusedConvReLU2d
from .relu import ExactReLU
from .folding import ConvBNFolding, FoldCache, bn_scale_shift, fold_conv_bn
from .sequential import FusedSequential, get_backends, set_backend

__all__ = [
    "ConvBNFolding",
    "ExactReLU",
    "FoldCache",
    "FusedAddReLU",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConvAddReLU2d",
    "FusedConvReLU2d",
    "FusedPlainBlock",
    "FusedSequential",
    "ShortcutA",
    "bn_scale_shift",
    "fold_conv_bn",
    "get_backends",
    "set_backend",
    "unsupported_reason",
]
