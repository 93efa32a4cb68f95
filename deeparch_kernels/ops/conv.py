"""``relu?(conv2d(x, weight, stride, padding) + bias + residual)``: the fused convolution.

  schema      deeparch::fused_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? residual,
                                     int[2] stride, int[2] padding, bool relu) -> Tensor
              deeparch::fused_conv2d_auto(...same...) -> Tensor: ``backend="auto"`` as one op,
              the choice made when it runs (what torch.compile and torch.export record)
              deeparch::fused_conv2d_frozen(...same...) -> Tensor: the same, for a weight that
              stays (what torch.compile with inductor's freezing records for a layer the
              ``winograd`` backend may run: what the backends derive from it is kept)
  cpu         csrc/cpu/fused_conv2d.cpp (oneDNN conv + one fused epilogue pass)
  cutlass     deeparch::fused_conv2d_cutlass below, csrc/cuda/cutlass/ (CUTLASS 3.x sm_90a:
              TMA im2col + WGMMA, the epilogue fused through CUTLASS's visitor tree)
  cuda        csrc/cuda/fused_conv2d.cu (tensor-core implicit GEMM, fused epilogue)
  triton      deeparch::fused_conv2d_triton below, kernel in deeparch_kernels/triton/conv.py
  aten        ATen/cuDNN/oneDNN conv2d (+bias), then torch's add/ReLU in place on its output
              (``conv2d`` below: F.conv2d, routed around a oneDNN bf16 bug)
  reference   plain torch: relu(conv2d(x, w, b) + residual)
  fake        the output shape, in the memory format torch's conv2d gives (ops/_lib.py
              output_memory_format: channels_last when x or weight suggests it)
  backward    ReLU mask from the output (threshold_backward), then ATen's convolution_backward
              for x, weight and bias; the residual gets the masked gradient. In C++
              (csrc/autograd.cpp) when the extension is built, else in Python below; the Triton
              and auto ops keep the Python one
  check       what ``auto`` verifies a backend's output with (``_check``): torch's result, NaN
              and Inf exactly, finite values within a bound from the dtype's rounding and the
              reduction length
  bound       ``bind``/``BoundConv``: a call bound to its inputs' signature, the fast path's
              per-call work done once (oneDNN on the prepacked weight for ``cpu``); the fused
              modules keep one per BatchNorm fold (nn/folding.py)

The public ``fused_conv2d`` takes what ``relu(F.conv2d(x, weight, bias, stride, padding,
dilation, groups) + residual)`` takes -- unbatched (C, H, W) inputs, ``padding="same"/"valid"``,
numpy or 0-d tensor ints, a residual in another dtype (torch's promotion), another memory format
or broadcastable, autocast -- and gives torch's result. Our kernels run groups=1, dilation=1,
one dtype of float32/float16/bfloat16; with ``auto`` the rest runs as stock PyTorch, and an
explicit backend that can't run it raises BackendUnavailable.
"""
from __future__ import annotations

import functools
import operator
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import _ext, _precision, backends
from .._conv_args import check_conv_args
from ..testing import mismatch, unit_roundoff
from . import conv_gemm, conv_winograd
from ._lib import (HAS_TRITON, KERNEL_DTYPES, check, fx_proxy, int_pair, lib,
                   output_memory_format)
from .add_relu import add_relu, inductor_folds_relu

OP = "fused_conv2d"
_SCHEMA_ARGS = ("Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
                "int[2] padding, bool relu")
lib.define(f"fused_conv2d({_SCHEMA_ARGS}) -> Tensor")
lib.define(f"fused_conv2d_auto({_SCHEMA_ARGS}) -> Tensor")
lib.define(f"fused_conv2d_frozen({_SCHEMA_ARGS}) -> Tensor")

IntPair = Union[int, Sequence[int]]


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


def conv2d(x, weight, bias, stride, padding):
    """F.conv2d, routed around a oneDNN bug: on the CPU, bfloat16 convolutions with a single
    output column and a column stride > 1 come out wrong (oneDNN 3.12 in torch 2.14; found by
    tests/test_fuzz.py). With one output column the stride doesn't matter: stride 1, column 0.
    csrc/cpu/fused_conv2d.cpp does the same."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and stride[1] > 1 and \
            (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] == 0:
        y = F.conv2d(x, weight, bias, (stride[0], 1), padding)[..., :1]
        return y.contiguous(memory_format=output_memory_format(x, weight))
    return F.conv2d(x, weight, bias, stride, padding)


def _aten(x, weight, bias, residual, stride, padding, relu):
    y = conv2d(x, weight, bias, stride, padding)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, residual)):
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    # Inference: the epilogue in place on the fresh conv output, no allocation.
    if residual is not None:
        y.add_(residual)
    return y.relu_() if relu else y


def _reference(x, weight, bias, residual, stride, padding, relu):
    y = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _kernel_supports(x, weight, bias, residual, stride, padding, relu):
    """Why our kernels (cpu, cuda, triton) can't run these inputs (stock PyTorch then does)."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype}: our kernels take float32, float16 and bfloat16"
    return None


def _check(out, x, weight, bias, residual, stride, padding, relu):
    """How ``out`` differs from torch's result beyond the op's error bound (None if it does not).

    The expected result is torch's, rounded as torch rounds: conv2d(x, w) + bias to the dtype,
    then + residual, rounded again (a fused kernel may round once); the convolution itself is
    computed in float32 for the half types (exact products), which also keeps it clear of
    oneDNN's half-precision paths. Both accumulate a length-L dot product (L = C*kh*kw). The bound
    per element: two roundings of the terms (2u (|conv| + |residual| + |out|)), plus the
    accumulation's worst case on the sum of absolute products A = conv2d(|x|, |w|) + |bias|:
    L * 2^-24 for fp32 accumulation (exact products of half inputs, or fp32), 2^-10 where
    fp32 convolutions may round their inputs to TF32 (or 2^-7 to bf16 on the CPU), L * 2^-53 in
    float64. Garbage, a missed tap, a wrong channel or a swallowed NaN are far outside it."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = F.conv2d(x.to(wide), weight.to(wide), None if bias is None else bias.to(wide), stride,
                 padding).to(x.dtype)
    pre = c if residual is None else (c.to(wide) + residual.to(wide)).to(x.dtype)
    expected = torch.relu(pre) if relu else pre
    a = F.conv2d(x.detach().abs().to(wide), weight.detach().abs().to(wide), None, stride, padding)
    if bias is not None:
        a = a + bias.detach().abs().to(wide)[:, None, None]
    L = weight.shape[1] * weight.shape[2] * weight.shape[3]
    acc = L * unit_roundoff(torch.float32) if wide == torch.float32 else L * unit_roundoff(torch.float64)
    if x.dtype == torch.float32:
        mode = _precision.key(x.device.type)[0]
        acc = max(acc, {"tf32": 2.0 ** -10, "bf16": 2.0 ** -7}.get(mode, 0.0))
    terms = c.detach().to(wide).abs() + expected.detach().to(wide).abs()
    if residual is not None:
        terms = terms + residual.detach().to(wide).abs()
    tiny = torch.finfo(expected.dtype).tiny
    bound = 2 * unit_roundoff(expected.dtype) * terms + acc * a + tiny
    return mismatch(out, expected, bound)


# --------------------------------------------------------------------------- cpu: prepacked weights

class _Packed:
    """oneDNN-prepacked copies of one weight, per input geometry, and the weight's state when
    they were made (version counter, storage, layout): a write through the weight (an
    optimizer step, ``load_state_dict``, ``w.mul_()``) makes them stale. Like every cache keyed on
    torch's version counters, it can't see writes through ``w.data``."""

    __slots__ = ("state", "by_geometry", "winograd", "gemm", "frozen")
    MAX_GEOMETRIES = 8

    def __init__(self) -> None:
        self.state: Optional[tuple] = None
        self.by_geometry: dict = {}
        self.winograd: Dict[int, conv_winograd.Transformed] = {}  # by tile size
        self.gemm: Optional[torch.Tensor] = None  # conv_gemm.pack_weight, for 1x1 weights
        # fused_conv2d_frozen's last call bound (BoundConv) with the bias it was bound to
        self.frozen: Optional[Tuple["BoundConv", Optional[torch.Tensor]]] = None

    def _fresh(self, weight: torch.Tensor) -> bool:
        """Drop what was derived from an older state of ``weight``; False if none can be kept."""
        try:
            state = (weight._version, weight.data_ptr(), weight.dtype, weight.shape, weight.stride())
        except RuntimeError:  # an inference tensor: no version counter, nothing can be kept
            warn_unversioned_weight()
            return False
        if state != self.state:
            self.state, self.by_geometry, self.winograd, self.gemm, self.frozen = state, {}, {}, None, None
        return True

    def get_winograd(self, weight: torch.Tensor, m: int) -> Optional[conv_winograd.Transformed]:
        """conv_winograd.transform_weight(weight, m), kept while the weight is unchanged."""
        if not self._fresh(weight):
            return None
        t = self.winograd.get(m)
        if t is None:
            with torch.inference_mode(False), torch.no_grad():
                t = self.winograd[m] = conv_winograd.transform_weight(weight, m)
        return t

    def get_gemm(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """conv_gemm.pack_weight(weight), kept while the weight is unchanged."""
        if not self._fresh(weight):
            return None
        if self.gemm is None:
            with torch.inference_mode(False), torch.no_grad():
                self.gemm = conv_gemm.pack_weight(weight)
        return self.gemm

    def get(self, weight: torch.Tensor, x: torch.Tensor, stride, padding) -> Optional[torch.Tensor]:
        if not self._fresh(weight):
            return None
        key = (x.shape[0], x.shape[2], x.shape[3], stride[0], stride[1], padding[0], padding[1])
        packed = self.by_geometry.get(key)
        if packed is None:
            if len(self.by_geometry) >= self.MAX_GEOMETRIES:
                self.by_geometry.clear()
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    weight, list(padding), list(stride), [1, 1], 1, list(x.shape))
            self.by_geometry[key] = packed
        return packed


def warn_unversioned_weight() -> None:
    """Say (once: Python's default warning filter) that a fused module's cached CPU state (the
    prepacked weight, the BatchNorm fold) can't be kept because a weight is an inference tensor."""
    warnings.warn(
        "deeparch_kernels: a fused module's weight is an inference tensor (the model was built, "
        "fused or moved with .to() inside torch.inference_mode()). Inference tensors keep no "
        "version counter, so its BatchNorm fold and oneDNN-prepacked weight can't be kept between "
        "calls and are redone at every call (about 2x slower on the CPU). Build the model, fuse() "
        "it and .to() it outside inference_mode; running it inside is fine.", RuntimeWarning,
        stacklevel=2)


# id(weight) -> (a weak reference to it, its _Packed). Keyed by identity (a WeakKeyDictionary
# would compare tensors with ==); the entry goes when the weight does.
_PACKED: "dict[int, Tuple[weakref.ref, _Packed]]" = {}


def prepack(weight: torch.Tensor) -> None:
    """Let the ``cpu`` backend keep oneDNN-prepacked copies of ``weight`` (made on first use per
    input geometry, dropped with the weight, remade after a write through it; see _Packed). For
    weights the caller owns and reuses: the fused modules' folded and inference weights."""
    k = id(weight)
    e = _PACKED.get(k)
    if e is None or e[0]() is not weight:
        _PACKED[k] = (weakref.ref(weight, lambda _r, k=k: _PACKED.pop(k, None)), _Packed())


def forget_prepacked(weight: torch.Tensor) -> None:
    """Drop ``weight``'s prepacked copies (the fused modules do on ``.eval()``/``.train()``)."""
    e = _PACKED.get(id(weight))
    if e is not None and e[0]() is weight:
        del _PACKED[id(weight)]


def _prepacked(weight: torch.Tensor) -> Optional[_Packed]:
    e = _PACKED.get(id(weight))
    return e[1] if e is not None and e[0]() is weight else None


@functools.lru_cache(maxsize=None)
def _prepack_dtypes() -> Tuple[torch.dtype, ...]:
    """The dtypes oneDNN's prepacked convolution runs in on this CPU: float32 everywhere,
    bfloat16 only where torch's oneDNN bf16 path is there (AVX512BW/VL/DQ or AVX-NE-CONVERT;
    elsewhere ``_reorder_convolution_weight`` raises, and the C++ op runs bf16 instead)."""
    if not torch.backends.mkldnn.is_available():  # a build without oneDNN: nothing is prepacked
        return ()
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def _prepacked_inference(x, weight, bias, residual) -> Optional[_Packed]:
    """``weight``'s _Packed when the prepacked paths may run: the weight was registered with
    ``prepack``, no gradient is needed and the output is channels_last (eager only)."""
    entry = _prepacked(weight) if _PACKED else None
    if entry is None or output_memory_format(x, weight) != torch.channels_last:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return None
    return entry


def _prepacked_weight(x, weight, bias, residual, stride, padding) -> Optional[torch.Tensor]:
    """oneDNN's prepacked copy of ``weight`` for x's geometry when the ``cpu`` backend's
    prepacked path may run these inputs (eager, a ``prepack``-ed weight, channels_last output,
    no gradient needed, a dtype oneDNN runs prepacked here, oneDNN enabled); else None."""
    entry = _prepacked_inference(x, weight, bias, residual)
    if entry is not None and x.dtype in _prepack_dtypes() and torch._C._get_mkldnn_enabled() \
            and not (x.dtype == torch.bfloat16 and stride[1] > 1
                     and (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] == 0):
        return entry.get(weight, x, stride, padding)
    return None


def _run_prepacked(x, packed, bias, residual, stride, padding, relu):
    """oneDNN's convolution on a prepacked weight with the bias and the residual add fused
    (exact), then the NaN-keeping ReLU in place (oneDNN's fused ReLU turns NaN into 0):
    deeparch::relu_, as under torch.compile (fp32 as torch's relu_; bf16 3.4x faster, on its bits)."""
    if residual is None:
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, [1, 1], 1,
                                                    "none", [], "")
    else:
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, packed, bias, padding, stride, [1, 1], 1, "add", None, None, [], None)
    if relu:
        torch.ops.deeparch.relu_.default(y)
    return y


def _cpu(x, weight, bias, residual, stride, padding, relu):
    """The ``cpu`` backend: for a prepacked weight (``prepack``), channels_last output and no
    gradient needed, oneDNN's convolution on the prepacked weight (1.05-1.6x F.conv2d on
    ResNet's batch-1 layers here; _run_prepacked); else the C++ op
    (csrc/cpu/fused_conv2d.cpp)."""
    if not torch.compiler.is_compiling():  # traced code: the op (the prepacked cache is eager-only)
        packed = _prepacked_weight(x, weight, bias, residual, stride, padding)
        if packed is not None:
            return _run_prepacked(x, packed, bias, residual, stride, padding, relu)
    return torch.ops.deeparch.fused_conv2d.default(x, weight, bias, residual, stride, padding, relu)


def _own_cpu_kernel_reason(name, x, weight, stride, padding, k, min_channels=0) -> Optional[str]:
    """Why our own fp32 CPU kernel ``name`` (winograd: k = 3, gemm: k = 1; stride 1, padding
    k // 2, an AVX2/FMA build) can't run these inputs; what it can't run goes to the cpu backend."""
    if x.device.type != "cpu":
        return f"the '{name}' backend runs CPU tensors, got {x.device.type} tensors"
    if x.dtype != torch.float32:
        return f"dtype {x.dtype}: the '{name}' backend runs float32"
    p = k // 2
    if tuple(weight.shape[2:]) != (k, k) or tuple(stride) != (1, 1) or tuple(padding) != (p, p):
        return f"the '{name}' backend runs {k}x{k} convolutions with stride 1 and padding {p}"
    if weight.shape[1] < min_channels:
        return f"{weight.shape[1]} input channels: the '{name}' backend runs {min_channels} or more"
    return _ext.winograd_reason()


def _winograd_supports(x, weight, bias, residual, stride, padding, relu):
    """Why the ``winograd`` backend can't run these inputs (16+ input channels: measured slower
    below)."""
    return _own_cpu_kernel_reason("winograd", x, weight, stride, padding, 3, min_channels=16)


def _fp32_entry(x, weight, bias, residual) -> Optional[_Packed]:
    """``weight``'s _Packed when our own fp32 CPU kernels (winograd, gemm) may run these inputs
    (eager, a ``prepack``-ed weight, fp32, channels_last output, no gradient needed); else None."""
    entry = _prepacked_inference(x, weight, bias, residual)
    return entry if entry is not None and x.dtype == torch.float32 else None


def _winograd_weight(x, weight, bias, residual) -> Optional[conv_winograd.Transformed]:
    """``weight``'s Winograd transform for x's shape when the kernel may run these inputs."""
    entry = _fp32_entry(x, weight, bias, residual)
    return None if entry is None else entry.get_winograd(weight, conv_winograd.tile(x.shape))


def _winograd(x, weight, bias, residual, stride, padding, relu):
    """The ``winograd`` backend (CPU, fp32, 3x3, stride 1, padding 1): for a prepacked weight
    (``prepack``), channels_last output and no gradient needed, Winograd F(4x4, 3x3) or
    F(2x2, 3x3) (ops/conv_winograd.py, csrc/cpu/winograd.cpp) when the input is finite and far
    from overflow; everything else as the ``cpu`` backend. ``auto`` takes it for the layers where
    it measures faster (benchmarks/results/2026-12-06-cpu.md, batch 1, against oneDNN on the
    prepacked weight: 1.6-2.5x on ResNet's and VGG's layers of 28x28 and more, 1.3x at 512@14x14,
    1.1x at 256@14x14, 0.75x at 512@7x7)."""
    if not torch.compiler.is_compiling():
        t = _winograd_weight(x, weight, bias, residual)
        if t is not None:
            y = conv_winograd.conv3x3(x, t, bias, residual, relu)
            if y is not None:
                return y
    return _cpu(x, weight, bias, residual, stride, padding, relu)


def _gemm_supports(x, weight, bias, residual, stride, padding, relu):
    """Why the ``gemm`` backend can't run these inputs."""
    return _own_cpu_kernel_reason("gemm", x, weight, stride, padding, 1)


def _gemm_weight(x, weight, bias, residual) -> Optional[torch.Tensor]:
    """``weight`` packed for the 1x1 GEMM when the kernel may run these inputs."""
    entry = _fp32_entry(x, weight, bias, residual)
    return None if entry is None else entry.get_gemm(weight)


def _gemm(x, weight, bias, residual, stride, padding, relu):
    """The ``gemm`` backend (CPU, fp32, 1x1, stride 1, padding 0): for a prepacked weight
    (``prepack``), channels_last output and no gradient needed, the convolution as one GEMM with
    bias, residual and ReLU applied before its one store (ops/conv_gemm.py,
    csrc/cpu/gemm_conv.cpp); everything else as the ``cpu`` backend."""
    if not torch.compiler.is_compiling():
        u = _gemm_weight(x, weight, bias, residual)
        if u is not None:
            return conv_gemm.conv1x1(x, u, weight.shape[0], bias, residual, relu)
    return _cpu(x, weight, bias, residual, stride, padding, relu)


def _auto_impl(x, weight, bias, residual, stride, padding, relu):
    """deeparch::fused_conv2d_auto when it runs: the eager ``auto`` dispatch on real tensors."""
    return _dispatch(x, weight, bias, residual, stride, padding, relu, "auto", None)


def _frozen_impl(x, weight, bias, residual, stride, padding, relu):
    """deeparch::fused_conv2d_frozen when it runs: ``weight`` is a constant of a frozen graph,
    so the cpu backends may keep what they derive from it (``prepack``), then the eager ``auto``
    dispatch, bound (``bind``) for the next call with inputs like these: the bound call runs
    while the weight is unchanged (_Packed's check) and the bias the same tensor (freezing's
    contract: constants are not written). 30-50 us a call less than the full dispatch."""
    prepack(weight)
    entry = _prepacked(weight)
    s, p = (stride[0], stride[1]), (padding[0], padding[1])
    if entry is not None and entry._fresh(weight) and entry.frozen is not None:
        bound, b = entry.frozen
        if b is bias and bound.matches(x, residual, s, p, relu, "auto"):
            return bound.run(x, residual)
    fast = _fast_key(x, weight, bias, residual, s, p, relu, 1, 1, "auto")
    y = _dispatch(x, weight, bias, residual, stride, padding, relu, "auto", fast)
    if entry is not None:
        bound = bind(x, weight, bias, residual, s, p, relu, "auto")
        entry.frozen = None if bound is None else (bound, bias)
    return y


lib.impl("fused_conv2d_auto", _auto_impl, "CPU")
lib.impl("fused_conv2d_auto", _auto_impl, "CUDA")
lib.impl("fused_conv2d_frozen", _frozen_impl, "CPU")
for _name in ("fused_conv2d_auto", "fused_conv2d_frozen"):
    torch.library.register_fake(f"deeparch::{_name}")(_fake)
    torch.library.register_autograd(f"deeparch::{_name}", _backward, setup_context=_setup_context)

backends.define_op(OP, check=_check)
backends.register(OP, "cpu", _cpu, _kernel_supports)
backends.register(OP, "cuda", torch.ops.deeparch.fused_conv2d.default, _kernel_supports)
backends.register(OP, "cutlass", torch.ops.deeparch.fused_conv2d_cutlass.default, _cutlass_supports)
backends.register(OP, "aten", _aten)
backends.register(OP, "reference", _reference)
backends.register(OP, "winograd", _winograd, _winograd_supports, devices=("cpu",))
backends.register(OP, "gemm", _gemm, _gemm_supports, devices=("cpu",))
if HAS_TRITON:
    backends.register(OP, "triton", torch.ops.deeparch.fused_conv2d_triton.default, _kernel_supports)
# On the CPU "cpu" runs oneDNN on prepacked weights for the fused modules (1.05-1.6x F.conv2d
# on ResNet's batch-1 layers, ~1.0-1.2x at batch 8, measured here): first when nothing is timed.
# "winograd" is 0.75-2.5x "cpu" on ResNet's and VGG's 3x3 stride-1 layers (2-core AVX-512 EPYC,
# batch 1; slower only on the smallest, 512@7x7): second, and taken where timing says so; so is
# "gemm" on the 1x1 layers (0.98-1.3x "cpu" on ResNet-50's at batch 1, caches warm; in the model,
# where the weights come from memory, ResNet-50 at batch 1 went from ~1.0x to 1.06x torch.compile).
backends.set_auto_order(OP, "cpu", ("cpu", "winograd", "gemm", "aten"))


# --------------------------------------------------------------------------- the public function

def _padding(padding, weight, stride, dilation) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(symmetric padding, extra right/bottom padding) for an int, pair, "same" or "valid"."""
    if padding is None:
        return (weight.shape[2] // 2, weight.shape[3] // 2), (0, 0)
    if isinstance(padding, str):
        check(padding in ("same", "valid"), OP, lambda: f"padding must be 'same', 'valid', an int or "
              f"a pair, got {padding!r}")
        if padding == "valid":
            return (0, 0), (0, 0)
        check(stride == (1, 1), OP, "padding='same' is not supported for strided convolutions "
              "(as in torch.nn.functional.conv2d)")
        total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        return (total[0] // 2, total[1] // 2), (total[0] - total[0] // 2 * 2, total[1] - total[1] // 2 * 2)
    return int_pair(padding, OP, "padding"), (0, 0)


def _check_args(x, weight, bias, residual, stride, padding, dilation, groups) -> Tuple[int, int, int, int]:
    """The public function's arguments, normalised (pairs of ints, unbatched x unsqueezed): its
    own rules (x 3-D or 4-D, floating point as for conv2d), then the rules every implementation
    shares (_conv_args.check_conv_args). Returns the output shape."""
    check(x.dim() == 4, OP, lambda: f"x must be 4-D (N, C, H, W) or 3-D (C, H, W), got {x.dim()}-D")
    check(x.is_floating_point() or x.is_complex(), OP,
          lambda: f"x must be a floating-point tensor (as for conv2d), got {x.dtype}", TypeError)
    return check_conv_args(OP, x, weight, bias, residual, stride, padding, dilation, groups)


def kernel_refusal(groups: int, dilation: Sequence[int]) -> Optional[str]:
    """Why our kernels (every backend but aten and reference) can't run a convolution with these
    groups and dilation (None: they can); fused_conv2d then runs it on stock PyTorch, and the
    fused modules leave it to torch (deeparch_kernels.nn.common.unsupported_reason)."""
    if groups != 1:
        return f"groups={groups} (our kernels run groups=1 only)"
    if tuple(dilation) != (1, 1):
        return f"dilation={tuple(dilation)} (our kernels run dilation=1 only)"
    return None


def _key(x, weight, bias, residual, stride, padding, relu) -> tuple:
    return (x.dtype, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding),
            bias is not None, residual is not None, relu, output_memory_format(x, weight))


def _dispatch(x, weight, bias, residual, stride, padding, relu, backend, fast):
    """The kernel path: validated arguments in the op's own form (4-D, one dtype, residual of
    the output's shape and dtype); the chosen implementation, remembered for ``fast``."""
    args = (x, weight, bias, residual, list(stride), list(padding), relu)
    if backend == "auto" and backends.is_tracing():
        if inductor_folds_relu(x, weight, bias, residual):
            if _winograd_supports(*args) is None:
                # a layer winograd may run: auto chooses when it runs (winograd, or oneDNN on the
                # weight it prepacks, as inductor would), keeping what it derives from the weight.
                # (Not the 1x1 layers gemm may run: recorded so, ResNet-50 at batch 1 measured
                # 1.02x torch.compile against 1.08x as inductor's, in place, convolutions.)
                return torch.ops.deeparch.fused_conv2d_frozen(*args)
            # torch.compile with freezing prepacks stock convolutions for oneDNN: give it one,
            # with the residual as a stock add (which it fuses into the convolution as oneDNN's
            # binary post-op: exact, in place in the residual's buffer where it can) and the ReLU
            # as an in-place op it can't fuse into oneDNN's NaN-swallowing ReLU post-op.
            y = conv2d(x, weight, bias, stride, padding)
            if residual is not None:
                y = y + residual
            if relu:
                torch.ops.deeparch.relu_(y)
            return y
        return torch.ops.deeparch.fused_conv2d_auto(*args)  # the choice is made when it runs
    fn = backends.impl(OP, backends.choose(OP, backend, x.device, _key(*args), args))
    backends.fast_store(fast, (fn, args[4], args[5]))
    return fn(*args)


def _fast_key(x, weight, bias, residual, stride, padding, relu, dilation, groups, backend):
    """fused_conv2d's fast-path key for these arguments (backends.fast_lookup); None for
    arguments that are not (dense) tensors (the full path says what is wrong)."""
    sig = backends.tensor_sig
    try:
        return (OP, backend, sig(x), sig(weight), sig(bias), sig(residual), stride, padding, relu,
                dilation, groups)
    except (AttributeError, RuntimeError):
        return None


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 stride: IntPair = 1, padding: Union[None, str, IntPair] = None,
                 residual: Optional[torch.Tensor] = None, relu: bool = True,
                 dilation: IntPair = 1, groups: int = 1, backend: str = "auto") -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` as one op.

    padding=None means kernel_size // 2 ("same" for odd kernels at stride 1); "same" and
    "valid" as in F.conv2d. The ReLU and the residual add are optional and fused into the
    convolution's epilogue. The result is torch's: its dtype (a residual of another dtype is
    added with type promotion), its memory format (channels_last if x or weight is), NaN and Inf
    as torch gives them. Under autocast x, weight and bias are cast as for conv2d.
    ``backend``: "auto" (checked before it is trusted, see deeparch_kernels.backends) or a
    backend name; groups and dilation other than 1 run as stock PyTorch (``auto``, ``aten``,
    ``reference``).
    """
    proxy = fx_proxy(x, weight, bias, residual)
    if proxy is not None:  # torch.fx.symbolic_trace: one call_function node
        return proxy.tracer.create_proxy(
            "call_function", fused_conv2d, (x, weight, bias),
            dict(stride=stride, padding=padding, residual=residual, relu=relu, dilation=dilation,
                 groups=groups, backend=backend))
    fast = _fast_key(x, weight, bias, residual, stride, padding, relu, dilation, groups, backend)
    hit = backends.fast_lookup(fast)
    if fast is not None and torch.is_autocast_enabled(x.device.type):
        fast, hit = None, None  # the casts depend on the autocast state: the full path
    if hit is not None:  # these exact inputs were checked and dispatched before
        fn, s, p = hit
        return fn(x, weight, bias, residual, s, p, relu)
    return _slow(x, weight, bias, residual, stride, padding, relu, dilation, groups, backend, fast)


class BoundConv:
    """fused_conv2d over one weight and bias that the holder never writes (a cached BatchNorm
    fold's), bound to the signature (device, dtype, shape, strides) of the x and residual it was
    made with: what the op's fast path runs for such inputs, with that path's per-call work done
    once -- for the ``cpu`` backend, oneDNN on the prepacked weight (_run_prepacked). Made by
    ``bind``; a call may take it when ``matches`` says so (eager only: the caller checks it is not
    tracing)."""

    __slots__ = ("x_sig", "r_sig", "conf", "generation", "run")

    def __init__(self, x, residual, stride, padding, relu, backend, run) -> None:
        self.x_sig, self.r_sig = backends.tensor_sig(x), backends.tensor_sig(residual)
        self.conf = (tuple(stride), tuple(padding), relu, backend)  # copies: lists can be edited
        self.generation, self.run = backends.generation(), run

    def matches(self, x, residual, stride, padding, relu, backend) -> bool:
        """fused_conv2d(x, ..., stride=stride, padding=padding, residual=residual, relu=relu,
        backend=backend) would run what ``run`` runs: the same signatures and arguments (stride and
        padding as tuples: lists never match), ``auto``'s choices not forgotten since, no
        autocast, oneDNN enabled, no gradient needed."""
        sig = backends.tensor_sig
        return ((stride, padding, relu, backend) == self.conf and sig(x) == self.x_sig
                and sig(residual) == self.r_sig and backends.generation() == self.generation
                and not torch.is_autocast_enabled(x.device.type) and torch._C._get_mkldnn_enabled()
                and not (torch.is_grad_enabled()
                         and (x.requires_grad or (residual is not None and residual.requires_grad))))


def bind(x, weight, bias, residual, stride, padding, relu, backend) -> Optional[BoundConv]:
    """After ``fused_conv2d(x, weight, bias, stride=stride, padding=padding, residual=residual,
    relu=relu, backend=backend)`` ran: a BoundConv for later calls with inputs and arguments like
    these, or None when the op's fast path holds nothing for them. The caller must not write
    ``weight`` or ``bias`` while it keeps it (a prepacked copy would go stale)."""
    if torch.compiler.is_compiling():
        return None
    key = _fast_key(x, weight, bias, residual, (stride[0], stride[1]), padding, relu, 1, 1, backend)
    hit = backends.fast_lookup(key)
    if hit is None:
        return None
    fn, s, p = hit
    packed = _prepacked_weight(x, weight, bias, residual, s, p) if fn is _cpu else None
    wino = _winograd_weight(x, weight, bias, residual) if fn is _winograd else None
    gemm = _gemm_weight(x, weight, bias, residual) if fn is _gemm else None
    # The weight by a weak reference: a bound call is kept beside what is derived from the weight
    # (a fold's, or _Packed.frozen), which must not keep the weight alive.
    wref = weakref.ref(weight)
    if packed is not None:
        def run(x, r):
            return _run_prepacked(x, packed, bias, r, s, p, relu)
    elif wino is not None:
        def run(x, r):
            y = conv_winograd.conv3x3(x, wino, bias, r, relu)
            return y if y is not None else _cpu(x, wref(), bias, r, s, p, relu)
    elif gemm is not None:
        k = weight.shape[0]

        def run(x, r):
            return conv_gemm.conv1x1(x, gemm, k, bias, r, relu)
    else:
        def run(x, r):
            return fn(x, wref(), bias, r, s, p, relu)
    return BoundConv(x, residual, stride, padding, relu, backend, run)


def _slow(x, weight, bias, residual, stride, padding, relu, dilation, groups, backend, fast):
    """fused_conv2d's full path: normalise and check the arguments as F.conv2d would, run what
    our kernels can't on stock PyTorch, dispatch the rest."""
    check(isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor), OP,
          lambda: f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}",
          TypeError)
    backends.check_name(backend)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
        if residual is not None and residual.dim() == 3:
            residual = residual.unsqueeze(0)
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dt = torch.get_autocast_dtype(x.device.type)  # F.conv2d's autocast rule: lower precision
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    stride = int_pair(stride, OP, "stride")
    dilation = int_pair(dilation, OP, "dilation")
    try:
        groups = operator.index(groups)
    except TypeError:
        raise TypeError(f"{OP}: groups must be an int, got {groups!r}") from None
    check(weight.dim() == 4, OP, lambda: f"weight must be 4-D (K, C/groups, kh, kw), got {weight.dim()}-D")
    pad, extra = _padding(padding, weight, stride, dilation)
    N, K, Ho, Wo = _check_args(x, weight, bias, residual, stride, pad, dilation, groups)
    if extra != (0, 0):  # "same" (stride 1) with an even kernel: the odd pixel on the right/bottom, as torch
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    out_shape = (N, K, Ho + extra[0], Wo + extra[1])
    why_stock = kernel_refusal(groups, dilation)
    stock = why_stock is not None
    if stock and backend not in ("auto", "aten", "reference"):
        raise backends.BackendUnavailable(
            f"{OP}: backend {backend!r} can't run these inputs: {why_stock}; 'auto', 'aten' and "
            "'reference' run them on stock PyTorch")
    epilogue = None  # a residual the fused epilogue can't take: torch's add (+ReLU) after the conv
    if residual is not None:
        try:
            shape = torch.broadcast_shapes(out_shape, residual.shape)
        except RuntimeError:
            raise ValueError(f"{OP}: residual must have the output's shape {tuple(out_shape)} (or "
                             f"broadcast to it), got {tuple(residual.shape)}") from None
        if residual.dtype != x.dtype or tuple(residual.shape) != tuple(out_shape) or tuple(shape) != tuple(out_shape):
            epilogue, residual = residual, None
        else:  # mixed memory formats: the residual is brought to the output's
            fmt = output_memory_format(x, weight)
            if not residual.is_contiguous(memory_format=fmt):
                residual = residual.contiguous(memory_format=fmt)
    if stock:
        y = F.conv2d(x, weight, bias, stride, pad, dilation, groups)
        if residual is not None:
            y = y + residual
        if relu and epilogue is None:
            y = torch.relu(y)
        fast = None
    else:
        y = _dispatch(x, weight, bias, residual, stride, pad, relu and epilogue is None,
                      backend, fast if epilogue is None and not unbatched and extra == (0, 0) else None)
    if epilogue is not None:
        y = add_relu(y, epilogue) if relu else y + epilogue
    return y.squeeze(0) if unbatched else y
