"""deeparch::add_relu / add_relu_ on every backend that runs here, against a float64 reference."""
import pytest
import torch

import deeparch_kernels as dk
from deeparch_kernels import backends
from helpers import TOL, assert_nonfinite_match, backends_for, devices, poison, randn, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, layout): odd sizes, empty, 1 element, vector tails, 4-D in both memory formats.
CASES = [
    ((0,), "contiguous"),
    ((1,), "contiguous"),
    ((7,), "contiguous"),
    ((1000003,), "contiguous"),
    ((3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((3, 17, 9, 11), "channels_last"),
    ((0, 4, 3, 3), "channels_last"),
    ((1, 1, 1, 1), "contiguous"),
]


def _pairs():
    for dev in devices():
        for b in backends_for(dev):
            yield dev, b


def _make(shape, layout, dtype, device, gen):
    x = randn(*shape, dtype=dtype, device=device, gen=gen)
    y = randn(*shape, dtype=dtype, device=device, gen=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    return x, y


def _ref(x, y):
    return torch.relu(x.double() + y.double())


@pytest.mark.parametrize("device,backend", list(_pairs()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=lambda v: str(v))
def test_add_relu_matches_reference(device, backend, dtype, shape, layout, gen):
    x, y = _make(shape, layout, dtype, device, gen)
    poison(torch.empty_like(x))  # a freed NaN block the allocator may hand to the output
    out = dk.add_relu(x, y, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    if out.numel():  # (torch itself gives empty tensors contiguous strides)
        assert out.stride() == torch.empty_like(x).stride(), "output must keep x's memory format"
    assert rel_err(out, _ref(x, y)) <= TOL[dtype]
    # The add is rounded once, like torch's: the result is bit-identical to eager.
    assert torch.equal(out, torch.relu(x + y))


@pytest.mark.parametrize("device,backend", list(_pairs()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [c for c in CASES if c[0] != (1000003,)], ids=lambda v: str(v))
def test_add_relu_inplace(device, backend, dtype, shape, layout, gen):
    x, y = _make(shape, layout, dtype, device, gen)
    want = torch.relu(x + y)
    stride = x.stride()
    ret = dk.add_relu_(x, y, backend=backend)
    assert ret is x and x.stride() == stride
    assert torch.equal(x, want)


@pytest.mark.parametrize("device,backend", list(_pairs()))
def test_non_contiguous_views(device, backend, gen):
    base = randn(4, 6, 10, 12, device=device, gen=gen)
    other = randn(4, 6, 10, 12, device=device, gen=gen)
    views = [
        (base[:, :, ::2, 1::3], other[:, :, 1::2, ::3]),  # strided slices
        (base.transpose(2, 3), other.transpose(2, 3)),  # permuted, dense
        (base[:, 1:5], other.transpose(2, 3).contiguous().transpose(2, 3)[:, 1:5]),
    ]
    for x, y in views:
        out = dk.add_relu(x, y, backend=backend)
        assert torch.equal(out, torch.relu(x + y))
        x2 = x.clone()
        dk.add_relu_(x2, y, backend=backend)
        assert torch.equal(x2, torch.relu(x + y))
    # In place through a strided view writes through to the base tensor only at the view.
    b2 = base.clone()
    v = b2[:, :, ::2, 1::3]
    want = torch.relu(v + other[:, :, 1::2, ::3])
    dk.add_relu_(v, other[:, :, 1::2, ::3], backend=backend)
    assert torch.equal(b2[:, :, ::2, 1::3], want)
    mask = torch.ones_like(b2, dtype=torch.bool)
    mask[:, :, ::2, 1::3] = False
    assert torch.equal(b2[mask], base[mask])


@pytest.mark.parametrize("device,backend", list(_pairs()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate_like_torch_relu(device, backend, dtype, gen):
    x = randn(2, 3, 5, 7, dtype=dtype, device=device, gen=gen)
    y = randn(2, 3, 5, 7, dtype=dtype, device=device, gen=gen)
    x.view(-1)[::11] = float("nan")
    x.view(-1)[3::13] = float("inf")
    x.view(-1)[5::17] = float("-inf")
    y.view(-1)[3::26] = float("-inf")  # inf + -inf = nan
    y.view(-1)[7::19] = float("nan")
    out = dk.add_relu(x, y, backend=backend)
    ref = torch.relu(x.double() + y.double())
    assert_nonfinite_match(out, ref)
    assert torch.isnan(out).any() and torch.isposinf(out).any()
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("device,backend", list(_pairs()))
def test_gradients_match_torch(device, backend, gen):
    x = randn(3, 4, 5, 6, device=device, gen=gen).requires_grad_()
    y = randn(3, 4, 5, 6, device=device, gen=gen).requires_grad_()
    g = randn(3, 4, 5, 6, device=device, gen=gen)
    out = dk.add_relu(x, y, backend=backend)
    gx, gy = torch.autograd.grad(out, (x, y), g)
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    rx, ry = torch.autograd.grad(torch.relu(xr + yr), (xr, yr), g.double())
    assert torch.equal(gx.double(), rx) and torch.equal(gy.double(), ry)


@pytest.mark.parametrize("device,backend", list(_pairs()))
def test_gradcheck(device, backend, gen):
    # fp32 kernels: finite differences in fp32 with a step well away from the ReLU kink.
    x = randn(2, 3, 4, 5, device=device, gen=gen)
    y = randn(2, 3, 4, 5, device=device, gen=gen)
    s = x + y
    y = torch.where(s.abs() < 0.05, y + 0.2, y)  # keep x + y off the kink at 0
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dk.add_relu(a, b, backend=backend), (x, y),
                                    eps=1e-2, atol=1e-2, rtol=1e-2)


def test_inplace_autograd_matches_torchvision_pattern(gen):
    a = randn(2, 3, 4, 4, gen=gen).requires_grad_()
    b = randn(2, 3, 4, 4, gen=gen).requires_grad_()
    out = a * 2  # a non-leaf, as a BN output in a ResNet block
    dk.add_relu_(out, b)
    out.sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = a2 * 2
    ref += b2
    torch.relu(ref).sum().backward()
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)


def test_opcheck_cpp_ops(gen):
    if "cpu" not in backends_for("cpu"):
        pytest.skip("C++ extension not built")
    x = randn(2, 3, 5, 7, gen=gen, channels_last=True)
    y = randn(2, 3, 5, 7, gen=gen, channels_last=True)
    torch.library.opcheck(torch.ops.deeparch.add_relu.default, (x.requires_grad_(), y))
    torch.library.opcheck(torch.ops.deeparch.add_relu_.default, (x.detach().clone(), y))
    torch.library.opcheck(torch.ops.deeparch.relu_.default, (x.detach().clone(),))


def test_opcheck_triton_ops(gen):
    if "triton" not in backends_for("cpu" if not torch.cuda.is_available() else "cuda"):
        pytest.skip("Triton backend not runnable here")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = randn(2, 3, 5, 7, gen=gen, device=dev)
    y = randn(2, 3, 5, 7, gen=gen, device=dev)
    # Under the CPU interpreter AOT tracing can't run a Triton kernel on fake tensors: that part
    # of opcheck runs on the GPU only.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if dev == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.deeparch.add_relu_triton.default, (x, y), test_utils=utils)
    torch.library.opcheck(torch.ops.deeparch.add_relu_triton_.default, (x.clone(), y), test_utils=utils)


@pytest.mark.parametrize("inplace", [False, True])
def test_module(inplace, gen):
    from deeparch_kernels.nn.add_relu import FusedAddReLU

    m = FusedAddReLU(inplace=inplace)
    x, y = randn(2, 3, 4, 4, gen=gen), randn(2, 3, 4, 4, gen=gen)
    want = torch.relu(x + y)
    out = m(x, y)
    assert torch.equal(out, want) and (out is x) == inplace
    assert "backend='auto'" in repr(m) and m.state_dict() == {}


@pytest.mark.parametrize(
    "x,y,exc,match",
    [
        (torch.randn(2, 3), torch.randn(3, 2), ValueError, "does not broadcast with x's"),
        (torch.randn(2, 3), torch.randn(2, 3, device="meta"), ValueError, "identity must be on x's device"),
        (torch.randn(2, 3), [1.0], TypeError, "must be tensors"),
    ],
)
def test_bad_inputs(x, y, exc, match):
    with pytest.raises(exc, match=match):
        dk.add_relu(x, y)
    with pytest.raises(exc, match=match):
        dk.add_relu_(x, y)


def test_cpp_checks_are_clear_too():
    if "cpu" not in backends_for("cpu"):
        pytest.skip("C++ extension not built")
    with pytest.raises(RuntimeError, match="identity must have x's shape"):
        torch.ops.deeparch.add_relu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="identity must have x's dtype"):
        torch.ops.deeparch.add_relu(torch.randn(2, 3), torch.randn(2, 3).half())


def test_unknown_and_unavailable_backend():
    x, y = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        dk.add_relu(x, y, backend="cudnn")
    with pytest.raises(dk.BackendUnavailable, match="'cuda' backend runs CUDA tensors"):
        dk.add_relu(x, y, backend="cuda")


def test_auto_picks_cpp_on_cpu_and_caches(monkeypatch):
    """Without timing, auto takes the first candidate of the CPU order once it checked it."""
    if "cpu" not in backends_for("cpu"):
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("DEEPARCH_AUTOTUNE", "0")
    backends.clear_cache()
    x, y = torch.randn(33), torch.randn(33)
    dk.add_relu(x, y)
    picks = [v for (op, dev, _, _), v in backends.cached_choices().items() if op == "add_relu"]
    assert picks == ["cpu"]


def test_compile_fullgraph(gen):
    x = randn(2, 3, 4, 5, gen=gen)
    y = randn(2, 3, 4, 5, gen=gen)

    def f(a, b):
        return dk.add_relu(a, b) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, y), f(x, y))
