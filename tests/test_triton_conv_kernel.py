"""The raw Triton fused-conv launcher, deeparch_kernels.triton.conv.fused_conv2d.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when no
GPU is present) on tiny shapes; on a CUDA machine the same tests run on the GPU, plus the
``gpu``-marked ones (every autotuning config, TF32, torch.compile). The reference is float64
``relu(conv2d(x, w) + bias + residual)`` computed from the same (rounded) inputs.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from deeparch_kernels._precision import no_tf32
from helpers import TOL, assert_nonfinite_match, rel_err

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET),
    reason="needs CUDA, or TRITON_INTERPRET=1 on CPU (set before triton kernels are defined)")

if HAS_CUDA or INTERPRET:
    from deeparch_kernels.triton import conv as tconv

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 is compared at 1e-5: no TF32 (the launcher follows torch's rule for convolutions)."""
    with no_tf32():
        yield


def _rand(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _out_hw(H, W, kh, kw, stride, padding):
    return (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1


def _make(gen, N, C, K, H, W, kh, kw, stride, padding, dtype, bias=True, res=True):
    x = _rand(gen, N, C, H, W, dtype=dtype)
    w = _rand(gen, K, C, kh, kw, dtype=dtype, scale=(C * kh * kw) ** -0.5)
    b = _rand(gen, K, dtype=dtype) if bias else None
    Ho, Wo = _out_hw(H, W, kh, kw, stride, padding)
    r = _rand(gen, N, K, Ho, Wo, dtype=dtype) if res else None
    return x, w, b, r


def _ref(x, w, b, r, stride, padding, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    if r is not None:
        y = y + r.double()
    return torch.relu(y) if relu else y


def _check(y, x, w, b, r, stride, padding, relu, tol=None):
    ref = _ref(x, w, b, r, stride, padding, relu)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all(), "non-finite output from finite inputs (an unwritten element?)"
    err = rel_err(y, ref)
    assert err <= (TOL[x.dtype] if tol is None else tol), f"relative error {err:.3g}"


# (N, C, K, H, W, kh, kw, stride, padding): C = 3 and sizes that are not multiples of 8/16.
CASES = {
    "3x3s1": (2, 5, 7, 7, 9, 3, 3, (1, 1), (1, 1)),
    "3x3s2": (2, 16, 16, 7, 9, 3, 3, (2, 2), (1, 1)),
    "1x1s1": (2, 5, 7, 7, 9, 1, 1, (1, 1), (0, 0)),
    "1x1s2": (2, 16, 7, 7, 9, 1, 1, (2, 2), (0, 0)),
    "7x7s2_stem": (2, 3, 16, 9, 11, 7, 7, (2, 2), (3, 3)),
    "3x3s3_nopad": (1, 3, 7, 8, 10, 3, 3, (3, 3), (0, 0)),
    "3x1_asym": (1, 5, 7, 6, 9, 3, 1, (2, 1), (0, 2)),
    "C20_K17": (1, 20, 17, 5, 6, 3, 3, (1, 1), (1, 1)),  # two C slices, two K tiles
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_float64_reference(case, dtype, gen):
    N, C, K, H, W, kh, kw, stride, padding = CASES[case]
    x, w, b, r = _make(gen, N, C, K, H, W, kh, kw, stride, padding, dtype)
    y = tconv.fused_conv2d(x, w, b, r, stride, padding, True)
    _check(y, x, w, b, r, stride, padding, True)


@pytest.mark.parametrize("bias,res,relu", [(False, False, False), (True, False, False),
                                           (False, True, True), (True, False, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogue_variants(bias, res, relu, dtype, gen):
    N, C, K, H, W, kh, kw, stride, padding = CASES["3x3s2"]
    x, w, b, r = _make(gen, N, C, K, H, W, kh, kw, stride, padding, dtype, bias=bias, res=res)
    y = tconv.fused_conv2d(x, w, b, r, stride, padding, relu)
    _check(y, x, w, b, r, stride, padding, relu)
    if not relu:
        assert (y < 0).any(), "no negative outputs: test data too weak to catch a stray ReLU"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
def test_input_layouts(layout, gen):
    """Any input layout is accepted; the launcher makes it channels_last, output stays so."""
    N, C, K, H, W, kh, kw, stride, padding = CASES["3x3s1"]
    x, w, b, r = _make(gen, N, C, K, H, W, kh, kw, stride, padding, torch.float32)
    if layout == "channels_last":
        x, w, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, r))
    elif layout == "strided_view":
        x = _rand(gen, N, C, H, 2 * W, dtype=torch.float32)[..., ::2]
        w = _rand(gen, C, K, kh, kw, dtype=torch.float32, scale=(C * kh * kw) ** -0.5).transpose(0, 1)
    xs, ws, rs = x.stride(), w.stride(), r.stride()
    y = tconv.fused_conv2d(x, w, b, r, stride, padding, True)
    _check(y, x, w, b, r, stride, padding, True)
    assert (x.stride(), w.stride(), r.stride()) == (xs, ws, rs), "inputs must not be modified"


def test_bf16_rounds_to_nearest(gen):
    """bf16 is exact in the interpreter (tiles widened before the dot, output rounded to nearest
    even): nearly every output equals the float64 result rounded once to bf16 (truncation or
    raw-bit arithmetic would fail this; a few flips come from fp32 summation order)."""
    x, w, b, _ = _make(gen, 2, 16, 16, 7, 9, 3, 3, (1, 1), (1, 1), torch.bfloat16, res=False)
    y = tconv.fused_conv2d(x, w, b, None, (1, 1), (1, 1), False)
    want = _ref(x, w, b, None, (1, 1), (1, 1), False).to(torch.bfloat16)
    assert (y == want).float().mean().item() >= 0.98


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate_like_torch(dtype, relu, gen):
    N, C, K, H, W, kh, kw, stride, padding = CASES["3x3s1"]
    x, w, b, r = _make(gen, N, C, K, H, W, kh, kw, stride, padding, dtype)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 4, 6, 8] = float("-inf")
    x[0, 2, 5, 1] = float("inf")
    r[1, 3, 3, 4] = float("nan")  # NaN from the residual must survive the ReLU too
    y = tconv.fused_conv2d(x, w, b, r, stride, padding, relu)
    ref = _ref(x, w, b, r, stride, padding, relu)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert_nonfinite_match(y, ref)
    assert rel_err(y, ref) <= TOL[dtype]


def _smallest_configs(n):
    return sorted(tconv.conv_configs(), key=lambda c: (
        c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_C"], c.num_warps))[:n]


def _config_cases():
    cfgs = tconv.conv_configs() if HAS_CUDA else _smallest_configs(2)
    return [pytest.param(c, id="{BLOCK_M}x{BLOCK_N}x{BLOCK_C}".format(**c.kwargs)
                         + f"_w{c.num_warps}_s{c.num_stages}") for c in cfgs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", _config_cases() if (HAS_CUDA or INTERPRET) else [])
def test_forced_configs(cfg, dtype, gen):
    """Each autotuning candidate must be correct, not only the fastest (every one on a GPU, the
    two smallest in the interpreter). Shape: 2 M tiles and 2 K tiles for the small blocks,
    C tail, stride 2."""
    x, w, b, r = _make(gen, 2, 37, 40, 9, 11, 3, 3, (2, 2), (1, 1), dtype)
    as_dict = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = tconv.fused_conv2d(x, w, b, r, (2, 2), (1, 1), True, config=as_dict)
    _check(y, x, w, b, r, (2, 2), (1, 1), True)
    y2 = tconv.fused_conv2d(x, w, b, r, (2, 2), (1, 1), True, config=cfg)  # triton.Config too
    assert torch.equal(y, y2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k(split_k, dtype, gen):
    """Split-K (the small-M path): every slice's fp32 partial summed by the second kernel, with
    the epilogue there. C = 37 with BLOCK_C = 16 is 9 taps x 3 = 27 steps, so 2, 3 and 7 slices
    cut it evenly, into 9s, and unevenly (six 4s and a 3)."""
    x, w, b, r = _make(gen, 1, 37, 24, 5, 7, 3, 3, (1, 1), (1, 1), dtype)
    x[0, 4, 2, 3] = float("nan")  # NaN in one slice's partial must reach the output
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16}
    y = tconv.fused_conv2d(x, w, b, r, (1, 1), (1, 1), True, config=cfg, split_k=split_k)
    ref = _ref(x, w, b, r, (1, 1), (1, 1), True)
    assert torch.isnan(ref).any()
    assert_nonfinite_match(y, ref)
    assert rel_err(y, ref) <= TOL[dtype]
    x[0, 4, 2, 3] = 0.5
    y1 = tconv.fused_conv2d(x, w, b, r, (1, 1), (1, 1), True, config=cfg, split_k=1)
    ys = tconv.fused_conv2d(x, w, b, r, (1, 1), (1, 1), True, config=cfg, split_k=split_k)
    _check(ys, x, w, b, r, (1, 1), (1, 1), True)
    assert rel_err(ys, y1.double()) <= TOL[dtype]


@pytest.mark.parametrize("bias,res,relu", [(False, False, False), (True, True, False)])
def test_split_k_epilogue_variants(bias, res, relu, gen):
    x, w, b, r = _make(gen, 2, 16, 20, 5, 5, 3, 3, (2, 2), (1, 1), torch.float32, bias=bias, res=res)
    y = tconv.fused_conv2d(x, w, b, r, (2, 2), (1, 1), relu, split_k=4,
                           config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16})
    _check(y, x, w, b, r, (2, 2), (1, 1), relu)
    assert (y < 0).any()


def test_split_k_more_slices_than_steps(gen):
    """1x1 with C = 16 is one step: five of six slices are empty and must add zeros."""
    x, w, b, r = _make(gen, 1, 16, 24, 5, 7, 1, 1, (1, 1), (0, 0), torch.float32)
    y = tconv.fused_conv2d(x, w, b, r, (1, 1), (0, 0), True, split_k=6,
                           config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16})
    _check(y, x, w, b, r, (1, 1), (0, 0), True)


def test_split_k_heuristic():
    """The slice count with the least work on the busiest SM (wave_cost; 132-SM H200/H100)."""
    sk = tconv.split_k_for
    assert sk(196, 256, 256, 3, 3, 132) == 8      # 256x14x14 at batch 1: 16 tiles, 36 steps
    assert sk(49, 512, 512, 3, 3, 132) == 15      # 512x7x7 at batch 1: 8 tiles, 72 steps
    assert sk(49, 64, 64, 3, 3, 132) == 9         # a 7x7 layer with C = 64: 9 steps, 9 slices
    assert sk(3136, 256, 256, 3, 3, 132) == 1     # 256x56x56 at batch 1: 196 tiles
    assert sk(32 * 49, 512, 512, 3, 3, 132) == 1  # 512x7x7 at batch 32: 200 tiles
    assert sk(196, 256, 64, 1, 1, 132) == 1       # one 64-channel step: nothing to split
    assert sk(49, 64, 256, 1, 1, 132) == 1        # 4 steps: the partials would cost more


@pytest.mark.parametrize("M", [1, 49, 196, 784, 3136])
def test_split_k_never_leaves_an_empty_slice(M):
    """Issue 15: a 7x7 layer with C <= 64 was split 8 ways with fewer steps than slices. The
    kernels cut `total` steps into balanced slices [i*total//S, (i+1)*total//S), and split_k_for
    never picks more slices than the fewest steps any configuration takes (BLOCK_C = 64)."""
    for K in (64, 512):
        for C in (3, 16, 64, 65, 512):
            for k in (1, 3, 7):
                split = tconv.split_k_for(M, K, C, k, k, 132)
                for cfg in tconv.conv_configs() + tconv.tma_configs():
                    total = k * k * -(-C // cfg.kwargs["BLOCK_C"])
                    sizes = [(i + 1) * total // split - i * total // split for i in range(split)]
                    assert min(sizes) >= 1 and sum(sizes) == total, (M, K, C, k, split, sizes)


def test_bad_split_k():
    x, w = torch.randn(1, 3, 5, 5, device=DEVICE), torch.randn(4, 3, 3, 3, device=DEVICE)
    for bad in (0, -1, 1.5, True, 65536):
        with pytest.raises(ValueError, match=r"split_k must be an int in \[1, 65535\]"):
            tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True, split_k=bad)


def test_config_list_is_sane():
    cfgs = tconv.conv_configs()
    assert {c.num_warps for c in cfgs} >= {4, 8}
    for c in cfgs:
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C"):
            v = c.kwargs[k]
            assert v >= 16 and v & (v - 1) == 0, (k, v)
        smem = c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_C"] * 4
        assert smem <= 200 * 1024, f"{c}: {smem} bytes of fp32 pipeline buffers"
    assert any(c.kwargs["BLOCK_M"] <= 32 for c in cfgs), "no tile for small M (7x7 at batch 1)"


def test_empty_batch(gen):
    x = _rand(gen, 0, 3, 5, 5, dtype=torch.float32)
    w = _rand(gen, 4, 3, 3, 3, dtype=torch.float32)
    y = tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True)
    assert y.shape == (0, 4, 5, 5)


def _bad_cases():
    x = torch.randn(2, 5, 7, 9)
    w = torch.randn(7, 5, 3, 3)
    b = torch.randn(7)
    r = torch.randn(2, 7, 7, 9)
    ok = dict(x=x, weight=w, bias=b, residual=r, stride=(1, 1), padding=(1, 1))
    return [
        ("x_rank", dict(ok, x=x[0]), ValueError, "x must be 4-D"),
        ("weight_rank", dict(ok, weight=w[0]), ValueError, "weight must be 4-D"),
        ("x_not_tensor", dict(ok, x=[1.0]), TypeError, "x must be a tensor"),
        ("x_dtype", dict(ok, x=x.double()), TypeError, "x must be float32, float16 or bfloat16"),
        ("weight_dtype", dict(ok, weight=w.half()), TypeError, "weight must have x's dtype"),
        ("bias_dtype", dict(ok, bias=b.to(torch.bfloat16)), TypeError, "bias must have x's dtype"),
        ("residual_dtype", dict(ok, residual=r.half()), TypeError, "residual must have x's dtype"),
        ("channels", dict(ok, weight=torch.randn(7, 4, 3, 3)), ValueError, "weight has 4 input channels per group but x has 5"),
        ("bias_shape", dict(ok, bias=torch.randn(6)), ValueError, "bias must have shape (7,), got (6,)"),
        ("residual_shape", dict(ok, residual=torch.randn(2, 7, 7, 8)), ValueError,
         "residual must have the output's shape (2, 7, 7, 9), got (2, 7, 7, 8)"),
        ("stride_len", dict(ok, stride=(1,)), TypeError, "stride must be a sequence of 2 ints"),
        ("stride_zero", dict(ok, stride=(0, 1)), ValueError, "stride must be >= 1"),
        ("padding_neg", dict(ok, padding=(-1, 0)), ValueError, "padding must be >= 0"),
        ("padding_float", dict(ok, padding=(1.0, 1)), TypeError, "padding must be a sequence of 2 ints"),
        ("too_small", dict(ok, x=torch.randn(2, 5, 2, 9), padding=(0, 0), residual=None), ValueError,
         "the padded input (2x9) is smaller than the kernel (3x3)"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _bad_cases()])
def test_bad_inputs_name_the_argument(name):
    case = next(c for c in _bad_cases() if c[0] == name)
    _, kw, exc, msg = case
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(exc, match=re.escape("fused_conv2d: " + msg)):
        tconv.fused_conv2d(kw["x"], kw["weight"], kw["bias"], kw["residual"], kw["stride"],
                           kw["padding"], True)


def test_bad_config():
    x, w = torch.randn(1, 3, 5, 5, device=DEVICE), torch.randn(4, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="config needs"):
        tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True, config={"BLOCK_M": 64})
    with pytest.raises(ValueError, match=r"config\['BLOCK_C'\] must be a power of two >= 16"):
        tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True,
                           config={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 8})


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["3x3s1", "7x7s2_stem"])
def test_gpu_autotuned_path_and_tf32(case, gen):
    """The autotuned kernel (no config=), exact fp32 and TF32 per cudnn.allow_tf32, and a
    second call of a tuned shape giving the same result."""
    N, C, K, H, W, kh, kw, stride, padding = CASES[case]
    x, w, b, r = _make(gen, N, C, K, H, W, kh, kw, stride, padding, torch.float32)
    y = tconv.fused_conv2d(x, w, b, r, stride, padding, True)
    _check(y, x, w, b, r, stride, padding, True)
    assert torch.equal(y, tconv.fused_conv2d(x, w, b, r, stride, padding, True))
    torch.backends.cudnn.allow_tf32 = True
    y32 = tconv.fused_conv2d(x, w, b, r, stride, padding, True)
    _check(y32, x, w, b, r, stride, padding, True, tol=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_large_tensor_64bit_offsets():
    """x with more than 2^31 elements (4.3 GB of fp16): offsets past int32 must be right."""
    N, C, H, W = 33, 64, 1024, 1024  # 2.2e9 elements
    try:
        x = torch.zeros(N, C, H, W, device="cuda", dtype=torch.float16,
                        ).contiguous(memory_format=torch.channels_last)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[-1, :, -4:, -4:] = 1.0  # only the last image's corner is non-zero
    w = torch.ones(16, C, 1, 1, device="cuda", dtype=torch.float16)
    y = tconv.fused_conv2d(x, w, None, None, (1, 1), (0, 0), False)
    assert y[-1, :, -4:, -4:].eq(64).all() and y[-1, :, :-4].eq(0).all() and y[0].eq(0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_torch_compile_through_triton_op(gen):
    """A torch.library.triton_op around the launcher compiles with Inductor (wrap_triton)."""
    from typing import List, Optional

    name = "deeparch_conv_kernel_test::conv"
    if not hasattr(torch.ops.deeparch_conv_kernel_test, "conv"):
        @torch.library.triton_op(name, mutates_args=())
        def _op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                r: Optional[torch.Tensor], stride: List[int], padding: List[int],
                relu: bool) -> torch.Tensor:
            return tconv.fused_conv2d(x, w, b, r, stride, padding, relu)

    op = torch.ops.deeparch_conv_kernel_test.conv
    x, w, b, r = _make(gen, 2, 16, 32, 9, 9, 3, 3, (1, 1), (1, 1), torch.float16)
    fn = torch.compile(lambda *a: op(*a, [1, 1], [1, 1], True), fullgraph=True)
    _check(fn(x, w, b, r), x, w, b, r, (1, 1), (1, 1), True)


def test_tma_autotune_pruning():
    cfgs = tconv.tma_configs()
    seven = tconv.prune_tma_configs(cfgs, {"Ho": 7, "Wo": 7, "K": 512, "C": 512})
    assert seven and all(c.kwargs["BLOCK_W"] == 8 and c.kwargs["BLOCK_H"] == 8 for c in seven)
    k64 = tconv.prune_tma_configs(cfgs, {"Ho": 56, "Wo": 56, "K": 64, "C": 64})
    assert k64 and all(c.kwargs["BLOCK_N"] == 64 for c in k64)
    assert len(tconv.prune_tma_configs(cfgs, {"Ho": 56, "Wo": 56, "K": 256, "C": 256})) == len(cfgs)


def test_autotune_pruning():
    """Tiles mostly padding for the shape are not compiled or timed; something always stays."""
    cfgs = tconv.conv_configs()

    def kept(N, Ho, K, C):
        return tconv.prune_configs(cfgs, {"M": N * Ho * Ho, "K": K, "C": C})

    stem = kept(32, 112, 64, 3)
    assert stem and all(c.kwargs["BLOCK_C"] == 16 for c in stem)
    small_m = kept(1, 7, 512, 512)  # M = 49
    assert small_m and all(c.kwargs["BLOCK_M"] <= 64 for c in small_m)
    assert any(c.kwargs["BLOCK_M"] == 32 for c in small_m)
    k64 = kept(32, 56, 64, 64)
    assert k64 and all(c.kwargs["BLOCK_N"] <= 64 for c in k64)
    assert len(kept(32, 28, 512, 512)) == len(cfgs)  # a big layer keeps every candidate
    tiny = kept(1, 1, 8, 3)
    assert len(tiny) == 1 and tiny[0] in cfgs


def test_heuristic_configs_are_in_the_autotune_list():
    keys = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for c in tconv.conv_configs()]
    for M, K, C in [(1, 8, 3), (49, 512, 512), (32 * 56 * 56, 64, 64), (32 * 28 * 28, 512, 512)]:
        assert tconv.heuristic_config(M, K, C) in keys  # so the every-config GPU test covers it
    tma_keys = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                for c in tconv.tma_configs()]
    for N, Ho, K in [(1, 7, 512), (32, 56, 64), (32, 28, 512), (32, 224, 64), (1, 14, 256)]:
        assert tconv.tma_heuristic_config(N, Ho, Ho, K) in tma_keys


def test_heuristic_tiles_from_wave_count():
    """Large tiles where they fill the GPU, smaller ones where they would leave SMs idle."""
    big = tconv.heuristic_config(32 * 56 * 56, 256, 256)
    assert (big["BLOCK_M"], big["BLOCK_N"]) == (128, 128)
    k64 = tconv.heuristic_config(32 * 56 * 56, 64, 64)
    assert k64["BLOCK_N"] == 64
    small = tconv.heuristic_config(49, 512, 512)
    assert small["BLOCK_M"] * small["BLOCK_N"] < 128 * 128
    assert tconv.tma_heuristic_config(32, 56, 56, 256)["BLOCK_N"] == 128
    assert tconv.tma_heuristic_config(32, 56, 56, 64)["BLOCK_N"] == 64
    assert tconv.tma_heuristic_config(1, 7, 7, 512)["BLOCK_W"] == 8  # a 7-wide image


# ---- the TMA kernel (tensor descriptors), in the interpreter ---------------------------------

TMA_DTYPES = [torch.float16, torch.bfloat16]
# (N, C, K, H, W, k, padding): stride 1, C and K multiples of 8, odd sizes, C tails past BLOCK_C,
# patches hanging over the image, padding 0 / 1 / 3 and asymmetric.
TMA_CASES = {
    "3x3": (2, 24, 40, 7, 9, 3, (1, 1)),
    "1x1": (1, 8, 16, 5, 6, 1, (0, 0)),
    "7x7": (1, 16, 24, 9, 11, 7, (3, 3)),
    "nopad": (1, 40, 8, 6, 5, 3, (0, 0)),
    "asym": (2, 16, 16, 5, 7, 3, (0, 2)),
}


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the TMA kernel on CPU tensors")
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tma_kernel_matches_float64_reference(case, dtype, gen):
    N, C, K, H, W, k, padding = TMA_CASES[case]
    x, w, b, r = _make(gen, N, C, K, H, W, k, k, (1, 1), padding, dtype)
    y = tconv.fused_conv2d(x, w, b, r, (1, 1), padding, True, tma=True)
    _check(y, x, w, b, r, (1, 1), padding, True)
    y_gather = tconv.fused_conv2d(x, w, b, r, (1, 1), padding, True, tma=False)
    assert rel_err(y, y_gather.double()) <= TOL[dtype]


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the TMA kernel on CPU tensors")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bias,res,relu,split_k", [(False, False, False, 1), (True, False, True, 1),
                                                   (True, True, True, 3), (False, True, False, 2)])
def test_tma_kernel_epilogues_split_k_and_nan(bias, res, relu, split_k, gen):
    """Every epilogue, split-K through the TMA kernel, and NaN/Inf exactly as torch gives them
    (also through TMA's zero-filled padding, which must not turn Inf * 0 into anything)."""
    dtype = torch.float16
    x, w, b, r = _make(gen, 2, 16, 24, 6, 7, 3, 3, (1, 1), (1, 1), dtype, bias=bias, res=res)
    x[0, 3, 0, 0] = float("nan")
    x[1, 5, 5, 6] = float("inf")  # a corner pixel: its neighbours outside are TMA's zeros
    y = tconv.fused_conv2d(x, w, b, r, (1, 1), (1, 1), relu, tma=True, split_k=split_k,
                           config={"BLOCK_H": 4, "BLOCK_W": 4, "BLOCK_N": 16, "BLOCK_C": 16})
    ref = _ref(x, w, b, r, (1, 1), (1, 1), relu)
    assert torch.isnan(ref).any()
    assert_nonfinite_match(y, ref)
    assert rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("case,why", [
    (dict(stride=(2, 2)), "stride 1 only"),
    (dict(dtype=torch.float32), "float16 or bfloat16"),
    (dict(C=12), "C and K multiples of 8"),
    (dict(K=20), "C and K multiples of 8"),
    (dict(misaligned=True), "16-byte aligned"),
])
def test_tma_refusals(case, why, gen):
    """tma=True on what the TMA kernel can't take is a clear error (tma=None falls back)."""
    dtype, C, K = case.get("dtype", torch.float16), case.get("C", 16), case.get("K", 16)
    stride = case.get("stride", (1, 1))
    x, w, b, _ = _make(gen, 1, C, K, 6, 6, 3, 3, stride, (1, 1), dtype, res=False)
    if case.get("misaligned"):  # a channels_last view 2 bytes into its storage
        flat = torch.zeros(1 * 6 * 6 * C + 1, dtype=dtype, device=DEVICE)
        x = flat[1:].view(1, 6, 6, C).permute(0, 3, 1, 2).copy_(x)
    with pytest.raises(ValueError, match=f"the TMA kernel was asked for but .*{why}"):
        tconv.fused_conv2d(x, w, b, None, stride, (1, 1), True, tma=True)
    y = tconv.fused_conv2d(x, w, b, None, stride, (1, 1), True)  # tma=None: the gather kernel
    _check(y, x, w, b, None, stride, (1, 1), True)


def test_tma_config_validation():
    x, w = torch.randn(1, 8, 5, 5, device=DEVICE).half(), torch.randn(8, 8, 3, 3, device=DEVICE).half()
    with pytest.raises(ValueError, match=r"BLOCK_H \* BLOCK_W must be >= 16"):
        tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True,
                           config={"BLOCK_H": 2, "BLOCK_W": 4, "BLOCK_N": 16, "BLOCK_C": 16})
    with pytest.raises(ValueError, match="tma=False but config is for conv_tma_kernel"):
        tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True, tma=False,
                           config={"BLOCK_H": 4, "BLOCK_W": 4, "BLOCK_N": 16, "BLOCK_C": 16})
    with pytest.raises(TypeError, match="tma must be None, True or False"):
        tconv.fused_conv2d(x, w, None, None, (1, 1), (1, 1), True, tma=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,K", [(24, 40), (40, 24), (12, 20)])
def test_gather_kernel_vectorised_channel_counts(C, K, dtype, gen):
    """C and K multiples of 8 (or 4) but not 16: the kernel is told (C_VEC, K_VEC) and rounds
    C, K and the strides to those multiples; the values must not change."""
    x, w, b, r = _make(gen, 2, C, K, 5, 7, 3, 3, (1, 1), (1, 1), dtype)
    y = tconv.fused_conv2d(x, w, b, r, (1, 1), (1, 1), True, tma=False,
                           config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16})
    _check(y, x, w, b, r, (1, 1), (1, 1), True)


def test_vec_hint():
    assert tconv._vec((24, 24 * 7, 24 * 63)) == 8
    assert tconv._vec((12, 12 * 7)) == 4
    assert tconv._vec((24, 24 * 7), unit_strides=(2,)) == 1  # channels not contiguous
    assert tconv._vec((3, 21)) == 1
