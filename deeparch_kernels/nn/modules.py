"""Fused modules for VGG/ResNet-style networks, state_dict-compatible with the torch/torchvision
modules they replace. They contain no kernels: every fused computation is one call of
``deeparch_kernels.fused_conv2d`` or ``deeparch_kernels.add_relu``.

  FusedConvReLU2d       an nn.Conv2d whose forward is ``relu?(conv(x) + bias + residual?)`` in one
                        op; ``from_conv(conv, bn=None)`` folds an eval-mode BatchNorm into it once
                        (a frozen snapshot, as torch.ao's fuse_conv_bn_eval)
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
  ConvBNFolding         the mixin behind the last three: BatchNorm folding in eval mode
  FoldCache             the eager cache of folded weights: the one place that decides freshness
  fold_conv_bn          the fold itself, from the live tensors (differentiable)
  set_backend           the per-model default: sets ``backend`` on every fused module of a model

BatchNorm folding (eval mode). An eval-mode BatchNorm after a convolution is a per-channel
``y * scale + shift`` with ``scale = bn.weight / sqrt(running_var + eps)`` and ``shift =
bn.bias + (conv.bias - running_mean) * scale``: the fold is the convolution with weight
``conv.weight * scale`` and bias ``shift`` (torch.nn.utils.fusion.fuse_conv_bn_weights' formula,
computed in fp32 and cast to the conv weight's dtype). It is always computed from what the
modules hold at the time of the call -- ``conv.weight`` read through the module, so
parametrizations (torch.nn.utils.parametrize: weight_norm, spectral_norm, ...) apply:

  torch.compile, torch.export, torch.fx, CUDA graph capture
                        the fold is part of the traced graph (or of the captured CUDA graph),
                        computed from the live parameters and buffers at every call, so compiled,
                        exported and replayed code sees every update torch's modules would see
                        (running statistics after AdaBN, ``.data`` edits, ``load_state_dict``); it
                        is differentiable. It costs one weight-sized multiply per pair per call;
                        torch's inductor freezing (``torch._inductor.config.freezing = True``)
                        folds it into constants, with freezing's own contract (weights never
                        change).
  eager                 the K-sized scale and shift are computed live every call; the weight-sized
                        product ``conv.weight * scale`` is cached (FoldCache). On the CPU the
                        cache is valid while conv.weight is the same tensor object, storage and
                        version and the live scale equals, by value, the one it was made with: so
                        running-statistic updates in train mode (which bump no version counter),
                        in-place and ``.data`` edits of BatchNorm's parameters and buffers, and
                        in-place updates of conv.weight are all seen. On CUDA a value check would
                        wait for the device at every layer (and break CUDA graph capture), so the
                        cache is keyed on the version counters and storages of all seven tensors
                        (num_batches_tracked's counter is bumped by every train-mode BatchNorm
                        call): ``.data`` edits of BatchNorm tensors are not seen there.
                        Not seen on any device: in-place edits of ``conv.weight.data`` (``.data``
                        has its own version counter and nothing else records the write; torch's
                        inference freezing has the same limit). After such edits call
                        ``model.eval()`` (every fused module drops its folds), or edit under
                        ``torch.no_grad()`` instead of through ``.data``.

The folded path is taken in eval mode (BatchNorm with running statistics) when no hook would be
bypassed: a pair whose conv or BatchNorm has hooks (or while global module hooks are
registered, torch.nn.modules.module.register_module_forward_hook & co.) runs as torch's conv
and BatchNorm modules, so its hooks fire as in torch -- including the forward pre-hooks of
torch.nn.utils.weight_norm / spectral_norm / prune, which compute the weight. A ReLU module with
hooks is called as itself after the fused convolution. In eager mode with autograd on and
parameters that require gradients, the conv and BatchNorm run as torch's modules too (gradients
reach every parameter exactly as in torchvision; the cached fold is not differentiable); the
traced fold is. In training the convolution and BatchNorm always run as torch's modules and
only the residual add + ReLU is fused.

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
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.resnet import BasicBlock, Bottleneck

from .. import backends as _backends
from ..ops import add_relu, fused_conv2d
from ..ops import bn_fold as _bn_fold
from ..ops.conv import forget_prepacked, output_memory_format, prepack
from ._torchscript import NoTorchScript, refuse_jit_trace
from .add_relu import FusedAddReLU

__all__ = [
    "ConvBNFolding",
    "FoldCache",
    "FusedAddReLU",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConvAddReLU2d",
    "FusedConvReLU2d",
    "FusedSequential",
    "bn_scale_shift",
    "fold_conv_bn",
    "get_backends",
    "set_backend",
    "unsupported_reason",
]


# --------------------------------------------------------------------------- helpers

check_backend_name = _backends.check_name  # "auto" or a known (built-in or plugged-in) name


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


def has_hooks(m: nn.Module) -> bool:
    """Calling ``m`` would run hooks: its own forward/backward (pre-)hooks or global module hooks
    (the test nn.Module.__call__ makes before its hook-free fast path). Fusing would skip them."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                or m._backward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_forward_hooks or _torch_module._global_backward_pre_hooks
                or _torch_module._global_backward_hooks)


def conv_relu_blocker(conv: nn.Module, relu: Optional[nn.Module] = None) -> Optional[str]:
    """Why ``conv`` followed by a ReLU (the ``relu`` module, when there is one) can't become one
    FusedConvReLU2d with torch's semantics (None when it can). The conv's forward pre-hooks and
    the ReLU's forward hooks move onto the fused module (as torch.ao's fuse_modules moves them);
    hooks that see the convolution's own output can't be kept, nor can torch.nn.utils.parametrize
    parametrizations (their state lives in a class made for the conv)."""
    if parametrize.is_parametrized(conv):
        names = ", ".join(conv.parametrizations.keys())
        return (f"its {names} is parametrized (torch.nn.utils.parametrize), which can't be moved "
                "onto a fused module; kept as torch's Conv2d -> ReLU")
    if conv._forward_hooks or conv._backward_hooks or conv._backward_pre_hooks:
        return ("it has forward or backward hooks, which see the convolution's own output (before "
                "the ReLU); kept as torch's Conv2d -> ReLU so that they do")
    if relu is not None and (relu._forward_pre_hooks or relu._backward_hooks
                             or relu._backward_pre_hooks):
        return ("the ReLU after it has forward pre-hooks or backward hooks, which see the "
                "convolution's output; kept as torch's Conv2d -> ReLU so that they do")
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


def fused_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
               padding: Tuple[int, int], residual: Optional[Tensor], relu: bool,
               backend: str) -> Tensor:
    """One fused_conv2d call (which casts x, weight and bias under autocast as conv2d is cast),
    with the residual put in the output's dtype, as a block's ``out += identity`` casts it, and
    memory format. One call_function node under torch.fx."""
    if residual is not None:
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.is_floating_point() else x.dtype
        if residual.dtype != dt:
            residual = residual.to(dt)
        residual = _to_format(residual, output_memory_format(x, weight))
    return fused_conv2d(x, weight, bias, stride=(stride[0], stride[1]), padding=padding,
                        residual=residual, relu=relu, backend=backend)


def conv_epilogue(y: Tensor, residual: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    """``relu?(y + residual?)`` after an unfused convolution: the add+ReLU is still one op. One
    call_function node under torch.fx."""
    if residual is not None:
        residual = _like(residual, y)
        return add_relu(y, residual, backend=backend) if relu else y + residual
    return torch.relu(y) if relu else y


# torch.fx records these as calls (they look at dtypes, layouts and the autocast state, which a
# trace proxy doesn't have); everything around them traces as usual.
torch.fx.wrap("fused_conv")
torch.fx.wrap("conv_epilogue")


def _is_plain_conv(m: Optional[nn.Module]) -> bool:
    """An nn.Conv2d whose forward is nn.Conv2d's (subclasses that only add attributes count)."""
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _is_bn(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def _is_relu(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward


def _rebuild_as(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s children, parameters, buffers, hooks and plain
    attributes (the same objects; fresh containers), without running ``cls.__init__``: how an
    existing torch/torchvision module becomes its fused subclass."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    internal = set(new.__dict__)
    for k, v in module.__dict__.items():
        new.__dict__[k] = copy.copy(v) if k in internal and isinstance(v, (dict, set)) else v
    return new


# --------------------------------------------------------------------------- BatchNorm folding

def bn_scale_shift(bn: nn.BatchNorm2d, conv_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Eval-mode ``bn`` after a convolution with bias ``conv_bias``, as the per-channel
    ``y * scale + shift`` (K elements each, of the tensors it holds now), in fp32 (fp64 for a
    float64 BatchNorm): deeparch_kernels/ops/bn_fold.py, in torch ops (differentiable)."""
    return _bn_fold.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, conv_bias, bn.eps)


def _live_scale_shift(bn: nn.BatchNorm2d, conv_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """bn_scale_shift for the eager fold cache: one C++ call on the CPU (no gradient)."""
    return _bn_fold.scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, conv_bias, bn.eps)


def _scaled_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight * scale`` per output channel, in fp32 (or wider), back in the weight's dtype;
    elementwise, so the weight's memory format is kept."""
    wide = torch.promote_types(weight.dtype, scale.dtype)
    return (weight.to(wide) * scale.reshape(-1, 1, 1, 1)).to(weight.dtype)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d,
                 weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the convolution that computes eval-mode ``bn(conv(x))``: the formula
    of torch.nn.utils.fusion.fuse_conv_bn_weights, in fp32, cast to the conv weight's dtype, in
    its memory format. Computed from the live tensors (``conv.weight`` read through the module,
    so a parametrization applies; pass ``weight`` when it was just read) and differentiable:
    gradients reach conv's and bn's parameters as through the unfused modules."""
    w = conv.weight if weight is None else weight
    scale, shift = bn_scale_shift(bn, conv.bias)
    return _scaled_weight(w, scale), shift.to(w.dtype)


def _tensor_state(t: Tensor) -> tuple:
    return (t._version, t.data_ptr(), t.dtype, t.shape, t.stride())


class _Stamp:
    """A tensor as it was when something was derived from it: the same object, its storage
    (held here, so no other tensor can be given its address), layout and version counter."""

    __slots__ = ("tensor", "storage", "state")

    def __init__(self, t: Tensor):
        self.tensor = t
        self.storage = t.untyped_storage()
        self.state = _tensor_state(t)

    def holds(self, t: Tensor) -> bool:
        return t is self.tensor and _tensor_state(t) == self.state


def _stamps_hold(stamps: Tuple[Optional[_Stamp], ...], tensors: Sequence[Optional[Tensor]]) -> bool:
    return all((s is None and t is None) or (s is not None and t is not None and s.holds(t))
               for s, t in zip(stamps, tensors))


class _Fold:
    """One cached fold: what it was made from, and what was derived (a later derived tensor of
    the folded weight, e.g. a prepacked copy, belongs here so that it shares its freshness)."""

    __slots__ = ("stamps", "scale", "weight", "bias")

    def __init__(self, stamps, scale: Tensor, weight: Tensor, bias: Tensor):
        self.stamps, self.scale, self.weight, self.bias = stamps, scale, weight, bias


class FoldCache:
    """The eager cache of folded (conv, BatchNorm) weights, keyed by a name per pair; ``get`` is
    the one place that decides whether a fold is fresh (see the module docstring):

      CPU    valid while ``conv.weight`` is the same tensor (object, storage, layout, version
             counter) and the live K-sized BatchNorm scale equals the cached one by value; the
             bias (shift) is always the live one
      other  (CUDA...) valid while conv.weight, conv.bias and bn's weight, bias, running_mean,
             running_var and num_batches_tracked are the same tensors with the same version
             counters: no value is read, so nothing waits for the device

    Never part of a state_dict, a deep copy or a pickle (they start empty); ``clear()`` drops
    everything (``.train()``, ``.eval()``, ``.to()``, ``load_state_dict`` do). Tensors whose
    version can't be read (inference tensors) are folded at every call.
    """

    def __init__(self) -> None:
        self._folds: Dict[str, _Fold] = {}

    def keys(self):
        """The keys of the folds held now."""
        return self._folds.keys()

    def __reduce__(self):
        return (FoldCache, ())  # copies and pickles start empty

    def clear(self) -> None:
        self._folds.clear()

    def get(self, key: str, conv: nn.Conv2d, bn: nn.BatchNorm2d,
            weight: Tensor) -> Tuple[Tensor, Tensor]:
        """The folded ``(weight, bias)`` for ``bn(conv(.))``, ``weight`` being conv.weight as just
        read through the module. Not differentiable (the caller checks no gradient is needed)."""
        fold = self._folds.get(key)
        if weight.device.type == "cpu":
            tensors: Tuple[Optional[Tensor], ...] = (weight,)
            scale, shift = _live_scale_shift(bn, conv.bias)
            if fold is None or not _stamps_hold(fold.stamps, tensors) \
                    or not torch.equal(fold.scale, scale):
                fold = self._refold(key, conv, bn, weight, tensors)
            return fold.weight, shift.to(weight.dtype)
        tensors = (weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   bn.num_batches_tracked)
        if fold is None or not _stamps_hold(fold.stamps, tensors):
            fold = self._refold(key, conv, bn, weight, tensors)
        return fold.weight, fold.bias

    def _refold(self, key: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Tensor,
                tensors: Tuple[Optional[Tensor], ...]) -> _Fold:
        # Outside inference mode, so the cached tensors are usable outside it too.
        with torch.inference_mode(False), torch.no_grad():
            scale, shift = _live_scale_shift(bn, conv.bias)
            fold = _Fold(None, scale, _scaled_weight(weight, scale), shift.to(weight.dtype))
        if fold.weight.device.type == "cpu":
            prepack(fold.weight)  # oneDNN's prepacked copies live and go with this fold
        try:
            fold.stamps = tuple(None if t is None else _Stamp(t) for t in tensors)
        except RuntimeError:  # no version counter (an inference tensor): can't tell, don't keep
            self._folds.pop(key, None)
            return fold
        self._folds[key] = fold
        return fold


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """bn(conv(x)) is a convolution fused_conv2d runs, with the BatchNorm folded, and neither
    module has hooks that folding would skip."""
    return (_is_bn(bn) and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and unsupported_reason(conv) is None
            and not has_hooks(conv) and not has_hooks(bn))


def _needs_param_grads(conv: nn.Module, bn: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for m in (conv, bn) for p in m.parameters())


def _recorded(x: object) -> bool:
    """The ops run now are recorded to run again later: torch.compile, torch.export (strict or
    not) or torch.fx.symbolic_trace is tracing, or a CUDA graph is being captured (its replays
    read the parameters and buffers where they are, as torch's modules' kernels do)."""
    if isinstance(x, torch.fx.Proxy):
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if torch.compiler.is_compiling() or (is_exporting is not None and is_exporting()):
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()  # type: ignore[union-attr]


Residual = Union[None, Tensor, Callable[[], Tensor]]


class ConvBNFolding(NoTorchScript):
    """Mixin for an nn.Module that runs (Conv2d, BatchNorm2d) pairs of its submodules fused.

    A subclass calls ``_init_folding(backend)`` at the end of its construction and computes each
    pair with ``self._conv_bn(key, x, conv, bn, residual=..., relu=...)``: one fused_conv2d over
    the folded weights when that gives torch's result (see the module docstring), else torch's
    conv and BatchNorm modules followed by add_relu/ReLU.
    """

    backend: str

    def _init_folding(self, backend: str) -> None:
        self.backend = check_backend_name(backend)
        self._fold_cache = FoldCache()
        if _refold_after_load not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_refold_after_load)

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        self.refresh_folds()
        return self

    def _apply(self, fn, recurse=True):
        self.refresh_folds()
        return super()._apply(fn, recurse)  # type: ignore[misc]

    def refresh_folds(self) -> None:
        """Forget the cached folds: the next eval-mode call folds from the live tensors. Needed
        only after in-place edits through ``conv.weight.data`` (see the module docstring);
        ``.eval()`` and ``.train()`` do it."""
        self._fold_cache.clear()

    def _conv_bn(self, key: str, x: Tensor, conv: nn.Module, bn: nn.Module, *,
                 residual: Residual = None, relu: Optional[nn.Module] = None) -> Tensor:
        """``relu(bn(conv(x)) + residual)``. ``relu``: the ReLU module (None: no ReLU), called as
        itself when it has hooks. ``residual`` may be a function giving it, called after conv and
        bn when they run unfused, so that hooks fire in torchvision's order."""
        refuse_jit_trace(self)
        fuse_relu = relu is not None and not has_hooks(relu)
        y = None
        if _foldable(conv, bn):
            if _recorded(x):
                w, b = fold_conv_bn(conv, bn)
            elif not _needs_param_grads(conv, bn):
                w, b = self._fold_cache.get(key, conv, bn, conv.weight)
            else:
                w = b = None  # the cached fold isn't differentiable: run conv and bn as torch's
            if w is not None:
                r = residual() if callable(residual) else residual
                y = fused_conv(x, w, b, conv.stride, _padding(conv), r, fuse_relu, self.backend)
        if y is None:
            y = bn(conv(x))
            r = residual() if callable(residual) else residual
            y = conv_epilogue(y, r, fuse_relu, self.backend)
        return y if relu is None or fuse_relu else relu(y)

    def _shortcut(self, x: Tensor) -> Tensor:
        """A residual block's identity: x, or its downsample (conv1x1 + BN folded as one conv)."""
        ds = self.downsample  # type: ignore[attr-defined]
        if ds is None:
            return x
        pair = _conv_bn_pair(ds)
        if pair is not None and not has_hooks(ds):
            return self._conv_bn("downsample", x, pair[0], pair[1])
        return ds(x)


def _refold_after_load(module: nn.Module, incompatible_keys) -> None:
    module.refresh_folds()  # type: ignore[attr-defined]


def _conv_bn_pair(ds: Optional[nn.Module]) -> Optional[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """torchvision's downsample, ``Sequential(conv1x1, BatchNorm2d)``, as (conv, bn)."""
    if type(ds) is nn.Sequential and len(ds) == 2 and _is_plain_conv(ds[0]) and _is_bn(ds[1]):
        return ds[0], ds[1]
    return None


# --------------------------------------------------------------------------- conv (+ReLU) modules

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
            fused = _rebuild_as(cls, conv)
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
                and not _recorded(x):
            prepack(w)  # inference on the CPU: the cpu backend may keep it prepacked for oneDNN
        return fused_conv(x, self.weight, self.bias, self.stride, _padding(self), residual,
                          self.relu, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"


class FusedConvAddReLU2d(FusedConvReLU2d):
    """``relu(conv2d(x1, weight) + bias + x2)``: torch.ao.nn.intrinsic.ConvAddReLU2d's
    ``forward(x1, x2)`` as one fused_conv2d call (``relu=False`` leaves out the ReLU)."""

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x1, x2)


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

    def forward(self, x):
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            n = _bn_run(mods, i)
            if n:
                x = self._conv_bn(str(i), x, mods[i], mods[i + 1],
                                  relu=mods[i + 2] if n == 3 else None)
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

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusedBasicBlock(_FusedBlock, BasicBlock):
    """torchvision's BasicBlock (same constructor, submodules and state_dict) with
    ``relu(bn1(conv1(x)))`` and ``relu(bn2(conv2(.)) + identity)`` each one fused_conv2d in eval
    mode (and the downsample's conv1x1 + BN folded), and the residual add + ReLU one add_relu in
    training. Usable as ``torchvision.models.ResNet(FusedBasicBlock, ...)``."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=self.relu)
        return self._conv_bn("conv2", out, self.conv2, self.bn2, relu=self.relu,
                             residual=lambda: self._shortcut(x))


class FusedBottleneck(_FusedBlock, Bottleneck):
    """torchvision's Bottleneck (same constructor, submodules and state_dict), fused as
    FusedBasicBlock: conv1 and conv2 (+BN+ReLU) one fused_conv2d each in eval mode, conv3 + BN +
    residual + ReLU one fused_conv2d. A conv2 with groups or dilation (ResNeXt, dilated ResNets)
    runs as torch's conv + BN."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_bn("conv1", x, self.conv1, self.bn1, relu=self.relu)
        out = self._conv_bn("conv2", out, self.conv2, self.bn2, relu=self.relu)
        return self._conv_bn("conv3", out, self.conv3, self.bn3, relu=self.relu,
                             residual=lambda: self._shortcut(x))


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
