"""``fuse(model)``: rewrite a torchvision VGG/ResNet -- or anything made of the same parts -- to
run the fused kernels, keeping its parameters, buffers and state_dict keys.

In the manner of torch.ao's ``fuse_modules`` and torchao's ``quantize_``: the model tree is walked
through ``named_children`` and replacements are ``setattr`` on the parent; what replaces a module
is decided by a handler table keyed by the module's exact type (subclasses may have their own
forward, so they are only walked into). Patterns:

  nn.Sequential  Conv2d -> ReLU           FusedConvReLU2d + nn.Identity (torch.ao style: the
                                          conv's forward pre-hooks and the ReLU's forward hooks
                                          move onto the fused module)
                 Conv2d -> BatchNorm2d (-> ReLU)
                                          kept, and the Sequential becomes a FusedSequential,
                                          which runs the run as one fused convolution (BN folded)
                                          in eval mode and as torch's modules in training
  BasicBlock, Bottleneck (torchvision)    FusedBasicBlock / FusedBottleneck
  ResNet (torchvision)                    FusedResNet (the stem conv + BN + ReLU fused)
  nn.Sequential  Linear -> ReLU           the ReLU becomes an ExactReLU (nn/relu.py: the same in
                                          eager; under torch.compile inductor can't fold it into
                                          oneDNN's linear, whose ReLU post-op turns NaN into 0)

BatchNorm is never folded away: it is folded at run time in eval mode and runs as itself in
training, so a fused model can switch between ``train()`` and ``eval()`` (and still loads
torchvision's state_dict). Convolutions fused_conv2d can't run (groups != 1, dilation != 1,
non-zero padding modes), and convolutions outside any pattern, are left as they are and named
in the report with the reason.

Hooks and parametrizations keep torch's semantics. A Conv2d -> ReLU whose conv has hooks that
see its own output (forward or backward hooks), whose ReLU has hooks that see its input, or
whose conv weight is parametrized (torch.nn.utils.parametrize) stays torch's Conv2d -> ReLU
(reported). Conv2d -> BatchNorm2d pairs are fused whatever they carry: the weight is read through
the module, so parametrizations apply; while the conv or BatchNorm has hooks -- including the
pre-hooks of torch.nn.utils.weight_norm / spectral_norm / prune -- the pair runs as torch's
modules, so they fire (reported when fuse() sees them).

    fused = fuse(model)                                   # a fused deep copy
    fused, report = fuse(model, return_report=True)       # and what was done, and why not
    print(report)

``register_fuse_handler(cls)`` adds a handler for another module type.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple, Union

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .nn.add_relu import FusedAddReLU
from .nn.blocks import FusedBasicBlock, FusedBottleneck
from .nn.common import (check_backend_name, conv_relu_blocker, has_hooks, is_plain_conv, is_relu,
                        unsupported_reason)
from .nn.conv import FusedConvReLU2d
from .nn.folding import conv_bn_pair
from .nn.relu import exact_relus_after_linears
from .nn.sequential import FusedSequential, bn_run
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
        if not is_plain_conv(m):
            new = _visit(m, p, ctx)
            if new is not m:
                setattr(seq, name, new)
            i += 1
            continue
        why = unsupported_reason(m)
        n = bn_run(mods, i)
        if why is not None:
            ctx.skipped(p, m, why)
            i += 1
        elif n:
            has_bn_run = True
            pattern = "Conv2d -> BatchNorm2d" + (" -> ReLU" if n == 3 else "")
            ctx.fused(p, pattern, "FusedSequential (BN folded in eval, as is in training)")
            _report_hooks(ctx, path, names[i:i + n], mods[i:i + n])
            i += n
        elif i + 1 < len(mods) and is_relu(mods[i + 1]):
            why = conv_relu_blocker(m, mods[i + 1])
            if why is not None:
                ctx.skipped(p, m, why)
            else:
                setattr(seq, name, FusedConvReLU2d.from_conv(m, relu=True, backend=ctx.backend))
                _move_forward_hooks(mods[i + 1], getattr(seq, name))
                setattr(seq, names[i + 1], nn.Identity().train(mods[i + 1].training))
                ctx.fused(p, "Conv2d -> ReLU", "FusedConvReLU2d + Identity")
            i += 2
        else:
            ctx.skipped(p, m, "no ReLU or BatchNorm2d after it in its nn.Sequential: nothing to fuse")
            i += 1
    for name in exact_relus_after_linears(seq):
        ctx.fused(_join(path, name), "Linear -> ReLU", "ExactReLU (NaN kept under torch.compile)")
    if isinstance(seq, FusedSequential):
        seq.backend = ctx.backend
        return seq
    return FusedSequential.from_sequential(seq, ctx.backend) if has_bn_run else seq


def _move_forward_hooks(src: nn.Module, dst: nn.Module) -> None:
    """``src``'s forward hooks onto ``dst`` (after dst's own), with their flags, as torch.ao's
    fuse_modules moves the last module's hooks onto the fused module."""
    for hook_id, hook in src._forward_hooks.items():
        dst.register_forward_hook(hook, with_kwargs=hook_id in src._forward_hooks_with_kwargs,
                                  always_call=hook_id in src._forward_hooks_always_called)
    src._forward_hooks.clear()


def _report_hooks(ctx: _Ctx, path: str, names, mods) -> None:
    """Modules of a fused run that have hooks: the run goes unfused while they do."""
    hooked = [n for n, m in zip(names, mods) if has_hooks(m)]
    if hooked:
        ctx.skipped(_join(path, names[0]), mods[0],
                    f"{', '.join(_join(path, n) for n in hooked)} has hooks (forward pre-hooks "
                    "include torch.nn.utils.weight_norm, spectral_norm and prune): while it does, "
                    "the run goes as torch's modules so that they fire")


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
            else:
                _report_hooks(ctx, path, [name, "bn" + name[4:]],
                              [conv, getattr(block, "bn" + name[4:])])
    ds = block.downsample
    if conv_bn_pair(ds) is not None:
        _report_hooks(ctx, _join(path, "downsample"), ["0", "1"], list(ds))
    if ds is not None and conv_bn_pair(ds) is None:
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
        _report_hooks(ctx, path, ["conv1", "bn1"], [model.conv1, model.bn1])
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__} "
                        f"{model!r:.80}")
    check_backend_name(backend)
    report = FuseReport(backend=backend, mode="train" if model.training else "eval")
    if not inplace:
        try:
            # Outside inference mode: a copy made inside it would hold inference tensors, which
            # keep no version counter, so the BatchNorm folds and prepacked weights could not be
            # kept between calls (every call would redo them, ~2x slower on the CPU).
            with torch.inference_mode(False):
                model = copy.deepcopy(model)
        except RuntimeError as e:
            raise RuntimeError(
                f"fuse(model) fuses a deep copy (inplace=False) and torch can't deep-copy this "
                f"model ({e}). Pass inplace=True to fuse the model itself. (Models using the "
                "hook-based torch.nn.utils.weight_norm, spectral_norm or prune can't be deep-"
                "copied; their torch.nn.utils.parametrizations versions can.)") from e
    fused = _visit(model, "", _Ctx(backend, report))
    return (fused, report) if return_report else fused
