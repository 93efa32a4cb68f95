"""Fused modules for VGG/ResNet-style networks, state_dict-compatible with the torch/torchvision
modules they replace. They contain no kernels: every fused computation is one call of
``deeparch_kernels.fused_conv2d`` or ``deeparch_kernels.add_relu``.

  FusedConvReLU2d       an nn.Conv2d whose forward is ``relu?(conv(x) + bias + residual?)`` in one
                        op; ``from_conv(conv, bn=None)`` folds an eval-mode BatchNorm into it once
                        (torch.nn.utils.fusion.fuse_conv_bn_eval), torch.ao-style
  FusedConvAddReLU2d    the same with the residual required: ``forward(x1, x2)``, like
                        torch.ao.nn.intrinsic.ConvAddReLU2d
  FusedSequential       an nn.Sequential that runs each Conv2d -> BatchNorm2d (-> ReLU) run of its
                        children as one fused convolution in eval mode; the children (hence the
                        state_dict keys) are torch's own, and in training they run unchanged
  FusedBasicBlock,      torchvision's BasicBlock / Bottleneck (same constructor, same submodules,
  FusedBottleneck       same state_dict): in eval mode conv+BN+ReLU is one fused_conv2d and the last
                        conv runs conv + bias + residual + ReLU as one fused_conv2d (the downsample
                        conv1x1+BN folded too); in training BN runs as in torchvision and the
                        residual add+ReLU is one add_relu
  ConvBNFolding         the mixin behind the last three: BatchNorm folding in eval mode, cached
  set_backend           the per-model default: sets ``backend`` on every fused module of a model

BatchNorm folding (eval mode only). The folded weight and bias are computed by
``torch.nn.utils.fusion.fuse_conv_bn_weights`` (in fp32, cast back to the conv's dtype) and kept
as non-persistent buffers ``_fold_<tag>_weight/_bias`` -- never in the state_dict, so
torchvision's ``load_state_dict`` works both ways. They are computed on ``.eval()`` and after
``load_state_dict``, and in eager mode recomputed whenever any input changes (each tensor's
version counter, storage, dtype, device and strides are the cache key), so in-place updates,
``.to()`` and assignments are always seen. Under torch.compile/export the buffers are used as
they stand (the fold itself cannot be traced: fuse_conv_bn_weights creates Parameters); where
there is none the unfused path runs. ``.train()`` drops them.

The folded path is taken only when it gives what torchvision gives: BatchNorm in eval mode with
running statistics, and no autograd graph needed for the convolution's or BatchNorm's parameters
(under ``torch.no_grad()``/``torch.inference_mode()``, or with frozen parameters). Otherwise --
training, or eval mode with parameter gradients -- the convolution and BatchNorm run as torch's
modules and only the residual add + ReLU is fused, so gradients reach every parameter exactly as
in torchvision.

Backends: every module takes ``backend=`` ("auto" or one of deeparch_kernels.BACKENDS). An
unknown name raises ValueError at construction; a known backend that can't run the inputs
(e.g. "cuda" for CPU tensors) raises deeparch_kernels.BackendUnavailable, with the reason, at
forward time -- the device is only known then.

Convolutions fused_conv2d can't run (groups != 1, dilation != 1, non-zero padding modes) are
never given to it: the blocks and FusedSequential run them with torch; FusedConvReLU2d refuses
them at construction (NotImplementedError).
"""
from __future__ import annotations

import copy
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..backends import BACKENDS
from ..ops import add_relu, fused_conv2d
from ..ops.conv import output_memory_format
from .add_relu import FusedAddReLU

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


# --------------------------------------------------------------------------- helpers

def check_backend_name(backend: str) -> str:
    """``backend`` if it is "auto" or a known backend name, else ValueError."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return backend


def unsupported_reason(conv: nn.Module) -> Optional[str]:
    """Why fused_conv2d can't run this convolution module (None when it can)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.groups != 1:
        return f"groups={conv.groups} (fused_conv2d supports groups=1 only)"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)} (fused_conv2d supports dilation=1 only)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (fused_conv2d pads with zeros only)"
    if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
        return "padding='same' with an even kernel (asymmetric padding)"
    return None


def _padding(conv: nn.Conv2d) -> Tuple[int, int]:
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return (p[0], p[1])


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _to_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _like(residual: Tensor, y: Tensor) -> Tensor:
    """The residual in y's dtype (torchvision's ``out += identity`` casts to out's) and layout."""
    if residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    if _is_channels_last(y):
        return _to_format(residual, torch.channels_last)
    if y.is_contiguous():
        return _to_format(residual, torch.contiguous_format)
    return residual


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
          padding: Tuple[int, int], residual: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    """One fused_conv2d call, with autocast applied the way autocast treats conv2d and the residual
    put in the output's dtype and memory format."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if residual is not None:
        if residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        residual = _to_format(residual, output_memory_format(x, weight))
    return fused_conv2d(x, weight, bias, stride=(stride[0], stride[1]), padding=padding,
                        residual=residual, relu=relu, backend=backend)


def _epilogue(y: Tensor, residual: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    """``relu?(y + residual?)`` after an unfused convolution: the add+ReLU is still one op."""
    if residual is not None:
        residual = _like(residual, y)
        return add_relu(y, residual, backend=backend) if relu else y + residual
    return torch.relu(y) if relu else y


def _is_plain_conv(m: Optional[nn.Module]) -> bool:
    """An nn.Conv2d whose forward is nn.Conv2d's (subclasses that only add attributes count)."""
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _is_bn(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def _is_relu(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of ``conv`` with eval-mode ``bn`` folded in, by
    torch.nn.utils.fusion.fuse_conv_bn_weights computed in fp32 and cast to the conv weight's
    dtype, in its memory format. Detached: no gradient flows to conv or bn."""
    w = conv.weight

    def f32(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().float()

    with torch.no_grad():
        fw, fb = fuse_conv_bn_weights(f32(w), f32(conv.bias), f32(bn.running_mean),
                                      f32(bn.running_var), bn.eps, f32(bn.weight), f32(bn.bias))
    fmt = torch.channels_last if _is_channels_last(w) else torch.contiguous_format
    return fw.detach().to(w.dtype).contiguous(memory_format=fmt), fb.detach().to(w.dtype)


def _fold_key(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Optional[tuple]:
    """What the fold of (conv, bn) depends on; None when it can't be told (inference tensors,
    fake tensors): then nothing is cached."""
    key: List[object] = [bn.eps]
    try:
        for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            key.append(None if t is None else
                       (t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride()))
    except RuntimeError:
        return None
    return tuple(key)


def _rebuild_as(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s children, parameters, buffers, hooks and plain
    attributes (the same objects; fresh containers), without running ``cls.__init__``: how an
    existing torchvision module becomes its fused subclass."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    internal = set(new.__dict__)
    for k, v in module.__dict__.items():
        new.__dict__[k] = copy.copy(v) if k in internal and isinstance(v, (dict, set)) else v
    return new


# --------------------------------------------------------------------------- conv (+ReLU) modules

class FusedConvReLU2d(nn.Conv2d):
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

        Without ``bn`` it shares conv's parameters (like torch.ao's fuse_modules). With ``bn``
        (conv and bn in eval mode) the BatchNorm is folded, once, by
        torch.nn.utils.fusion.fuse_conv_bn_eval into new parameters: a frozen inference module
        (to keep BatchNorm for training, use FusedSequential or deeparch_kernels.fuse.fuse).
        """
        why = unsupported_reason(conv)
        if why is not None:
            raise NotImplementedError(f"{cls.__name__}.from_conv: {why}")
        if bn is not None:
            if conv.training or bn.training:
                raise ValueError(f"{cls.__name__}.from_conv folds BatchNorm in eval mode only: call "
                                 ".eval() on conv and bn first (to keep BatchNorm for training use "
                                 "FusedSequential or deeparch_kernels.fuse.fuse)")
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"{cls.__name__}.from_conv: bn has no running statistics "
                                 "(track_running_stats=False), so there is nothing to fold")
            conv = fuse_conv_bn_eval(conv, bn)
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device="meta", relu=relu, backend=backend)
        fused.weight = conv.weight
        fused.bias = conv.bias
        return fused.train(conv.training)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _conv(x, self.weight, self.bias, self.stride, _padding(self), residual, self.relu,
                     self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"


class FusedConvAddReLU2d(FusedConvReLU2d):
    """``relu(conv2d(x1, weight) + bias + x2)``: torch.ao.nn.intrinsic.ConvAddReLU2d's
    ``forward(x1, x2)`` as one fused_conv2d call (``relu=False`` leaves out the ReLU)."""

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x1, x2)


# --------------------------------------------------------------------------- BatchNorm folding

class ConvBNFolding:
    """Mixin for an nn.Module that runs (Conv2d, BatchNorm2d) pairs of its submodules fused.

    A subclass lists its pairs in ``_fold_pairs()`` as (tag, conv, bn), calls
    ``_init_folding(backend)`` at the end of its construction, and computes each pair with
    ``self._conv_bn(tag, x, conv, bn, residual=..., relu=...)``: one fused_conv2d over the folded
    weights when folding gives torchvision's result (see the module docstring), else torch's
    conv and BatchNorm followed by add_relu/ReLU.
    """

    backend: str
    training: bool

    def _fold_pairs(self) -> Iterator[Tuple[str, nn.Module, nn.Module]]:
        raise NotImplementedError

    def _init_folding(self, backend: str) -> None:
        self.backend = check_backend_name(backend)
        self._fold_keys: Dict[str, Optional[tuple]] = {}
        for tag, _, _ in self._fold_pairs():
            for suffix in ("weight", "bias"):
                if f"_fold_{tag}_{suffix}" not in self._buffers:
                    self.register_buffer(f"_fold_{tag}_{suffix}", None, persistent=False)
        if _refold_after_load not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_refold_after_load)
        if not self.training:
            self.refresh_folds()

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if mode:
            self.drop_folds()
        else:
            self.refresh_folds()
        return self

    def drop_folds(self) -> None:
        """Forget the folded weights (training does not use them)."""
        self._fold_keys = {}
        for name in list(self._buffers):
            if name.startswith("_fold_"):
                self._buffers[name] = None

    def refresh_folds(self) -> None:
        """Fold every pair whose BatchNorm is in eval mode now (eager only)."""
        for tag, conv, bn in self._fold_pairs():
            if _is_bn(bn) and not bn.training and bn.running_mean is not None \
                    and unsupported_reason(conv) is None:
                self._store_fold(tag, conv, bn, _fold_key(conv, bn))

    def _store_fold(self, tag: str, conv: nn.Module, bn: nn.Module, key: Optional[tuple]) -> None:
        with torch.inference_mode(False):  # usable outside inference mode, too
            w, b = fold_conv_bn(conv, bn)
        names = (f"_fold_{tag}_weight", f"_fold_{tag}_bias")
        for name, t in zip(names, (w, b)):
            old = self._buffers.get(name)
            if old is not None and old.shape == t.shape and old.dtype == t.dtype \
                    and old.device == t.device and old.stride() == t.stride() and not old.is_inference():
                with torch.no_grad():
                    old.copy_(t)  # in place: a compiled graph reading this buffer sees the update
            else:
                self._buffers[name] = t
                if name not in self._non_persistent_buffers_set:
                    self._non_persistent_buffers_set.add(name)
        self._fold_keys[tag] = key

    def _folded(self, tag: str, conv: nn.Module, bn: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        w_name, b_name = f"_fold_{tag}_weight", f"_fold_{tag}_bias"
        if _tracing():
            return getattr(self, w_name, None), getattr(self, b_name, None)
        key = _fold_key(conv, bn)
        if key is None:
            return fold_conv_bn(conv, bn)  # can't tell when it changes: fold every time
        if self._fold_keys.get(tag) != key or self._buffers.get(w_name) is None:
            self._store_fold(tag, conv, bn, key)
        return self._buffers[w_name], self._buffers[b_name]

    def _conv_bn(self, tag: str, x: Tensor, conv: nn.Module, bn: nn.Module, *,
                 residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
        """``relu?(bn(conv(x)) + residual?)``."""
        if _can_fold(conv, bn):
            w, b = self._folded(tag, conv, bn)
            if w is not None:
                return _conv(x, w, b, conv.stride, _padding(conv), residual, relu, self.backend)
        return _epilogue(bn(conv(x)), residual, relu, self.backend)

    def _shortcut(self, x: Tensor) -> Tensor:
        """A residual block's identity: x, or its downsample (conv1x1 + BN folded as one conv)."""
        ds = self.downsample  # type: ignore[attr-defined]
        if ds is None:
            return x
        pair = _conv_bn_pair(ds)
        if pair is not None:
            return self._conv_bn("downsample", x, pair[0], pair[1], relu=False)
        return ds(x)


def _tracing() -> bool:
    """torch.compile or torch.export (strict or not) is tracing this forward."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (is_exporting is not None and is_exporting())


def _can_fold(conv: nn.Module, bn: nn.Module) -> bool:
    if not (_is_bn(bn) and not bn.training and bn.running_mean is not None):
        return False
    if unsupported_reason(conv) is not None:
        return False
    if torch.is_grad_enabled():
        for p in (conv.weight, conv.bias, bn.weight, bn.bias):
            if p is not None and p.requires_grad:
                return False  # the parameters need their gradients: run BN unfolded
    return True


def _refold_after_load(module: nn.Module, incompatible_keys) -> None:
    if not module.training:
        module.refresh_folds()  # type: ignore[attr-defined]


def _conv_bn_pair(ds: Optional[nn.Module]) -> Optional[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """torchvision's downsample, ``Sequential(conv1x1, BatchNorm2d)``, as (conv, bn)."""
    if type(ds) is nn.Sequential and len(ds) == 2 and _is_plain_conv(ds[0]) and _is_bn(ds[1]):
        return ds[0], ds[1]
    return None


# --------------------------------------------------------------------------- containers and blocks

def _bn_run(mods: Sequence[nn.Module], i: int) -> int:
    """Length of the Conv2d -> BatchNorm2d (-> ReLU) run starting at mods[i], or 0."""
    if i + 1 < len(mods) and _is_plain_conv(mods[i]) and _is_bn(mods[i + 1]):
        return 3 if i + 2 < len(mods) and _is_relu(mods[i + 2]) else 2
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
        fused = _rebuild_as(cls, seq)
        fused._init_folding(backend)
        return fused

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if isinstance(out, FusedSequential):
            out.backend = self.backend
        return out

    def _fold_pairs(self):
        mods = list(self._modules.values())
        for i in range(len(mods)):
            if _bn_run(mods, i):
                yield str(i), mods[i], mods[i + 1]

    def forward(self, x):
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            n = _bn_run(mods, i)
            if n:
                x = self._conv_bn(str(i), x, mods[i], mods[i + 1], relu=n == 3)
                i += n
            else:
                x = mods[i](x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class _FusedBlock(ConvBNFolding):
    """What FusedBasicBlock and FusedBottleneck share: torchvision's block constructor plus
    ``backend=``, ``from_block`` (adopting an existing block's submodules), the repr."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None, *, backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation,
                         norm_layer)
        self._init_folding(backend)

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto"):
        """The fused block holding ``block``'s own submodules (shared, not copied)."""
        fused = _rebuild_as(cls, block)
        fused._init_folding(backend)
        return fused

    _CONVS: Tuple[str, ...] = ()  # convN, each followed by bnN

    def _fold_pairs(self):
        for name in self._CONVS:
            yield name, getattr(self, name), getattr(self, "bn" + name[4:])
        pair = _conv_bn_pair(self.downsample)
        if pair is not None:
            yield ("downsample",) + pair

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusedBasicBlock(_FusedBlock, BasicBlock):
    """torchvision's BasicBlock (same constructor, submodules and state_dict) with
    ``relu(bn1(conv1(x)))`` and ``relu(bn2(conv2(.)) + identity)`` each one fused_conv2d in eval
    mode (and the downsample's conv1x1 + BN folded), and the residual add + ReLU one add_relu in
    training. Usable as ``torchvision.models.ResNet(FusedBasicBlock, ...)``."""

    _CONVS = ("conv1", "conv2")

    def forward(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=True)
        return self._conv_bn("conv2", out, self.conv2, self.bn2, residual=identity, relu=True)


class FusedBottleneck(_FusedBlock, Bottleneck):
    """torchvision's Bottleneck (same constructor, submodules and state_dict), fused as
    FusedBasicBlock: conv1 and conv2 (+BN+ReLU) one fused_conv2d each in eval mode, conv3 + BN +
    residual + ReLU one fused_conv2d. A conv2 with groups or dilation (ResNeXt, dilated ResNets)
    runs as torch's conv + BN."""

    _CONVS = ("conv1", "conv2", "conv3")

    def forward(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=True)
        out = self._conv_bn("conv2", out, self.conv2, self.bn2, relu=True)
        return self._conv_bn("conv3", out, self.conv3, self.bn3, residual=identity, relu=True)


# --------------------------------------------------------------------------- per-model backend

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
