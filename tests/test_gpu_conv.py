"""GPU tests (marked ``gpu``, skipped without CUDA): fused_conv2d's ``cutlass``, ``cuda`` and
``triton`` backends on the benchmark (anchor) shapes and on random odd shapes, fp16/bf16/fp32
(where each backend takes them: ``cutlass`` refuses fp32 and C or K % 8 != 0, which is checked
too), every epilogue, against a float64 reference; NaN/Inf; the Triton TMA kernel against its
gather kernel; the CUDA channel-padding option; residual add+ReLU on the anchor sizes; the
``auto`` rule against stock PyTorch."""
import random

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels._precision import conv_allows_tf32
from helpers import TOL, assert_nonfinite_match, rel_err

pytestmark = pytest.mark.gpu

# The anchor table's 3x3 layers (../shared/anchors/README.md): (N, C=K, H=W, stride).
ANCHOR = [(32, 64, 224, 1), (32, 128, 112, 1), (32, 256, 56, 1), (32, 512, 28, 1), (32, 512, 14, 1),
          (32, 64, 56, 1), (32, 128, 28, 1), (32, 256, 14, 1), (32, 512, 7, 1), (32, 128, 56, 2),
          (1, 256, 56, 1), (1, 256, 14, 1)]
GPU_BACKENDS = ["cutlass", "cuda", "triton"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _backend_or_skip(name):
    a = dk.available_backends("cuda")[name]
    if not a.available:
        pytest.skip(f"{name}: {a.reason}")


def _refused(backend, x, w, b, r, s, p, relu):
    """Why `backend` refuses these inputs (its supports()), or None."""
    from deeparch_kernels import backends

    return backends.reasons("fused_conv2d", x.device, x, w, b, r, [s, s], [p, p], relu)[backend]


def _tol(dtype):
    return 5e-3 if dtype == torch.float32 and conv_allows_tf32() else TOL[dtype]


def _case(N, C, H, W, K, k, s, dtype, bias, res, gen, channels_last=True):
    dev = "cuda"
    cl = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C, H, W, generator=gen, device=dev).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(K, C, k, k, generator=gen, device=dev) * (C * k * k) ** -0.5).to(dtype).contiguous(memory_format=cl)
    b = torch.randn(K, generator=gen, device=dev).to(dtype) if bias else None
    p = k // 2
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    r = torch.randn(N, K, Ho, Wo, generator=gen, device=dev).to(dtype).contiguous(memory_format=cl) if res else None
    return x, w, b, r, p


def _check(out, x, w, b, r, s, p, relu, dtype):
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p)
    if r is not None:
        ref = ref + r.double()
    if relu:
        ref = torch.relu(ref)
    assert out.stride() == F.conv2d(x, w, b, s, p).stride()
    err = rel_err(out, ref)
    assert err <= _tol(dtype), err


@pytest.fixture
def cgen():
    return torch.Generator(device="cuda").manual_seed(7)


def _ref(x, w, b, r, s, p, relu):
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p)
    if r is not None:
        ref = ref + r.double()
    return torch.relu(ref) if relu else ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ANCHOR, ids=str)
def test_anchor_shapes(dtype, shape, cgen):
    backends = [b for b in GPU_BACKENDS if dk.available_backends("cuda")[b].available]
    if not backends:
        pytest.skip("neither the cuda nor the triton backend is available")
    N, C, H, s = shape
    for bias, res, relu in [(True, False, True), (True, True, True)]:
        if res and s != 1:
            continue
        x, w, b, r, p = _case(N, C, H, H, C, 3, s, dtype, bias, res, cgen)
        ref = _ref(x, w, b, r, s, p, relu)  # float64, once for every backend
        want_stride = F.conv2d(x[:1], w, b, s, p).stride()[1:]
        for backend in backends:
            if _refused(backend, x, w, b, r, s, p, relu):  # cutlass: fp32
                continue
            poison = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)
            del poison  # a NaN-filled block the caching allocator may hand to the output
            out = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend=backend)
            assert out.stride()[1:] == want_stride, backend
            err = rel_err(out, ref)
            assert err <= _tol(dtype), (backend, bias, res, err)
        del ref


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_odd_shapes(backend, dtype, cgen):
    _backend_or_skip(backend)
    rng = random.Random(11)
    for _ in range(12):
        N, C, K = rng.randint(1, 5), rng.choice([3, 5, 8, 17, 24, 64, 72]), rng.choice([7, 8, 16, 33, 64])
        H, W = rng.randint(5, 40), rng.randint(5, 40)
        k, s = rng.choice([1, 3, 3, 7]), rng.choice([1, 2])
        bias, res, relu = rng.random() < 0.7, rng.random() < 0.5, rng.random() < 0.8
        x, w, b, r, p = _case(N, C, H, W, K, k, s, dtype, bias, res, cgen, channels_last=rng.random() < 0.7)
        if r is not None and not x.is_contiguous(memory_format=torch.channels_last):
            r = r.contiguous()
        why = _refused(backend, x, w, b, r, s, p, relu)
        if why:  # cutlass: fp32, C or K % 8 != 0; the forced backend must say so
            with pytest.raises(dk.backends.BackendUnavailable, match="can't run these inputs"):
                dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend=backend)
            continue
        out = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend=backend)
        _check(out, x, w, b, r, s, p, relu, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nan_never_passes_as_number(backend, dtype, cgen):
    _backend_or_skip(backend)
    x, w, b, r, p = _case(2, 64, 17, 17, 64, 3, 1, dtype, True, True, cgen)
    x[0, 5, 3, 3] = float("nan")
    x[1, 7, 9, 9] = float("inf")
    r[0, 2, 0, 0] = float("nan")
    for relu in (True, False):  # the cutlass epilogue's ReLU is a runtime flag
        out = dk.fused_conv2d(x, w, b, residual=r, relu=relu, backend=backend)
        assert_nonfinite_match(out, _ref(x, w, b, r, 1, 1, relu))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 512, 7, 7, 512), (2, 264, 13, 11, 64), (1, 256, 14, 14, 256)],
                         ids=str)
def test_small_m_split_k(backend, dtype, shape, cgen):
    """Shapes whose few output tiles make the cuda and triton backends split the reduction
    (launch_plan.h / split_k_for: cuda 16 and 8 slices of the 7x7 and 14x14 layers), every
    epilogue, NaN kept (cutlass: no split-K, the same shapes on its 64x128 tile)."""
    _backend_or_skip(backend)
    N, C, H, W, K = shape
    for bias, res, relu in [(True, True, True), (False, False, False), (True, False, True)]:
        x, w, b, r, p = _case(N, C, H, W, K, 3, 1, dtype, bias, res, cgen)
        out = dk.fused_conv2d(x, w, b, residual=r, relu=relu, backend=backend)
        _check(out, x, w, b, r, 1, p, relu, dtype)
    x[0, 3, 2, 2] = float("nan")
    out = dk.fused_conv2d(x, w, b, residual=r, relu=True, backend=backend)
    assert_nonfinite_match(out, _ref(x, w, b, r, 1, p, True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_every_config(dtype, cgen):
    _backend_or_skip("triton")
    from deeparch_kernels.triton import conv as tconv

    for shape in [(2, 64, 28, 28, 64, 3, 1), (1, 3, 33, 31, 64, 7, 2), (1, 512, 7, 7, 512, 3, 1)]:
        N, C, H, W, K, k, s = shape
        x, w, b, r, p = _case(N, C, H, W, K, k, s, dtype, True, s == 1, cgen)
        for cfg in tconv.conv_configs():
            out = tconv.fused_conv2d(x, w, b, r, (s, s), (p, p), True, config=cfg, split_k=1)
            _check(out, x, w, b, r, s, p, True, dtype)
    # Split-K (chosen for small M): every config again, on a batch-1 14x14 layer, in 3 slices;
    # the TMA kernel's configs too (stride 1, fp16/bf16, sm_90+).
    x, w, b, r, p = _case(1, 256, 14, 14, 256, 3, 1, dtype, True, True, cgen)
    tma = dtype != torch.float32 and torch.cuda.get_device_capability()[0] >= 9
    for cfg in tconv.conv_configs() + (tconv.tma_configs() if tma else []):
        out = tconv.fused_conv2d(x, w, b, r, (1, 1), (p, p), True, config=cfg, split_k=3)
        _check(out, x, w, b, r, 1, p, True, dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton", "aten"])
@pytest.mark.parametrize("shape,dtype", [((32, 256, 56, 56), torch.float16), ((32, 256, 56, 56), torch.float32),
                                         ((32, 64, 56, 56), torch.float16), ((32, 2048, 7, 7), torch.float16),
                                         ((3, 5, 7, 11), torch.bfloat16)], ids=str)
def test_add_relu_anchor_sizes(backend, shape, dtype, cgen):
    _backend_or_skip(backend)
    a = torch.randn(*shape, generator=cgen, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(*shape, generator=cgen, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    out = dk.add_relu(a, b, backend=backend)
    assert torch.equal(out, torch.relu(a + b))
    a2 = a.clone()
    dk.add_relu_(a2, b, backend=backend)
    assert torch.equal(a2, torch.relu(a + b))


def test_auto_caches_one_choice_per_shape(cgen):
    from deeparch_kernels import backends

    backends.clear_cache()
    x, w, b, r, p = _case(8, 64, 28, 28, 64, 3, 1, torch.float16, True, True, cgen)
    y1 = dk.fused_conv2d(x, w, b, residual=r)
    y2 = dk.fused_conv2d(x, w, b, residual=r)
    assert torch.equal(y1, y2)
    picks = [v for (op, _, _, _), v in backends.cached_choices().items() if op == "fused_conv2d"]
    assert len(picks) == 1 and picks[0] in ("cutlass", "cuda", "triton", "aten")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cutlass_every_tile_layout_and_epilogue(dtype, cgen):
    """The three CUTLASS tiles (each shape below takes a different one, per _cutlass_conv_plan),
    every epilogue (bias or not, residual or not, ReLU or not), NCHW and channels_last inputs
    (the output follows torch's rule), strides 1/2, 1x1/3x3/7x7, and 16-byte misaligned views
    (copied to aligned buffers by the op)."""
    import json

    _backend_or_skip("cutlass")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    seen = set()
    for (N, C, H, K, k, s) in [(8, 64, 56, 64, 3, 1), (8, 256, 28, 256, 3, 1), (32, 512, 7, 512, 3, 1),
                               (4, 64, 56, 256, 1, 2), (2, 8, 64, 64, 7, 2), (3, 24, 13, 40, 3, 1)]:
        p = k // 2
        plan = json.loads(torch.ops.deeparch._cutlass_conv_plan([N, C, H, H], [K, C, k, k], [s, s], [p, p],
                                                               dtype, sms))
        seen.add(plan["tile"])
        for bias, res, relu, cl in [(True, True, True, True), (False, False, False, False),
                                    (True, False, True, False), (False, True, False, True)]:
            if res and s != 1:
                continue
            x, w, b, r, p = _case(N, C, H, H, K, k, s, dtype, bias, res, cgen, channels_last=cl)
            out = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend="cutlass")
            _check(out, x, w, b, r, s, p, relu, dtype)
    assert seen == {"128x128", "128x64", "64x128"}, seen
    x, w, b, r, p = _case(2, 16, 9, 9, 16, 3, 1, dtype, True, True, cgen)
    xv = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)[1:].view(2, 9, 9, 16).permute(0, 3, 1, 2)
    xv.copy_(x)
    assert xv.data_ptr() % 16 != 0
    out = dk.fused_conv2d(xv, w, b, residual=r, backend="cutlass")
    _check(out, xv, w, b, r, 1, p, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_tma_kernel_matches_gather_kernel(dtype, cgen):
    """The TMA kernel (stride 1) on anchor-like shapes and a ragged one, every epilogue, split-K,
    against the float64 reference and the gather kernel; every TMA configuration once."""
    _backend_or_skip("triton")
    from deeparch_kernels.triton import conv as tconv

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs sm_90+")
    for (N, C, H, W, K, k) in [(4, 64, 56, 56, 64, 3), (2, 256, 14, 14, 256, 3), (1, 512, 7, 7, 512, 3),
                               (3, 24, 13, 11, 40, 3), (2, 16, 33, 31, 64, 7)]:
        for bias, res, relu, split in [(True, True, True, None), (False, False, False, 1), (True, False, True, 3)]:
            x, w, b, r, p = _case(N, C, H, W, K, k, 1, dtype, bias, res, cgen)
            y = tconv.fused_conv2d(x, w, b, r, (1, 1), (p, p), relu, tma=True, split_k=split)
            _check(y.contiguous(memory_format=torch.channels_last), x, w, b, r, 1, p, relu, dtype)
            y0 = tconv.fused_conv2d(x, w, b, r, (1, 1), (p, p), relu, tma=False, split_k=split)
            assert rel_err(y, y0.double()) <= _tol(dtype)
    x, w, b, r, p = _case(2, 64, 20, 19, 64, 3, 1, dtype, True, True, cgen)
    for cfg in tconv.tma_configs():
        y = tconv.fused_conv2d(x, w, b, r, (1, 1), (p, p), True, config=cfg, split_k=1)
        _check(y, x, w, b, r, 1, p, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_channel_padding_option(dtype, cgen, monkeypatch):
    """DEEPARCH_CUDA_PAD_CHANNELS=1: the C = 3 stem (and C = 5) zero-padded onto the tensor-core
    kernel: the same result as the SIMT kernel's, within the dtype's tolerance; NaN kept."""
    _backend_or_skip("cuda")
    for (N, C, H, K, k, s) in [(4, 3, 64, 64, 7, 2), (2, 5, 17, 16, 3, 1)]:
        x, w, b, r, p = _case(N, C, H, H, K, k, s, dtype, True, s == 1, cgen)
        monkeypatch.setenv("DEEPARCH_CUDA_PAD_CHANNELS", "0")
        y0 = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, backend="cuda")
        monkeypatch.setenv("DEEPARCH_CUDA_PAD_CHANNELS", "1")
        y1 = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, backend="cuda")
        _check(y1, x, w, b, r, s, p, True, dtype)
        assert rel_err(y1, y0.double()) <= _tol(dtype)
        x[0, 1, 3, 3] = float("nan")
        y1 = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, backend="cuda")
        assert_nonfinite_match(y1, _ref(x, w, b, r, s, p, True))


def test_cutlass_opcheck(cgen):
    """torch.library.opcheck on deeparch::fused_conv2d_cutlass: schema, fake, autograd
    registration and dispatch agree (opcheck does not check the math: the tests above do)."""
    _backend_or_skip("cutlass")
    x, w, b, r, p = _case(2, 16, 9, 9, 24, 3, 1, torch.float16, True, True, cgen)
    torch.library.opcheck(torch.ops.deeparch.fused_conv2d_cutlass.default,
                          (x, w, b, r, [1, 1], [p, p], True))
    x, w, b, _, p = _case(2, 16, 9, 9, 24, 3, 2, torch.bfloat16, False, False, cgen, channels_last=False)
    torch.library.opcheck(torch.ops.deeparch.fused_conv2d_cutlass.default,
                          (x.requires_grad_(), w, None, None, [2, 2], [p, p], False))
