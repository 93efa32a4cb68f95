"""The ``cutlass`` backend (CUTLASS 3.x sm_90a convolution, csrc/cuda/cutlass/) without a GPU.

What can be shown here, and is:
  * the extension carries the CUTLASS kernels for sm_90a, and their SASS is what was asked for:
    WGMMA (HGMMA), TMA im2col loads and TMA stores, no local memory or spill stack, and a ReLU
    that keeps NaN (FSETP.LT + FSEL: v < 0 ? 0 : v; no FMNMX or RELU-folded conversion, whose NaN
    handling would need a GPU to check);
  * the argument mapping, through CUTLASS's own host code (deeparch::_cutlass_conv_plan): the
    ConvProblemShape built from (x, weight, stride, padding) has torch's output shape and the
    strides of the channels_last tensors the op passes, and can_implement() agrees with the
    backend's supports() (which never accepts what CUTLASS refuses);
  * every refusal of supports(), and the output memory format of the op's fake.
The kernels' results, speed and NaN behaviour need a Hopper GPU: tests/test_gpu_conv.py.
CI builds the extension with the CUTLASS kernels (scripts/setup_env.sh sets DEEPARCH_CUTLASS=1
where nvcc exists), so the tests marked needs_cutlass run there.
"""
import json
import os
import random
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels import _ext, backends
from deeparch_kernels.ops import conv as conv_ops

OP = "fused_conv2d"
BUILT = bool((_ext.build_info() or {}).get("cutlass"))
needs_cutlass = pytest.mark.skipif(not BUILT, reason="extension built without the CUTLASS kernels")
H100 = (9, 0)


def _plan(x_shape, w_shape, stride, padding, dtype=torch.float16, sm_count=132):
    return json.loads(torch.ops.deeparch._cutlass_conv_plan(
        list(x_shape), list(w_shape), list(stride), list(padding), dtype, sm_count))


def _refusal(x_shape, w_shape, stride=(1, 1), padding=(1, 1), dtype=torch.float16, cap=H100):
    return conv_ops.cutlass_refusal(dtype, x_shape, w_shape, stride, padding, cap)


# ---- supports(): every refusal, with its reason -------------------------------------------

@pytest.mark.parametrize("case,want", [
    (dict(dtype=torch.float32), "take float16 or bfloat16, got float32"),
    (dict(dtype=torch.float64), "take float16 or bfloat16, got float64"),
    (dict(x_shape=(2, 3, 8, 8), w_shape=(64, 3, 7, 7), padding=(3, 3)),
     "C and K multiples of 8 (16-byte TMA rows), got C=3, K=64"),
    (dict(x_shape=(2, 16, 8, 8), w_shape=(20, 16, 3, 3)), "got C=16, K=20"),
    (dict(x_shape=(2, 0, 8, 8), w_shape=(16, 0, 3, 3)), "got C=0, K=16"),
    (dict(stride=(9, 1)), "strides up to 8 (TMA im2col traversal), got (9, 1)"),
    (dict(padding=(129, 0), x_shape=(1, 8, 4, 4)), "padding <= 128"),
    (dict(w_shape=(8, 8, 256, 1), padding=(128, 0), x_shape=(1, 8, 4, 4)), "kernel <= 255"),
    (dict(w_shape=(8, 8, 1, 1), padding=(128, 0), x_shape=(1, 8, 4, 4)), "padding <= 128"),
    (dict(x_shape=(70000, 8, 200, 200), w_shape=(8, 8, 1, 1), padding=(0, 0)),
     "extents are 32-bit"),
    (dict(cap=None), "run CUDA tensors"),
    (dict(cap=(8, 0)), "built for sm_90a (Hopper) only; this GPU is sm_80"),
    (dict(cap=(10, 0)), "this GPU is sm_100"),
])
def test_supports_refusals(case, want):
    args = dict(x_shape=(2, 16, 8, 8), w_shape=(32, 16, 3, 3))
    args.update(case)
    why = _refusal(**args)
    assert why is not None and want in why, why


@needs_cutlass
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_refusal_words_dtypes_as_python(dtype):
    plan = _plan((2, 16, 8, 8), (32, 16, 3, 3), (1, 1), (1, 1), dtype)
    assert plan["refusal"] == _refusal((2, 16, 8, 8), (32, 16, 3, 3), dtype=dtype)


def test_supports_accepts_the_anchor_layers():
    for N, C, H, s in [(32, 64, 224, 1), (32, 256, 56, 1), (32, 512, 7, 1), (32, 128, 56, 2), (1, 256, 14, 1)]:
        for dtype in (torch.float16, torch.bfloat16):
            assert _refusal((N, C, H, H), (C, C, 3, 3), (s, s), (1, 1), dtype) is None
    assert _refusal((8, 64, 56, 56), (256, 64, 1, 1), (2, 2), (0, 0)) is None  # downsample


def test_backend_reports_why_on_cpu():
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    why = backends.reasons(OP, x.device, x, w, None, None, [1, 1], [1, 1], True)["cutlass"]
    assert why and "cutlass" in why
    with pytest.raises(backends.BackendUnavailable, match="backend 'cutlass' can't run"):
        dk.fused_conv2d(x, w, backend="cutlass")
    # supports() itself, called directly on CPU tensors:
    assert "CUDA tensors" in conv_ops._cutlass_supports(x.half(), w.half(), None, None, [1, 1], [1, 1], True)


def test_registered_with_the_op():
    assert backends.impl(OP, "cutlass") is torch.ops.deeparch.fused_conv2d_cutlass.default
    assert backends._OPS[OP].supports["cutlass"] is conv_ops._cutlass_supports
    if not torch.cuda.is_available():
        assert _ext.cutlass_reason() is not None


@pytest.mark.parametrize("x_fmt,w_fmt", [("cl", "cl"), ("nchw", "nchw"), ("nchw", "cl"), ("cl", "nchw")])
def test_fake_output_shape_and_memory_format(x_fmt, w_fmt):
    """The op's fake (shared with fused_conv2d): torch's output shape and conv2d's memory-format
    rule (channels_last if x or weight is)."""
    fmt = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
    x = torch.empty(2, 16, 9, 11, device="meta").contiguous(memory_format=fmt[x_fmt])
    w = torch.empty(24, 16, 3, 3, device="meta").contiguous(memory_format=fmt[w_fmt])
    y = torch.ops.deeparch.fused_conv2d_cutlass(x, w, None, None, [2, 1], [1, 0], True)
    want = F.conv2d(torch.empty(2, 16, 9, 11, device="meta").contiguous(memory_format=fmt[x_fmt]),
                    torch.empty(24, 16, 3, 3, device="meta").contiguous(memory_format=fmt[w_fmt]),
                    None, (2, 1), (1, 0))
    assert y.shape == want.shape
    cl = x_fmt == "cl" or w_fmt == "cl"
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


# ---- CUTLASS's own view of the problem (host code of the built kernels) ---------------------

def _same_nhwc_strides(cutlass_strides, t):
    """CUTLASS's packed NHWC strides are t's (channels_last) strides, but for size-1 dims (whose
    stride addresses nothing and which torch leaves arbitrary)."""
    order = [0, 2, 3, 1]
    return all(cutlass_strides[i] == t.stride(d) for i, d in enumerate(order) if t.shape[d] > 1)


def _mapping_cases():
    rng = random.Random(5)
    cases = [((32, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1)),
             ((32, 128, 56, 56), (128, 128, 3, 3), (2, 2), (1, 1)),
             ((8, 64, 56, 56), (256, 64, 1, 1), (2, 2), (0, 0)),
             ((2, 8, 224, 224), (64, 8, 7, 7), (2, 2), (3, 3)),
             ((1, 16, 7, 9), (8, 16, 3, 5), (1, 2), (0, 2)),
             ((3, 24, 13, 11), (40, 24, 3, 3), (3, 1), (2, 0))]
    for _ in range(12):
        k = rng.choice([1, 3, 5, 7])
        cases.append(((rng.randint(1, 5), 8 * rng.randint(1, 9), rng.randint(k, 40), rng.randint(k, 40)),
                      (8 * rng.randint(1, 9), None, k, rng.choice([1, k])),
                      (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(0, k // 2), rng.randint(0, k // 2))))
    return [(x, (w[0], x[1], w[2], w[3]), s, p) for x, w, s, p in cases]


@needs_cutlass
@pytest.mark.parametrize("case", _mapping_cases(), ids=str)
def test_problem_shape_matches_torch(case):
    """CUTLASS's ConvProblemShape for (x, weight, stride, padding) against torch on the CPU: the
    output extents of F.conv2d (NHWC), the strides of the channels_last x, weight and output
    the op passes (NHWC, KRSC, NPQK), the GEMM extents and the grid of every tile."""
    x_shape, w_shape, stride, padding = case
    x = torch.empty(x_shape, device="meta").contiguous(memory_format=torch.channels_last)
    w = torch.empty(w_shape, device="meta").contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, w, None, stride, padding).contiguous(memory_format=torch.channels_last)
    N, K, P, Q = y.shape
    plan = _plan(x_shape, w_shape, stride, padding)
    assert plan["refusal"] == ""
    for name, t in plan["tiles"].items():
        assert t["can_implement"], name
        assert t["shape_A"] == [x_shape[0], x_shape[2], x_shape[3], x_shape[1]]
        assert _same_nhwc_strides(t["stride_A"], x), t["stride_A"]
        assert t["shape_B"] == [w_shape[0], w_shape[2], w_shape[3], w_shape[1]]
        assert _same_nhwc_strides(t["stride_B"], w), t["stride_B"]
        assert t["shape_C"] == [N, P, Q, K]
        assert _same_nhwc_strides(t["stride_C"], y), t["stride_C"]
        assert t["gemm_mnk"] == [N * P * Q, K, w_shape[1] * w_shape[2] * w_shape[3]]
        tm, tn, _ = t["tile"]
        assert t["grid"] == [-(-N * P * Q // tm), -(-K // tn), 1]


def _limit_cases():
    """Shapes at and past each CUTLASS limit (alignment, padding, TMA im2col corners, filter
    offsets), and some well inside them."""
    out = []
    for C, K in [(8, 8), (16, 24), (12, 16), (16, 12), (4, 8), (24, 40), (3, 64)]:
        out.append(((1, C, 9, 9), (K, C, 3, 3), (1, 1), (1, 1)))
    for R, pad in [(1, 127), (1, 128), (3, 128), (3, 129), (130, 1), (131, 1), (255, 127),
                   (256, 128), (200, 0)]:
        H = max(1, R - 2 * pad)
        out.append(((1, 8, H, 4), (8, 8, R, 1), (1, 1), (pad, 0)))
    return out


@needs_cutlass
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _limit_cases(), ids=str)
def test_supports_agrees_with_can_implement(case, dtype):
    """supports() never accepts what CUTLASS's can_implement() refuses, and refuses only for a
    stated reason: alignment, padding and corner limits are CUTLASS's own (strides above 8,
    refused for the TMA descriptor, are not something can_implement checks)."""
    x_shape, w_shape, stride, padding = case
    plan = _plan(x_shape, w_shape, stride, padding, dtype)
    ours = _refusal(x_shape, w_shape, stride, padding, dtype)
    theirs = {t["can_implement"] for t in plan["tiles"].values()}
    assert len(theirs) == 1, plan  # the limits do not depend on the tile
    assert (ours is None) == theirs.pop(), (ours, plan)
    assert plan["refusal"] == (ours or ""), "C++ refusal() and Python cutlass_refusal() differ"


@needs_cutlass
@pytest.mark.parametrize("shape,want", [
    ((32, 64, 224, 64), "128x64"),    # K = 64
    ((32, 256, 56, 256), "128x128"),
    ((32, 512, 28, 512), "128x128"),
    ((32, 512, 14, 512), "64x128"),   # 196 tiles of 128x128 = 1.5 waves; 392 of 64x128 = 2.97
    ((32, 512, 7, 512), "64x128"),
    ((1, 256, 56, 256), "64x128"),
])
def test_tile_from_wave_count(shape, want):
    N, C, H, K = shape
    assert _plan((N, C, H, H), (K, C, 3, 3), (1, 1), (1, 1))["tile"] == want


# ---- the kernels in the built extension (SASS) ----------------------------------------------

def _cuobjdump():
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.path.exists(tool) else None


@needs_cutlass
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump (Triton's NVIDIA backend) not found")
def test_sass_wgmma_tma_no_local_memory_nan_relu(tmp_path):
    import sys

    tool, so = _cuobjdump(), sys.modules["deeparch_kernels._C"].__file__
    subprocess.run([tool, "-xelf", "all", so], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    cubins = sorted(p for p in os.listdir(tmp_path) if p.endswith(".sm_90a.cubin"))
    assert cubins, "no sm_90a code in the extension"
    kernels = {}
    for c in cubins:
        res = subprocess.run([tool, "-res-usage", c], cwd=tmp_path, capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", c], cwd=tmp_path, capture_output=True, text=True).stdout
        usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", res))
        for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
            name = chunk.split("\n")[0].strip()
            if "ConvUniversal" in name:
                kernels[name] = (usage[name], chunk)
    # 3 tiles x 2 dtypes
    assert len(kernels) == 6, list(kernels)
    assert sum("F32F16F16" in n for n in kernels) == 3 and sum("F32BF16BF16" in n for n in kernels) == 3
    for name, (usage, sass) in kernels.items():
        regs, stack, local = map(int, re.match(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage).groups())
        assert stack == 0 and local == 0 and regs <= 168, (name, usage)
        assert re.search(r"\bHGMMA\.64x(64|128)x16\.F32", sass), name
        assert "UTMALDG.4D.IM2COL" in sass and "UTMASTG" in sass, name
        assert not re.search(r"\b(LDL|STL)\b", sass), name
        # The fused ReLU (ReluIf in conv_sm90_kernel.cuh): v < 0 ? 0 : v, NaN passes.
        assert "FSETP.LT" in sass and "FSEL" in sass, name
        assert not re.search(r"\bFMNMX\b", sass) and ".RELU" not in sass, name
