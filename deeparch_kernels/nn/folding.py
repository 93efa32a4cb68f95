"""BatchNorm folding: the fused modules' (Conv2d, BatchNorm2d) pairs as one convolution.

  bn_scale_shift        an eval-mode BatchNorm as the per-channel ``y * scale + shift``
  fold_conv_bn          the fold itself, from the live tensors (differentiable)
  FoldCache             the eager cache of folded weights: the one place that decides freshness
  ConvBNFolding         the mixin of FusedSequential, the blocks and the models: runs a pair as
                        one fused_conv2d over its fold when that gives torch's result, else as
                        torch's conv and BatchNorm modules
  conv_bn_pair          torchvision's downsample ``Sequential(conv1x1, BatchNorm2d)`` as (conv, bn)

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
  eager                 the fold (``conv.weight * scale`` and the shift) is cached (FoldCache).
                        On the CPU the cache is valid while conv.weight is the same tensor object,
                        storage and version and BatchNorm's tensors, eps and conv.bias equal, byte
                        for byte, copies kept with the fold (one C++ call comparing a few K-sized
                        buffers; torch.equal where the extension is not built): so
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
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn

from .. import _ext
from ..ops import bn_fold as _bn_fold
from ..ops.conv import BoundConv, prepack, warn_unversioned_weight
from ._torchscript import NoTorchScript, refuse_jit_trace
from .common import (bind_conv, check_backend_name, conv_epilogue, conv_padding, fused_conv,
                     has_hooks, is_bn, is_plain_conv, is_recorded, unsupported_reason)

__all__ = ["ConvBNFolding", "FoldCache", "Residual", "bn_scale_shift", "conv_bn_pair", "fold_conv_bn"]

# one call_function node each under torch.fx (see common.py)
torch.fx.wrap("fused_conv")
torch.fx.wrap("conv_epilogue")


def bn_scale_shift(bn: nn.BatchNorm2d, conv_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Eval-mode ``bn`` after a convolution with bias ``conv_bias``, as the per-channel
    ``y * scale + shift`` (K elements each, of the tensors it holds now), in fp32 (fp64 for a
    float64 BatchNorm): deeparch_kernels/ops/bn_fold.py, in torch ops (differentiable)."""
    return _bn_fold.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, conv_bias, bn.eps)


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
    """One cached fold: what it was made from (stamps of the tensors keyed by identity and version;
    on the CPU also the values of the BatchNorm's tensors, eps and conv.bias), and what was
    derived (a later derived tensor of the folded weight, e.g. a prepacked copy, belongs here so
    that it shares its freshness; ``bound``: the eager fused_conv over the fold, bound to the
    inputs it last ran, see nn/common.py bind_conv -- the fold's tensors are never written)."""

    __slots__ = ("stamps", "values", "weight", "bias", "bound")

    def __init__(self, stamps, values, weight: Tensor, bias: Tensor):
        self.stamps, self.values, self.weight, self.bias = stamps, values, weight, bias
        self.bound: Optional[BoundConv] = None


def _bn_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[Optional[Tensor], ...]:
    """The tensors besides conv.weight that the fold is computed from: read from the modules'
    parameter and buffer dicts (what nn.Module.__getattr__ returns, at a fifth of its cost), or
    through the attributes where a name is not there (a parametrized weight or bias)."""
    p, b = bn._parameters, bn._buffers
    try:
        return (b["running_mean"], b["running_var"], p["weight"], p["bias"], conv._parameters["bias"])
    except KeyError:
        return (bn.running_mean, bn.running_var, bn.weight, bn.bias, conv.bias)


def _snapshot(tensors: Sequence[Optional[Tensor]], eps: float) -> tuple:
    return (eps,) + tuple(None if t is None else t.detach().clone() for t in tensors)


def _same_values(snapshot: tuple, tensors: Sequence[Optional[Tensor]], eps: float) -> bool:
    """``tensors`` and ``eps`` equal what ``snapshot`` copied: byte for byte in one C++ call
    (csrc/module.cpp same_bits) where the extension is built, else by torch.equal (where NaN
    never equals: a refold, never a stale fold)."""
    if snapshot[0] != eps:
        return False
    same_bits = _ext.same_bits()
    if same_bits is not None:
        return same_bits(snapshot[1:], tuple(tensors))
    for s, t in zip(snapshot[1:], tensors):
        if s is None or t is None:
            if s is not t:
                return False
        elif s.dtype != t.dtype or not torch.equal(s, t):  # (equal compares shapes, not dtypes)
            return False
    return True


class FoldCache:
    """The eager cache of folded (conv, BatchNorm) weights, keyed by a name per pair; ``get`` is
    the one place that decides whether a fold is fresh (see the module docstring):

      CPU    valid while ``conv.weight`` is the same tensor (object, storage, layout, version
             counter) and BatchNorm's running_mean, running_var, weight, bias and eps and
             conv.bias equal, byte for byte, those the fold was made from (compared with copies
             kept with it in one C++ call, no fold arithmetic)
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
        read through the module. Not differentiable (the caller checks no gradient is needed).
        They are the cache's own tensors: a caller that writes them has the prepacked copies
        remade (their version check) and the fold's bound call dropped (here)."""
        fold = self.fold(key, conv, bn, weight)
        fold.bound = None
        return fold.weight, fold.bias

    def fold(self, key: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Tensor) -> _Fold:
        """``get``'s fold itself (with what is kept beside it)."""
        fold = self._folds.get(key)
        inputs = _bn_inputs(conv, bn)
        if weight.device.type == "cpu":
            if fold is None or not fold.stamps[0].holds(weight) \
                    or not _same_values(fold.values, inputs, bn.eps):
                fold = self._refold(key, conv, bn, weight, (weight,), inputs)
            return fold
        tensors = (weight,) + inputs + (bn.num_batches_tracked,)
        if fold is None or not _stamps_hold(fold.stamps, tensors):
            fold = self._refold(key, conv, bn, weight, tensors, None)
        return fold

    def _refold(self, key: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: Tensor,
                tensors: Tuple[Optional[Tensor], ...], values: Optional[tuple]) -> _Fold:
        # Outside inference mode, so the cached tensors are usable outside it too.
        with torch.inference_mode(False), torch.no_grad():
            scale, shift = _bn_fold.scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                conv.bias, bn.eps)
            snapshot = None if values is None else _snapshot(values, bn.eps)
            fold = _Fold(None, snapshot, _scaled_weight(weight, scale), shift.to(weight.dtype))
        if fold.weight.device.type == "cpu":
            prepack(fold.weight)  # oneDNN's prepacked copies live and go with this fold
        try:
            fold.stamps = tuple(None if t is None else _Stamp(t) for t in tensors)
        except RuntimeError:  # no version counter (an inference tensor): can't tell, don't keep
            warn_unversioned_weight()
            self._folds.pop(key, None)
            return fold
        self._folds[key] = fold
        return fold


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """bn(conv(x)) is a convolution fused_conv2d runs, with the BatchNorm folded, and neither
    module has hooks that folding would skip."""
    buffers = bn._buffers  # (read from the dict: nn.Module.__getattr__ costs ~0.5 us a name)
    return (is_bn(bn) and not bn.training and buffers.get("running_mean") is not None
            and buffers.get("running_var") is not None and unsupported_reason(conv) is None
            and not has_hooks(conv) and not has_hooks(bn))


def _needs_param_grads(conv: nn.Module, bn: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for m in (conv, bn) for p in m.parameters())



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
            if is_recorded(x):
                w, b = fold_conv_bn(conv, bn)
                r = residual() if callable(residual) else residual
                y = fused_conv(x, w, b, conv.stride, conv_padding(conv), r, fuse_relu, self.backend)
            elif not _needs_param_grads(conv, bn):  # (else the cached fold, not differentiable,
                # can't be used: conv and bn run as torch's below)
                w = conv._parameters.get("weight")  # (not there: a parametrized weight)
                fold = self._fold_cache.fold(key, conv, bn, conv.weight if w is None else w)
                r = residual() if callable(residual) else residual
                bound, s, p = fold.bound, conv.stride, conv_padding(conv)
                if bound is not None and bound.matches(x, r, s, p, fuse_relu, self.backend):
                    y = bound.run(x, r)  # the call below, its per-call work done once
                else:
                    w, b = fold.weight, fold.bias
                    y = fused_conv(x, w, b, s, p, r, fuse_relu, self.backend)
                    fold.bound = bind_conv(x, w, b, s, p, r, fuse_relu, self.backend)
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
        pair = conv_bn_pair(ds)
        if pair is not None and not has_hooks(ds):
            return self._conv_bn("downsample", x, pair[0], pair[1])
        return ds(x)


def _refold_after_load(module: nn.Module, incompatible_keys) -> None:
    module.refresh_folds()  # type: ignore[attr-defined]


def conv_bn_pair(ds: Optional[nn.Module]) -> Optional[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """torchvision's downsample, ``Sequential(conv1x1, BatchNorm2d)``, as (conv, bn)."""
    if type(ds) is nn.Sequential and len(ds) == 2 and is_plain_conv(ds[0]) and is_bn(ds[1]):
        return ds[0], ds[1]
    return None
