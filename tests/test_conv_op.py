"""deeparch::fused_conv2d through the public API on every backend that runs here, against a
float64 reference: odd sizes, C=3, strides 1 and 2, 1x1/3x3/7x7, every epilogue combination,
both memory formats, NaN/Inf, gradients, opcheck and bad inputs."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels._precision import conv_allows_tf32
from helpers import TOL, assert_nonfinite_match, backends_for, devices, randn, rel_err

# (N, C, H, W, K, ksize, stride, padding)
SHAPES = [
    (2, 3, 7, 9, 8, 3, 1, 1),  # C=3 (the first VGG/ResNet layer), odd H/W
    (2, 5, 9, 7, 7, 3, 2, 1),  # stride 2, odd channel counts
    (1, 16, 8, 8, 16, 1, 1, 0),  # 1x1 (bottleneck)
    (1, 16, 9, 9, 24, 1, 2, 0),  # 1x1 stride 2 (downsample)
    (1, 3, 15, 15, 8, 7, 2, 3),  # 7x7 stride 2 (stem)
    (2, 8, 5, 5, 12, 3, 1, 0),  # no padding
]
EPILOGUES = list(itertools.product([False, True], [False, True], [False, True]))  # bias, residual, relu


def _pairs():
    for dev in devices():
        for b in backends_for(dev):
            yield dev, b


def _inputs(shape, dtype, device, gen, channels_last, bias, residual):
    N, C, H, W, K, k, s, p = shape
    x = randn(N, C, H, W, dtype=dtype, device=device, gen=gen, channels_last=channels_last)
    w = randn(K, C, k, k, dtype=dtype, device=device, gen=gen, scale=(C * k * k) ** -0.5)
    b = randn(K, dtype=dtype, device=device, gen=gen) if bias else None
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    r = randn(N, K, Ho, Wo, dtype=dtype, device=device, gen=gen, channels_last=channels_last) if residual else None
    return x, w, b, r


def _ref(x, w, b, r, s, p, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p)
    if r is not None:
        y = y + r.double()
    return torch.relu(y) if relu else y


def _tol(dtype, device):
    if dtype == torch.float32 and device == "cuda" and conv_allows_tf32():
        return 5e-3  # TF32, as torch's own convolutions
    return TOL[dtype]


def _dtypes(device, backend):
    if device == "cpu" and backend == "triton":
        return [torch.float32, torch.bfloat16]  # interpreter time: fp16 is covered on the GPU
    return [torch.float32, torch.float16, torch.bfloat16]


CASES = [(dev, b, dt) for dev, b in _pairs() for dt in _dtypes(dev, b)]


@pytest.mark.parametrize("device,backend,dtype", CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference(device, backend, dtype, shape, channels_last, gen):
    epilogues = EPILOGUES if backend != "triton" or device == "cuda" else EPILOGUES[::3]
    for bias, residual, relu in epilogues:
        x, w, b, r = _inputs(shape, dtype, device, gen, channels_last, bias, residual)
        s, p = shape[6], shape[7]
        out = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend=backend)
        want = F.conv2d(x, w, b, s, p)
        assert out.shape == want.shape and out.dtype == dtype
        assert out.stride() == want.stride(), "output memory format must be torch's conv2d's"
        err = rel_err(out, _ref(x, w, b, r, s, p, relu))
        assert err <= _tol(dtype, device), (bias, residual, relu, err)
        if relu:
            assert (out >= 0).all()


@pytest.mark.parametrize("device,backend", list(_pairs()))
def test_padding_default_is_same(device, backend, gen):
    x, w, b, _ = _inputs((1, 4, 6, 5, 4, 3, 1, 1), torch.float32, device, gen, True, True, False)
    out = dk.fused_conv2d(x, w, b, backend=backend)
    assert out.shape == (1, 4, 6, 5)
    assert rel_err(out, _ref(x, w, b, None, 1, 1, True)) <= TOL[torch.float32]


@pytest.mark.parametrize("device,backend", list(_pairs()))
def test_nan_inf_like_torch_relu(device, backend, gen):
    x, w, b, r = _inputs((1, 4, 7, 7, 6, 3, 1, 1), torch.float32, device, gen, True, True, True)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 5, 5] = float("inf")
    r[0, 3, 0, 0] = float("nan")
    r[0, 4, 6, 6] = float("-inf")
    out = dk.fused_conv2d(x, w, b, residual=r, backend=backend)
    ref = _ref(x, w, b, r, 1, 1, True)
    assert torch.isnan(ref).any()
    assert_nonfinite_match(out, ref)
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("device,backend", list(_pairs()))
@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_match_reference(device, backend, stride, gen):
    x, w, b, r = _inputs((2, 3, 7, 6, 5, 3, stride, 1), torch.float32, device, gen, False, True, False)
    r = randn(*dk.ops.conv.output_shape(x, w, (stride, stride), (1, 1)), device=device, gen=gen)
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    out = dk.fused_conv2d(x, w, b, stride=stride, residual=r, backend=backend)
    g = randn(*out.shape, device=device, gen=gen)
    grads = torch.autograd.grad(out, leaves, g)
    dbl = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.relu(F.conv2d(dbl[0], dbl[1], dbl[2], stride, 1) + dbl[3])
    ref_grads = torch.autograd.grad(ref, dbl, g.double())
    for name, got, want in zip("xwbr", grads, ref_grads):
        assert rel_err(got, want) <= 1e-5, name


def test_gradcheck_cpu_op(gen):
    if "cpu" not in backends_for("cpu"):
        pytest.skip("C++ extension not built")
    x, w, b, r = _inputs((1, 2, 5, 4, 3, 3, 1, 1), torch.float32, "cpu", gen, False, True, True)
    r = r + torch.where(F.conv2d(x, w, b, 1, 1) + r > 0, 0.3, -0.3)  # away from the ReLU kink
    args = [t.requires_grad_() for t in (x, w, b, r)]
    fn = lambda x, w, b, r: dk.fused_conv2d(x, w, b, residual=r, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-2, atol=2e-2, rtol=2e-2)


def test_opcheck(gen):
    for dev, backend in _pairs():
        x, w, b, r = _inputs((1, 3, 6, 5, 4, 3, 2, 1), torch.float32, dev, gen, True, True, True)
        args = (x.requires_grad_(), w, b, r, [2, 2], [1, 1], True)
        if backend in ("cpu", "cuda"):
            torch.library.opcheck(torch.ops.deeparch.fused_conv2d.default, args)
        elif backend == "triton":
            utils = ("test_schema", "test_autograd_registration", "test_faketensor")
            if dev == "cuda":
                utils += ("test_aot_dispatch_dynamic",)
            torch.library.opcheck(torch.ops.deeparch.fused_conv2d_triton.default, args, test_utils=utils)


def test_compile_fullgraph_and_export(gen):
    x, w, b, r = _inputs((1, 4, 6, 6, 4, 3, 1, 1), torch.float32, "cpu", gen, True, True, True)

    def f(x, w, b, r):
        return dk.fused_conv2d(x, w, b, residual=r)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, w, b, r), f(x, w, b, r))

    class M(torch.nn.Module):
        def forward(self, x, w, b, r):
            return f(x, w, b, r)

    ep = torch.export.export(M(), (x, w, b, r))
    assert torch.equal(ep.module()(x, w, b, r), f(x, w, b, r))


BAD = [
    (dict(x=torch.randn(5, 5)), ValueError, "x must be 4-D"),
    (dict(w=torch.randn(4, 3, 3)), ValueError, "weight must be 4-D"),
    (dict(w=torch.randn(4, 2, 3, 3)), ValueError, "weight has 2 input channels per group but x has 3"),
    (dict(groups=3), ValueError, "groups=3 must be >= 1 and divide"),
    (dict(groups=2.5), TypeError, "groups must be an int"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=(1, 2, 3)), ValueError, "stride must have 1 or 2 values"),
    (dict(stride="2"), TypeError, "stride must be an int or a sequence"),
    (dict(padding="full"), ValueError, "padding must be 'same', 'valid'"),
    (dict(padding="same", stride=2), ValueError, "not supported for strided convolutions"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(b=torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
    (dict(r=torch.randn(1, 4, 4, 4)), ValueError, "residual must have the output's shape"),
    (dict(w=torch.randn(4, 3, 3, 3, dtype=torch.float16)), TypeError, "weight must have x's dtype"),
    (dict(b=torch.randn(4, device="meta")), ValueError, "bias must be on x's device"),
    (dict(x=torch.ones(1, 3, 5, 5, dtype=torch.int64), w=torch.ones(4, 3, 3, 3, dtype=torch.int64)),
     TypeError, "x must be a floating-point tensor"),
    (dict(x=torch.randn(1, 3, 5, 5).to_sparse()), TypeError, "x has layout torch.sparse_coo"),
    (dict(w=torch.randn(4, 3, 9, 9), padding=1), ValueError, "smaller than the kernel"),
    (dict(backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
    (dict(backend="cuda"), dk.BackendUnavailable, "'cuda' backend runs CUDA tensors"),
]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs(bad, exc, match):
    args = dict(x=torch.randn(1, 3, 5, 5), w=torch.randn(4, 3, 3, 3), b=torch.randn(4), r=None,
                stride=1, padding=1, dilation=1, groups=1, backend="auto")
    args.update(bad)
    with pytest.raises(exc, match=match):
        dk.fused_conv2d(args["x"], args["w"], args["b"], stride=args["stride"], padding=args["padding"],
                        residual=args["r"], dilation=args["dilation"], groups=args["groups"],
                        backend=args["backend"])


def test_cpp_checks_name_the_argument():
    if "cpu" not in backends_for("cpu"):
        pytest.skip("C++ extension not built")
    op = torch.ops.deeparch.fused_conv2d
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        op(x, w, None, torch.randn(1, 4, 4, 4), [1, 1], [1, 1], True)
    with pytest.raises(RuntimeError, match="weight has 2 input channels"):
        op(x, torch.randn(4, 2, 3, 3), None, None, [1, 1], [1, 1], True)
    with pytest.raises(RuntimeError, match="stride must be two integers >= 1"):
        op(x, w, None, None, [0, 1], [1, 1], True)


def test_auto_order_on_cpu(gen, monkeypatch):
    """Without timing, auto takes the first candidate of the op's CPU order."""
    from deeparch_kernels import backends

    monkeypatch.setenv("DEEPARCH_AUTOTUNE", "0")
    backends.clear_cache()
    x, w, b, _ = _inputs((1, 4, 6, 6, 4, 3, 1, 1), torch.float32, "cpu", gen, True, True, False)
    dk.fused_conv2d(x, w, b)
    picks = [v for (op, _, _, _), v in backends.cached_choices().items() if op == "fused_conv2d"]
    assert picks == ["cpu"]  # the CPU order for conv (ops/conv.py): prepacked oneDNN first
