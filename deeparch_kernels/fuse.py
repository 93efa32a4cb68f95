"""``fuse(model)``: rewrite a torchvision VGG/ResNet -- or anything made of the same parts -- to
run the fused kernels, keeping its parameters, buffers and state_dict keys.

In the manner of torch.ao's ``fuse_modules`` and torchao's ``quantize_``: the model tree is walked
through ``named_children`` and replacements are ``setattr`` on the parent; what replaces a module
is decided by a handler table keyed by the module's exact type (subclasses may have their own
forward, so they are only walked into). Patterns:

  nn.Sequential  Conv2d -> ReLU           FusedConvReLU2d + nn.Identity (torch.ao style)
                 Conv2d -> BatchNorm2d (-> ReLU)
                                          kept, and the Sequential becomes a FusedSequential,
                                          which runs the run as one fused convolution (BN folded)
                                          in eval mode and as torch's modules in training
  BasicBlock, Bottleneck (torchvision)    FusedBasicBlock / FusedBottleneck
  ResNet (torchvision)                    FusedResNet (the stem conv + BN + ReLU fused)

BatchNorm is never folded away: it is folded at run time in eval mode and runs as itself in
training, so a fused model can switch between ``train()`` and ``eval()`` (and still loads
torchvision's state_dict). Convolutions fused_conv2d can't run (groups != 1, dilation != 1,
non-zero padding modes), and convolutions outside any pattern, are left as they are and named
in the report with the reason.

    fused = fuse(model)                                   # a fused deep copy
    fused, report = fuse(model, return_report=True)       # and what was done, and why not
    print(report)

``register_fuse_handler(cls)`` adds a handler for another module type.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple, Union

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .nn.modules import (FusedAddReLU, FusedBasicBlock, FusedBottleneck,
                         FusedConvReLU2d, FusedSequential, _bn_run, _conv_bn_pair, _is_plain_conv,
                         _is_relu, check_backend_name, unsupported_reason)
from .models.resnet import FusedResNet

__all__ = ["FuseReport", "FusedItem", "SkippedItem", "fuse", "register_fuse_handler"]


@dataclass(frozen=True)
class FusedItem:
    path: str  # the module path in the fused model ("" for the model itself)
    pattern: str  # what was found, e.g. "Conv2d -> BatchNorm2d -> ReLU"
    result: str  # what runs it now, e.g. "FusedSequential"


@dataclass(frozen=True)
class SkippedItem:
    path: str
    module: str  # the module's type
    reason: str


@dataclass
class FuseReport:
    """What fuse() rewrote and what it left alone, with the reason."""

    backend: str
    mode: str  # "eval" or "train": the model's mode when fused (BN folds at run time in eval)
    fused: List[FusedItem] = field(default_factory=list)
    skipped: List[SkippedItem] = field(default_factory=list)

    def skipped_paths(self) -> List[str]:
        return [s.path for s in self.skipped]

    def fused_paths(self) -> List[str]:
        return [f.path for f in self.fused]

    def __str__(self) -> str:
        lines = [f"fuse(backend={self.backend!r}, mode={self.mode}): {len(self.fused)} fused, "
                 f"{len(self.skipped)} left unfused"]
        lines += [f"  fused    {f.path or '<model>'}: {f.pattern} -> {f.result}" for f in self.fused]
        lines += [f"  unfused  {s.path or '<model>'} ({s.module}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


class _Ctx:
    def __init__(self, backend: str, report: FuseReport):
        self.backend = backend
        self.report = report

    def fused(self, path: str, pattern: str, result: str) -> None:
        self.report.fused.append(FusedItem(path, pattern, result))

    def skipped(self, path: str, module: nn.Module, reason: str) -> None:
        self.report.skipped.append(SkippedItem(path, type(module).__name__, reason))


Handler = Callable[[nn.Module, str, _Ctx], nn.Module]
_HANDLERS: Dict[type, Handler] = {}


def register_fuse_handler(*types: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(module, path, ctx) -> replacement`` for modules of exactly these
    types. The handler walks the children it does not consume with ``_visit_children``."""
    def deco(fn: Handler) -> Handler:
        for t in types:
            _HANDLERS[t] = fn
        return fn
    return deco


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _visit(module: nn.Module, path: str, ctx: _Ctx, parent: str = "") -> nn.Module:
    handler = _HANDLERS.get(type(module))
    if handler is not None:
        return handler(module, path, ctx)
    if isinstance(module, nn.Conv2d):
        where = f" (its parent is a {parent}, whose forward fuse() does not rewrite)" if parent else ""
        ctx.skipped(path, module, unsupported_reason(module) or
                    "not in a pattern fuse() knows: Conv2d -> ReLU or Conv2d -> BatchNorm2d in an "
                    f"nn.Sequential, or a torchvision block{where}")
        return module
    _visit_children(module, path, ctx)
    return module


def _visit_children(module: nn.Module, path: str, ctx: _Ctx, skip: Tuple[str, ...] = ()) -> None:
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        new = _visit(child, _join(path, name), ctx, type(module).__name__)
        if new is not child:
            setattr(module, name, new)


@register_fuse_handler(nn.Sequential, FusedSequential)
def _fuse_sequential(seq: nn.Sequential, path: str, ctx: _Ctx) -> nn.Module:
    names = list(seq._modules)
    mods = list(seq._modules.values())
    has_bn_run = False
    i = 0
    while i < len(mods):
        m, name = mods[i], names[i]
        p = _join(path, name)
        if not _is_plain_conv(m):
            new = _visit(m, p, ctx)
            if new is not m:
                setattr(seq, name, new)
            i += 1
            continue
        why = unsupported_reason(m)
        n = _bn_run(mods, i)
        if why is not None:
            ctx.skipped(p, m, why)
            i += 1
        elif n:
            has_bn_run = True
            pattern = "Conv2d -> BatchNorm2d" + (" -> ReLU" if n == 3 else "")
            ctx.fused(p, pattern, "FusedSequential (BN folded in eval, as is in training)")
            i += n
        elif i + 1 < len(mods) and _is_relu(mods[i + 1]):
            setattr(seq, name, FusedConvReLU2d.from_conv(m, relu=True, backend=ctx.backend))
            setattr(seq, names[i + 1], nn.Identity())
            ctx.fused(p, "Conv2d -> ReLU", "FusedConvReLU2d + Identity")
            i += 2
        else:
            ctx.skipped(p, m, "no ReLU or BatchNorm2d after it in its nn.Sequential: nothing to fuse")
            i += 1
    if isinstance(seq, FusedSequential):
        seq.backend = ctx.backend
        return seq
    return FusedSequential.from_sequential(seq, ctx.backend) if has_bn_run else seq


@register_fuse_handler(BasicBlock, Bottleneck)
def _fuse_block(block: nn.Module, path: str, ctx: _Ctx) -> nn.Module:
    cls = FusedBasicBlock if isinstance(block, BasicBlock) else FusedBottleneck
    fused = cls.from_block(block, backend=ctx.backend)
    ctx.fused(path, type(block).__name__, cls.__name__)
    _report_block_convs(fused, path, ctx)
    return fused


def _report_block_convs(block: nn.Module, path: str, ctx: _Ctx) -> None:
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(block, name, None)
        if conv is not None:
            why = unsupported_reason(conv)
            if why is not None:
                ctx.skipped(_join(path, name), conv,
                            f"{why}; runs as torch's conv + BatchNorm inside the fused block")
    ds = block.downsample
    if ds is not None and _conv_bn_pair(ds) is None:
        # a custom shortcut (e.g. ResNet-D's AvgPool + conv + BN): fused by its own patterns
        new = _visit(ds, _join(path, "downsample"), ctx)
        if new is not ds:
            block.downsample = new


@register_fuse_handler(ResNet)
def _fuse_resnet(model: ResNet, path: str, ctx: _Ctx) -> nn.Module:
    fused = FusedResNet.from_resnet(model, backend=ctx.backend)
    why = unsupported_reason(model.conv1)
    if why is None:
        ctx.fused(_join(path, "conv1"), "stem Conv2d -> BatchNorm2d -> ReLU", "FusedResNet")
    else:
        ctx.skipped(_join(path, "conv1"), model.conv1, why)
    _visit_children(fused, path, ctx, skip=("conv1", "bn1", "relu"))
    return fused


@register_fuse_handler(FusedConvReLU2d, FusedBasicBlock, FusedBottleneck, FusedResNet,
                       FusedAddReLU)
def _already_fused(module: nn.Module, path: str, ctx: _Ctx) -> nn.Module:
    module.backend = ctx.backend
    ctx.fused(path, "already fused", type(module).__name__)
    if isinstance(module, (FusedBasicBlock, FusedBottleneck)):
        _report_block_convs(module, path, ctx)
    elif isinstance(module, FusedResNet):
        _visit_children(module, path, ctx, skip=("conv1", "bn1", "relu"))
    return module


def fuse(model: nn.Module, *, backend: str = "auto", inplace: bool = False,
         return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FuseReport]]:
    """The model rewritten to run the fused kernels (see the module docstring).

    ``backend``: "auto" or one of deeparch_kernels.BACKENDS, set on every fused module
    (deeparch_kernels.nn.set_backend changes it later). ``inplace=False`` (default) fuses a deep
    copy and leaves ``model`` untouched; ``inplace=True`` rewrites ``model`` itself (the returned
    module is still the one to use: a top-level Sequential or block is replaced).
    ``return_report=True`` returns ``(fused_model, FuseReport)``.
    """
    check_backend_name(backend)
    report = FuseReport(backend=backend, mode="train" if model.training else "eval")
    if not inplace:
        model = copy.deepcopy(model)
    fused = _visit(model, "", _Ctx(backend, report))
    return (fused, report) if return_report else fused
