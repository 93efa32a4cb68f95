"""``relu(x + identity)``: the fused residual add + ReLU of every ResNet block.

  schema      deeparch::add_relu(Tensor x, Tensor identity) -> Tensor
              deeparch::add_relu_(Tensor(a!) x, Tensor identity) -> ()   (x = relu(x + identity))
  cpu, cuda   csrc/cpu/add_relu.cpp, csrc/cuda/add_relu.cu (registered by deeparch_kernels._C);
              add_relu_'s version-counter bump and autograd: csrc/autograd.cpp
  triton      deeparch::add_relu_triton(_) below, kernel in deeparch_kernels/triton/add_relu.py
  aten        torch.add + in-place relu; reference: torch.relu(x + identity)
  fake        torch.empty_like(x): the output keeps x's memory format, like torch
  backward    both inputs get threshold_backward(grad, out, 0), the gradient torch.relu gives;
              in C++ (csrc/autograd.cpp) when the extension is built, else in Python below
  check       what ``auto`` verifies a backend's output with (``_check``): torch's result, NaN
              and Inf exactly, finite values within one rounding of the output dtype

The public functions take what ``torch.relu(x + identity)`` (and, in place, torchvision's
``out += identity; out = relu(out)``) takes: any dtype, a broadcastable identity, torch's type
promotion, a 0-d CPU identity with a CUDA x. Our kernels run one dtype of float32, float16 or
bfloat16 and identical shapes; with ``auto`` everything else runs as stock PyTorch.
"""
from __future__ import annotations

import torch

from .. import _ext, backends
from ..testing import mismatch, unit_roundoff
from ._lib import (HAS_TRITON, KERNEL_DTYPES, check, check_dense, check_inplace_overlap, fx_proxy,
                   is_non_overlapping_and_dense, lib)

OP = "add_relu"
OP_ = "add_relu_"

lib.define("add_relu(Tensor x, Tensor identity) -> Tensor")
lib.define("add_relu_(Tensor(a!) x, Tensor identity) -> ()")
# x.relu_(), opaque to torch.compile (csrc/cpu/add_relu.cpp, CPU only): the ReLU after a
# convolution (ops/conv.py's epilogue) or a linear (nn/relu.py ExactReLU) under inductor's
# freezing, which would otherwise fuse it into oneDNN's op as a post-op and lose NaN.
lib.define("relu_(Tensor(a!) x) -> ()")


def inductor_folds_relu(*tensors) -> bool:
    """torch.compile is tracing CPU inference (fp32 or bf16, no gradient needed for ``tensors``,
    the op's inputs; None ones are skipped) with inductor's freezing on -- where it prepacks stock
    convolutions (and bf16 linears) for oneDNN and folds a ReLU after them into oneDNN's post-op,
    which turns NaN into 0 -- and deeparch::relu_, the ReLU it can't fold, is built."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or _ext.cpu_reason():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    try:
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover
        return False
    return bool(inductor_config.freezing) and torch.compiler.is_compiling()


@torch.library.register_fake("deeparch::add_relu")
def _add_relu_fake(x, identity):
    torch._check(x.shape == identity.shape, lambda: "add_relu: x and identity shapes differ")
    return torch.empty_like(x)


@torch.library.register_fake("deeparch::relu_")
def _relu_inplace_fake(x):
    return None


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
        check_inplace_overlap("add_relu_", x, identity)
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
    return x.add_(identity).relu_()


def _reference(x, identity):
    return torch.relu(x + identity)


def _reference_(x, identity):
    return x.copy_(torch.relu(x + identity))


def _kernel_supports(x, identity):
    """Why our kernels can't run these inputs (stock PyTorch then does), or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype}: our kernels take float32, float16 and bfloat16"
    if identity.dtype != x.dtype:
        return f"identity is {identity.dtype} and x {x.dtype}: type promotion runs on stock PyTorch"
    if identity.shape != x.shape:
        return f"identity {tuple(identity.shape)} broadcasts to x {tuple(x.shape)}: runs on stock PyTorch"
    if identity.device != x.device:
        return f"identity is on {identity.device} and x on {x.device}"
    return None


def _check(out, x, identity):
    """How ``out`` differs from torch's relu(x + identity) beyond one rounding (None if not)."""
    expected = torch.relu(x + identity).to(out.dtype if out.shape == x.shape else x.dtype)
    bound = (x.detach().double().abs() + identity.detach().double().abs()) * unit_roundoff(expected.dtype)
    return mismatch(out, expected, bound.expand(expected.shape))


def _in_place(fn):
    def run(x, identity):
        fn(x, identity)
        return x
    return run


_OUT_OF_PLACE = {"aten": _aten, "reference": _reference}
_IN_PLACE = {"aten": _aten_, "reference": _reference_}
for _name in ("cuda", "cpu"):  # the C++ kernels (available when the extension is built)
    _OUT_OF_PLACE[_name] = torch.ops.deeparch.add_relu.default
    _IN_PLACE[_name] = _in_place(torch.ops.deeparch.add_relu_.default)
if HAS_TRITON:
    _OUT_OF_PLACE["triton"] = torch.ops.deeparch.add_relu_triton.default
    _IN_PLACE["triton"] = _in_place(torch.ops.deeparch.add_relu_triton_.default)

backends.define_op(OP, check=_check)
backends.define_op(OP_, check=_check, mutates=(0,))
for _name in _OUT_OF_PLACE:
    _sup = None if _name in backends.STOCK else _kernel_supports
    backends.register(OP, _name, _OUT_OF_PLACE[_name], _sup)
    backends.register(OP_, _name, _IN_PLACE[_name], _sup)


def _check_args(op: str, x, identity, inplace: bool) -> None:
    check(isinstance(x, torch.Tensor) and isinstance(identity, torch.Tensor), op,
          lambda: f"x and identity must be tensors, got {type(x).__name__} and "
                  f"{type(identity).__name__} (for a number c, use torch.relu(x + c))", TypeError)
    check_dense(op, x, "x")
    check_dense(op, identity, "identity")
    check(identity.device == x.device or (identity.dim() == 0 and identity.device.type == "cpu"), op,
          lambda: f"identity must be on x's device {x.device} (or be a 0-d CPU tensor), got "
                  f"{identity.device}")
    try:
        shape = torch.broadcast_shapes(x.shape, identity.shape)
    except RuntimeError:
        raise ValueError(f"{op}: identity's shape {tuple(identity.shape)} does not broadcast with "
                         f"x's {tuple(x.shape)}") from None
    if inplace:
        check(shape == x.shape, op, lambda: f"identity's shape {tuple(identity.shape)} broadcasts "
              f"x's {tuple(x.shape)} to {tuple(shape)}: the result must fit x (in place)")
        result = torch.result_type(x, identity)
        check(torch.can_cast(result, x.dtype), op, lambda: f"the result type {result} can't be cast "
              f"to x's dtype {x.dtype} (in place)", TypeError)
        check_inplace_overlap(op, x, identity)


def _key(x: torch.Tensor, identity: torch.Tensor) -> tuple:
    return (x.dtype, identity.dtype, x.numel(), identity.numel(), x.is_contiguous(),
            identity.stride() == x.stride())


def _implementation(op: str, x, identity, backend: str):
    """(the implementation to call, whether the fast path remembered it); (None, False) for
    ``auto`` while tracing (the caller writes stock ops). On a miss the arguments are checked
    and the backend chosen (backends.choose), then remembered for these tensor signatures."""
    try:
        fast = (op, backend, backends.tensor_sig(x), backends.tensor_sig(identity))
    except (AttributeError, RuntimeError):  # not (dense) tensors: the checks below say so
        fast = None
    fn = backends.fast_lookup(fast)
    if fn is not None:
        return fn, True
    if backend == "auto" and backends.is_tracing():
        return None, False
    _check_args(op, x, identity, inplace=op == OP_)
    fn = backends.impl(op, backends.choose(op, backend, x.device, _key(x, identity), (x, identity)))
    backends.fast_store(fast, fn)
    return fn, False


def add_relu(x: torch.Tensor, identity: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``relu(x + identity)`` in one pass; the output keeps x's memory format.

    Everything ``torch.relu(x + identity)`` takes (broadcasting, type promotion) and gives: NaN
    and Inf come out exactly as torch gives them, differentiable in both inputs. ``backend``:
    "auto" (checked before it is trusted, see deeparch_kernels.backends) or a backend name.
    """
    proxy = fx_proxy(x, identity)
    if proxy is not None:  # torch.fx.symbolic_trace: one call_function node
        return proxy.tracer.create_proxy("call_function", add_relu, (x, identity), {"backend": backend})
    fn, _ = _implementation(OP, x, identity, backend)
    if fn is None:  # auto while tracing: stock ops, which the compiler fuses with their neighbours
        return torch.relu(x + identity)
    return fn(x, identity)


def add_relu_(x: torch.Tensor, identity: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """In place: ``x = relu(x + identity)``, torchvision's ``out += identity; out = relu(out)``
    (x keeps its dtype; identity broadcasts to x). Returns x. Bumps x's version counter, and
    refuses an identity that partially overlaps x, as torch's in-place ops do."""
    proxy = fx_proxy(x, identity)
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", add_relu_, (x, identity), {"backend": backend})
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and isinstance(identity, torch.Tensor) \
            and (x.requires_grad or identity.requires_grad):
        _check_args(OP_, x, identity, inplace=True)
        # Autograd through the out-of-place op, then an autograd-aware copy into x (like x += y,
        # this raises for a leaf that requires grad).
        return x.copy_(add_relu(x, identity, backend=backend))
    fn, fast_hit = _implementation(OP_, x, identity, backend)
    if fn is None:
        return x.add_(identity).relu_()
    if fast_hit and x.data_ptr() != identity.data_ptr() \
            and x.untyped_storage().data_ptr() == identity.untyped_storage().data_ptr():
        check_inplace_overlap(OP_, x, identity)  # same signatures, but views of one storage
    return fn(x, identity)
