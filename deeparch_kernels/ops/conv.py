"""``relu?(conv2d(x, weight, stride, padding) + bias + residual)``: the fused convolution.

  schema      deeparch::fused_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? residual,
                                     int[2] stride, int[2] padding, bool relu) -> Tensor
  cpu         csrc/cpu/fused_conv2d.cpp (oneDNN conv + one fused epilogue pass)
  cutlass     deeparch::fused_conv2d_cutlass below, csrc/cuda/cutlass/ (CUTLASS 3.x sm_90a:
              TMA im2col + WGMMA, the epilogue fused through CUTLASS's visitor tree)
  cuda        csrc/cuda/fused_conv2d.cu (tensor-core implicit GEMM, fused epilogue)
  triton      deeparch::fused_conv2d_triton below, kernel in deeparch_kernels/triton/conv.py
  aten        ATen/cuDNN/oneDNN conv2d (+bias), then our fused add+ReLU (or ReLU)
  reference   plain torch: relu(conv2d(x, w, b) + residual)
  fake        the output shape, in the memory format torch's conv2d gives (channels_last when
              x or weight is channels_last)
  backward    ReLU mask from the output (threshold_backward), then ATen's convolution_backward
              for x, weight and bias; the residual gets the masked gradient. In C++
              (csrc/autograd.cpp) when the extension is built, else in Python below; the Triton
              op keeps the Python one

groups=1 and dilation=1 only; any kernel size, stride >= 1, padding >= 0.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import backends
from ._lib import HAS_TRITON, check, formats, lib
from .add_relu import add_relu, add_relu_

OP = "fused_conv2d"
_SCHEMA_ARGS = ("Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
                "int[2] padding, bool relu")
lib.define(f"fused_conv2d({_SCHEMA_ARGS}) -> Tensor")

IntPair = Union[int, Sequence[int]]


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """torch's conv2d rule (and csrc/common.h's): channels_last if x or weight is."""
    return torch.channels_last if (_is_channels_last(x) or _is_channels_last(weight)) else torch.contiguous_format


def output_shape(x, weight, stride, padding) -> Tuple[int, int, int, int]:
    N, _, H, W = x.shape
    K, _, kh, kw = weight.shape
    return (N, K, (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1)


@torch.library.register_fake("deeparch::fused_conv2d")
def _fake(x, weight, bias, residual, stride, padding, relu):
    shape = output_shape(x, weight, stride, padding)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x, weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, relu = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conf = (list(stride), list(padding), relu, bias is not None)


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    stride, padding, relu, has_bias = ctx.conf
    g = torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad
    need = ctx.needs_input_grad
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, [1, 1], False,
        [0, 0], 1, [need[0], need[1], has_bias and need[2]])
    return gx, gw, (gb if has_bias and need[2] else None), (g if need[3] else None), None, None, None


def register_python_autograd() -> None:
    """deeparch::fused_conv2d's autograd in Python: only where the C++ extension
    (csrc/autograd.cpp, the same backward without a Python call on the path) is missing or stale."""
    torch.library.register_autograd("deeparch::fused_conv2d", _backward, setup_context=_setup_context)

if HAS_TRITON:

    @torch.library.triton_op("deeparch::fused_conv2d_triton", mutates_args=())
    def fused_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            residual: Optional[torch.Tensor], stride: List[int], padding: List[int],
                            relu: bool) -> torch.Tensor:
        from ..triton import conv as _tk  # the kernel module; imported on first use

        y = _tk.fused_conv2d(x, weight, bias, residual, stride, padding, relu)  # channels_last
        return y.contiguous(memory_format=output_memory_format(x, weight))

    fused_conv2d_triton.register_fake(_fake)  # the derived fake would run the interpreter
    torch.library.register_autograd("deeparch::fused_conv2d_triton", _backward,
                                    setup_context=_setup_context)

# The CUTLASS sm_90a kernels: the same op under its own name (a backend of its own); the CUDA
# kernel registers itself from csrc/cuda/cutlass/conv_sm90_op.cpp when the extension has it.
lib.define(f"fused_conv2d_cutlass({_SCHEMA_ARGS}) -> Tensor")
torch.library.register_fake("deeparch::fused_conv2d_cutlass")(_fake)
torch.library.register_autograd("deeparch::fused_conv2d_cutlass", _backward,
                                setup_context=_setup_context)


def cutlass_refusal(dtype: torch.dtype, x_shape, w_shape, stride, padding,
                    capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """Why the CUTLASS kernels can't run this convolution (None: they can). capability: the
    GPU's compute capability, None for a non-CUDA tensor. The same rules as refusal()
    in csrc/cuda/cutlass/conv_sm90_op.cpp; the tests check both against CUTLASS's can_implement."""
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    (sh, sw), (ph, pw) = stride, padding
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the CUTLASS kernels take float16 or bfloat16, got {str(dtype).replace('torch.', '')}"
    if C <= 0 or C % 8 or K % 8:
        return f"the CUTLASS kernels need C and K multiples of 8 (16-byte TMA rows), got C={C}, K={K}"
    if sh > 8 or sw > 8:
        return f"the CUTLASS kernels take strides up to 8 (TMA im2col traversal), got ({sh}, {sw})"
    if (ph > 128 or pw > 128 or R - 1 - ph > 128 or S - 1 - pw > 128 or ph - (R - 1) > 127
            or pw - (S - 1) > 127 or R > 255 or S > 255):
        return ("the CUTLASS kernels' TMA im2col corners need padding <= 128, kernel - 1 - padding "
                f"<= 128 and kernel <= 255, got kernel ({R}, {S}), padding ({ph}, {pw})")
    P, Q = (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1
    if (N * H * W > 2**31 - 1 or N * P * Q > 2**31 - 1 or N * H * W * C >= 2**38
            or N * P * Q * K >= 2**38):
        return ("the CUTLASS kernels' extents are 32-bit: N*H*W and N*Ho*Wo must be below 2^31 and "
                "each tensor below 2^38 elements")
    if capability is None:
        return "the CUTLASS kernels run CUDA tensors"
    if tuple(capability) != (9, 0):
        return ("the CUTLASS kernels are built for sm_90a (Hopper) only; this GPU is "
                f"sm_{capability[0]}{capability[1]}")
    return None


def _cutlass_supports(x, weight, bias, residual, stride, padding, relu):
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    return cutlass_refusal(x.dtype, x.shape, weight.shape, stride, padding, cap)


def _aten(x, weight, bias, residual, stride, padding, relu):
    y = F.conv2d(x, weight, bias, stride, padding)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, residual)):
        if residual is not None:
            return add_relu(y, residual) if relu else y + residual
        return torch.relu(y) if relu else y
    # Inference: the epilogue in place on the fresh conv output, one pass, no allocation.
    if residual is not None:
        return add_relu_(y, residual) if relu else y.add_(residual)
    return y.relu_() if relu else y


def _reference(x, weight, bias, residual, stride, padding, relu):
    y = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _cuda_supports(x, weight, *_):
    return None


backends.register(OP, "cpu", torch.ops.deeparch.fused_conv2d.default)
backends.register(OP, "cuda", torch.ops.deeparch.fused_conv2d.default, _cuda_supports)
backends.register(OP, "cutlass", torch.ops.deeparch.fused_conv2d_cutlass.default, _cutlass_supports)
backends.register(OP, "aten", _aten)
backends.register(OP, "reference", _reference)
if HAS_TRITON:
    backends.register(OP, "triton", torch.ops.deeparch.fused_conv2d_triton.default)
# On the CPU both backends run oneDNN's convolution with our in-place epilogue; measured on the
# VGG/ResNet batch-1 layers (benchmarks/results/2026-11-27-cpu.md) "aten" was 1.03x eager and
# the C++ op 0.99x, so "auto" takes "aten" first there.
backends.set_auto_order(OP, "cpu", ("aten", "cpu"))


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    check(len(v) == 2 and all(isinstance(i, int) for i in v), OP,
          f"{name} must be an int or a pair of ints, got {v!r}", TypeError)
    return v  # type: ignore[return-value]


def _check_args(x, weight, bias, residual, stride, padding, dilation, groups) -> None:
    check(isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor), OP,
          "x and weight must be tensors", TypeError)
    check(x.dim() == 4, OP, f"x must be 4-D (N, C, H, W), got {x.dim()}-D")
    check(weight.dim() == 4, OP, f"weight must be 4-D (K, C, kh, kw), got {weight.dim()}-D")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), OP,
          f"x must be float32, float16 or bfloat16, got {x.dtype}", TypeError)
    check(groups == 1, OP, f"groups={groups} is not supported (only groups=1)", NotImplementedError)
    check(dilation == (1, 1), OP, f"dilation={dilation} is not supported (only 1)", NotImplementedError)
    check(stride[0] >= 1 and stride[1] >= 1, OP, f"stride must be >= 1, got {stride}")
    check(padding[0] >= 0 and padding[1] >= 0, OP, f"padding must be >= 0, got {padding}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        check(isinstance(t, torch.Tensor), OP, f"{name} must be a tensor or None", TypeError)
        check(t.device == x.device, OP, f"{name} must be on x's device {x.device}, got {t.device}")
        check(t.dtype == x.dtype, OP, f"{name} must have x's dtype {x.dtype}, got {t.dtype}", TypeError)
    check(weight.shape[1] == x.shape[1], OP,
          f"weight has {weight.shape[1]} input channels but x has {x.shape[1]} "
          "(weight must be (K, C, kh, kw); groups != 1 is not supported)")
    H, W = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    check(H >= weight.shape[2] and W >= weight.shape[3], OP,
          f"the padded input ({H}x{W}) is smaller than the kernel "
          f"({weight.shape[2]}x{weight.shape[3]})")
    K = weight.shape[0]
    if bias is not None:
        check(bias.shape == (K,), OP, f"bias must have shape ({K},), got {tuple(bias.shape)}")
    if residual is not None:
        want = output_shape(x, weight, stride, padding)
        check(tuple(residual.shape) == want, OP,
              f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
        out_fmt = "channels_last" if output_memory_format(x, weight) == torch.channels_last else "contiguous"
        if formats(residual) and out_fmt not in formats(residual):
            raise ValueError(f"{OP}: residual is {'/'.join(sorted(formats(residual)))} but the output "
                             f"will be {out_fmt} (torch's rule: channels_last if x or weight is); "
                             "mixed memory formats are not supported: convert residual with "
                             ".contiguous(memory_format=...)")


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 stride: IntPair = 1, padding: Optional[IntPair] = None,
                 residual: Optional[torch.Tensor] = None, relu: bool = True,
                 dilation: IntPair = 1, groups: int = 1, backend: str = "auto") -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding) + residual)`` as one op.

    padding=None means kernel_size // 2 ("same" for odd kernels at stride 1). The ReLU and the
    residual add are optional and fused into the convolution's epilogue. The output takes the
    memory format torch's conv2d would give (channels_last if x or weight is). groups and
    dilation other than 1 raise NotImplementedError. ``backend``: "auto" or one of
    deeparch_kernels.backends.BACKENDS.
    """
    sig = backends.tensor_sig
    try:
        fast = (OP, backend, sig(x), sig(weight), sig(bias), sig(residual), stride, padding, relu,
                dilation, groups)
        fn = backends.fast_lookup(fast)
    except (AttributeError, TypeError):  # not tensors, or unhashable arguments: checked below
        fast, fn = None, None
    if fn is None:
        fn, stride, padding = _resolve(x, weight, bias, residual, stride, padding, relu, dilation,
                                       groups, backend, fast)
    elif padding is None:
        padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    s, p = _pair(stride, "stride"), _pair(padding, "padding")
    return fn(x, weight, bias, residual, [s[0], s[1]], [p[0], p[1]], relu)


def _resolve(x, weight, bias, residual, stride, padding, relu, dilation, groups, backend, fast):
    """The slow path of fused_conv2d: validate, pick the backend, remember the pick."""
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    if padding is None:
        check(isinstance(weight, torch.Tensor) and weight.dim() == 4, OP,
              "weight must be a 4-D tensor (K, C, kh, kw)")
        padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    padding = _pair(padding, "padding")
    _check_args(x, weight, bias, residual, stride, padding, dilation, groups)
    key = (x.dtype, tuple(x.shape), tuple(weight.shape), stride, padding, bias is not None,
           residual is not None, relu, output_memory_format(x, weight))
    args = (x, weight, bias, residual, list(stride), list(padding), relu)
    name = backends.choose(OP, backend, x.device, key, args)
    fn = backends.fast_store(fast, OP, name) if fast is not None else backends._IMPLS[OP][name]
    return fn, stride, padding
