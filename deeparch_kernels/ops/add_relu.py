"""``relu(x + identity)``: the fused residual add + ReLU of every ResNet block.

  schema      deeparch::add_relu(Tensor x, Tensor identity) -> Tensor
              deeparch::add_relu_(Tensor(a!) x, Tensor identity) -> ()   (x = relu(x + identity))
  cpu, cuda   csrc/cpu/add_relu.cpp, csrc/cuda/add_relu.cu (registered by deeparch_kernels._C)
  triton      deeparch::add_relu_triton(_) below, kernel in deeparch_kernels/triton/add_relu.py
  aten        torch.add + in-place relu; reference: torch.relu(x + identity)
  fake        torch.empty_like(x): the output keeps x's memory format, like torch
  backward    both inputs get threshold_backward(grad, out, 0), the gradient torch.relu gives;
              in C++ (csrc/autograd.cpp) when the extension is built, else in Python below
"""
from __future__ import annotations

import torch

from .. import backends
from ._lib import HAS_TRITON, check, check_same_format, is_non_overlapping_and_dense, lib

OP = "add_relu"

lib.define("add_relu(Tensor x, Tensor identity) -> Tensor")
lib.define("add_relu_(Tensor(a!) x, Tensor identity) -> ()")


def _check_args(op: str, x: torch.Tensor, identity: torch.Tensor) -> None:
    check(isinstance(x, torch.Tensor) and isinstance(identity, torch.Tensor), op,
          "x and identity must be tensors", TypeError)
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), op,
          f"x must be float32, float16 or bfloat16, got {x.dtype}", TypeError)
    check(identity.device == x.device, op,
          f"identity must be on x's device {x.device}, got {identity.device}")
    check(identity.dtype == x.dtype, op, f"identity must have x's dtype {x.dtype}, got {identity.dtype}",
          TypeError)
    check(identity.shape == x.shape, op,
          f"identity must have x's shape {tuple(x.shape)}, got {tuple(identity.shape)}")
    check_same_format(op, x, "x", identity, "identity")


@torch.library.register_fake("deeparch::add_relu")
def _add_relu_fake(x, identity):
    torch._check(x.shape == identity.shape, lambda: "add_relu: x and identity shapes differ")
    return torch.empty_like(x)


@torch.library.register_fake("deeparch::add_relu_")
def _add_relu_inplace_fake(x, identity):
    torch._check(x.shape == identity.shape, lambda: "add_relu_: x and identity shapes differ")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    return (g if ctx.needs_input_grad[0] else None, g if ctx.needs_input_grad[1] else None)


def register_python_autograd() -> None:
    """deeparch::add_relu's autograd in Python: only where the C++ extension (csrc/autograd.cpp,
    which registers it without a Python call on the path) is missing or stale."""
    torch.library.register_autograd("deeparch::add_relu", _backward, setup_context=_setup_context)


def _dense_like(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """t in out's (dense) layout, so one flat kernel walks both."""
    if t.stride() == out.stride() and is_non_overlapping_and_dense(t):
        return t
    return torch.empty_like(out).copy_(t)


if HAS_TRITON:
    from ..triton import add_relu as _tk

    @torch.library.triton_op("deeparch::add_relu_triton", mutates_args=())
    def add_relu_triton(x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        return _tk.add_relu(_dense_like(x, out), _dense_like(identity, out), out)

    @torch.library.triton_op("deeparch::add_relu_triton_", mutates_args={"x"})
    def add_relu_triton_(x: torch.Tensor, identity: torch.Tensor) -> None:
        if is_non_overlapping_and_dense(x):
            _tk.add_relu(x, _dense_like(identity, x), x)
        else:
            x.copy_(add_relu_triton(x, identity))

    # Explicit fakes: the derived ones would run the kernel on fake tensors under the interpreter.
    add_relu_triton.register_fake(_add_relu_fake)
    add_relu_triton_.register_fake(_add_relu_inplace_fake)
    torch.library.register_autograd("deeparch::add_relu_triton", _backward,
                                    setup_context=_setup_context)


def _aten(x, identity):
    return torch.add(x, identity).relu_()


def _aten_(x, identity):
    x.add_(identity).relu_()


def _reference(x, identity):
    return torch.relu(x + identity)


def _reference_(x, identity):
    x.copy_(torch.relu(x + identity))


_OUT_OF_PLACE = {
    "cuda": torch.ops.deeparch.add_relu.default,
    "cpu": torch.ops.deeparch.add_relu.default,
    "aten": _aten,
    "reference": _reference,
}
_IN_PLACE = {
    "cuda": torch.ops.deeparch.add_relu_.default,
    "cpu": torch.ops.deeparch.add_relu_.default,
    "aten": _aten_,
    "reference": _reference_,
}
if HAS_TRITON:
    _OUT_OF_PLACE["triton"] = torch.ops.deeparch.add_relu_triton.default
    _IN_PLACE["triton"] = torch.ops.deeparch.add_relu_triton_.default

for _name, _fn in _OUT_OF_PLACE.items():
    backends.register(OP, _name, _fn)


def _key(x: torch.Tensor) -> tuple:
    return (x.dtype, x.numel(), x.is_contiguous())


def add_relu(x: torch.Tensor, identity: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``relu(x + identity)`` in one pass; the output keeps x's memory format.

    NaN and Inf come out exactly as ``torch.relu(x + identity)`` gives them. Differentiable in
    both inputs. ``backend``: "auto" or one of deeparch_kernels.backends.BACKENDS.
    """
    try:
        fast = (OP, backend, backends.tensor_sig(x), backends.tensor_sig(identity))
    except AttributeError:  # not tensors: the checks below say so
        fast = None
    fn = backends.fast_lookup(fast) if fast is not None else None
    if fn is None:
        _check_args("add_relu", x, identity)
        name = backends.choose(OP, backend, x.device, _key(x), (x, identity))
        fn = backends.fast_store(fast, OP, name) if fast is not None else _OUT_OF_PLACE[name]
    return fn(x, identity)


def add_relu_(x: torch.Tensor, identity: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """In place: ``x = relu(x + identity)``, torchvision's ``out += identity; out = relu(out)``.
    Returns x."""
    try:
        fast = (OP + "_", backend, backends.tensor_sig(x), backends.tensor_sig(identity))
        name = backends.fast_lookup(fast)
    except AttributeError:  # not tensors: the checks below say so
        fast, name = None, None
    if name is None:
        _check_args("add_relu_", x, identity)
        name = backends.choose(OP, backend, x.device, _key(x), (x, identity))
        if fast is not None:
            backends.fast_remember(fast, name)
    if torch.is_grad_enabled() and (x.requires_grad or identity.requires_grad):
        # Autograd through the out-of-place op, then an autograd-aware copy into x (like x += y,
        # this raises for a leaf that requires grad).
        x.copy_(_OUT_OF_PLACE[name](x, identity))
    else:
        _IN_PLACE[name](x, identity)
    return x
