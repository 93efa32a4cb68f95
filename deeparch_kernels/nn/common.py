"""What the fused modules share: which convolutions ``fused_conv2d`` runs, whether calling a
module would run hooks, and the one call of ``fused_conv2d`` (or of the epilogue after an unfused
convolution) every module makes. Used by the module files beside it and by
deeparch_kernels.fuse and deeparch_kernels.models.

  check_backend_name    "auto" or a known backend name, else ValueError (backends.check_name)
  unsupported_reason    why fused_conv2d's kernels can't run a convolution module (None: they can)
  conv_relu_blocker     why Conv2d -> ReLU can't become one FusedConvReLU2d keeping torch's hooks
  has_hooks             calling the module would run hooks (its own or global ones)
  is_plain_conv, is_bn, is_relu
                        the module is torch's Conv2d / BatchNorm2d / ReLU, forward unchanged
  rebuild_as            an existing module as its fused subclass, sharing its children and tensors
  conv_padding          a Conv2d's padding as the pair fused_conv2d takes
  is_channels_last      a 4-D tensor in channels_last (and not also contiguous)
  fused_conv            one fused_conv2d call with the residual put as a block's ``out +=`` puts it
  bind_conv             after a fused_conv call: that call bound for later inputs like its own
  conv_epilogue         ``relu?(y + residual?)`` after an unfused convolution
  is_recorded           the ops run now are recorded to run again (tracing, CUDA graph capture)

``fused_conv`` and ``conv_epilogue`` are one call_function node each under torch.fx.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from .. import backends as _backends
from ..ops import add_relu, fused_conv2d
from ..ops.conv import BoundConv, bind, kernel_refusal, output_memory_format

__all__ = [
    "bind_conv",
    "check_backend_name",
    "conv_epilogue",
    "conv_padding",
    "conv_relu_blocker",
    "fused_conv",
    "has_hooks",
    "is_bn",
    "is_channels_last",
    "is_plain_conv",
    "is_recorded",
    "is_relu",
    "rebuild_as",
    "unsupported_reason",
]

check_backend_name = _backends.check_name  # "auto" or a known (built-in or plugged-in) name


def unsupported_reason(conv: nn.Module) -> Optional[str]:
    """Why fused_conv2d's kernels can't run this convolution module (None when they can): the
    op's rule (ops/conv.py kernel_refusal: groups, dilation) plus what the fused modules' call
    can't express (padding modes, asymmetric 'same' padding)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    why = kernel_refusal(conv.groups, conv.dilation)
    if why is not None:
        return why
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


def conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """``conv.padding`` as the (symmetric) pair fused_conv2d takes; "same" is kernel // 2 (odd
    kernels: unsupported_reason refuses even ones)."""
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return (p[0], p[1])


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out channels_last and not also contiguous (e.g. a 1x1 image is both)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _to_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _like(residual: Tensor, y: Tensor) -> Tensor:
    """The residual in y's dtype (torchvision's ``out += identity`` casts to out's) and layout."""
    if residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    if is_channels_last(y):
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
        residual = _op_residual(x, weight, residual)
    return fused_conv2d(x, weight, bias, stride=(stride[0], stride[1]), padding=padding,
                        residual=residual, relu=relu, backend=backend)


def _op_residual(x: Tensor, weight: Tensor, residual: Tensor) -> Tensor:
    """The residual as fused_conv hands it to fused_conv2d: in the output's dtype (autocast's
    when it is on) and memory format."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.is_floating_point() else x.dtype
    if residual.dtype != dt:
        residual = residual.to(dt)
    return _to_format(residual, output_memory_format(x, weight))


def bind_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
              padding: Tuple[int, int], residual: Optional[Tensor], relu: bool,
              backend: str) -> Optional[BoundConv]:
    """After ``fused_conv(x, weight, bias, stride, padding, residual, relu, backend)`` ran (eager):
    the call bound for later inputs like these (ops/conv.py BoundConv; its ``run(x, residual)``),
    or None (nothing to bind, or a residual fused_conv converts). ``weight`` and ``bias`` must
    not be written while it is kept."""
    if residual is not None and _op_residual(x, weight, residual) is not residual:
        return None
    return bind(x, weight, bias, residual, stride, padding, relu, backend)


def conv_epilogue(y: Tensor, residual: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    """``relu?(y + residual?)`` after an unfused convolution: the add+ReLU is still one op. One
    call_function node under torch.fx."""
    if residual is not None:
        residual = _like(residual, y)
        return add_relu(y, residual, backend=backend) if relu else y + residual
    return torch.relu(y) if relu else y


# torch.fx must record fused_conv and conv_epilogue as calls (they look at dtypes, layouts and the
# autocast state, which a trace proxy doesn't have). torch.fx.wrap patches the name in the globals
# of the module that calls it, so each module calling them wraps them (nn/conv.py, nn/folding.py).


def is_plain_conv(m: Optional[nn.Module]) -> bool:
    """An nn.Conv2d whose forward is nn.Conv2d's (subclasses that only add attributes count)."""
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def is_bn(m: Optional[nn.Module]) -> bool:
    """An nn.BatchNorm2d whose forward is nn.BatchNorm2d's."""
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward


def is_relu(m: Optional[nn.Module]) -> bool:
    """An nn.ReLU whose forward is nn.ReLU's."""
    return isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward


def rebuild_as(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s children, parameters, buffers, hooks and plain
    attributes (the same objects; fresh containers), without running ``cls.__init__``: how an
    existing torch/torchvision module becomes its fused subclass."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    internal = set(new.__dict__)
    for k, v in module.__dict__.items():
        new.__dict__[k] = copy.copy(v) if k in internal and isinstance(v, (dict, set)) else v
    return new


_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)  # torch < 2.6: none


def is_recorded(x: object) -> bool:
    """The ops run now are recorded to run again later: torch.compile, torch.export (strict or
    not) or torch.fx.symbolic_trace is tracing, or a CUDA graph is being captured (its replays
    read the parameters and buffers where they are, as torch's modules' kernels do)."""
    if isinstance(x, torch.fx.Proxy):
        return True
    if torch.compiler.is_compiling() or _is_exporting():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()  # type: ignore[union-attr]
