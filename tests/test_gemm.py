"""The CPU ``gemm`` backend (issue 13): 1x1 stride-1 convolutions as one GEMM with the epilogue
before its store (csrc/cpu/gemm_conv.cpp) against float64 on odd pixel counts (row tails, fewer
rows than one block) and channel counts (16-channel panel tails), both thread splits, views;
NaN and Inf exactly as torch gives them; its packed weight kept while the weight is unchanged
and remade after an in-place write; the op's torch.library contract (opcheck); what it refuses,
with the reason; ``auto`` verifies it, and torch.compile with freezing runs it."""
import math

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels import _ext, backends
from deeparch_kernels.ops import conv as conv_op, conv_gemm
from deeparch_kernels.testing import op_tolerance, rel_err

from helpers import backends_for, randn

pytestmark = pytest.mark.skipif("cpu" not in backends_for("cpu") or not torch.backends.mkldnn.is_available(),
                                reason="needs the C++ extension and oneDNN")
CL = torch.channels_last
TOL = op_tolerance("fused_conv2d", torch.float32, torch.device("cpu"))


def _ref(x, w, b, r, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double())
    if r is not None:
        y = y + r.double()
    return torch.relu(y) if relu else y


def _case(gen, n, c, h, w_, k, bias=True):
    x = randn(n, c, h, w_, gen=gen).contiguous(memory_format=CL)
    w = randn(k, c, 1, 1, gen=gen) / math.sqrt(max(c, 1))
    conv_op.prepack(w)
    b = randn(k, gen=gen) if bias else None
    return x, w, b


# (n, c, h, w, k): pixel counts below, at and past one 6-row block and one 48-row chunk; K with
# 16-channel panel tails of 1, 7, 8, 9 and 15; a packed weight above 256 KB (threads split panels).
SHAPES = [(1, 1, 1, 1, 1), (1, 3, 1, 5, 4), (1, 5, 2, 3, 17), (2, 7, 3, 5, 9), (1, 16, 7, 7, 8),
          (3, 33, 5, 4, 31), (1, 64, 9, 11, 24), (2, 24, 13, 7, 40), (1, 512, 7, 7, 160)]


@pytest.mark.parametrize("n,c,h,w,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_kernel_matches_float64(n, c, h, w, k, bias, relu, gen):
    x, wt, b = _case(gen, n, c, h, w, k, bias)
    r = randn(n, k, h, w, gen=gen).contiguous(memory_format=CL)
    u = conv_gemm.pack_weight(wt)
    for res in (None, r):
        out = conv_gemm.conv1x1(x, u, k, b, res, relu)
        assert out.is_contiguous(memory_format=CL) and out.shape == (n, k, h, w)
        assert rel_err(out, _ref(x, wt, b, res, relu)) <= TOL


def test_backend_runs_the_kernel_on_views_and_strided_inputs(gen):
    """Through fused_conv2d(backend='gemm'): a sliced (non-contiguous) input and an NCHW
    residual are brought to channels_last, the packed weight is made once and kept."""
    x, w, b = _case(gen, 2, 40, 9, 12, 24)
    xv = x[:, :, 1:, ::2]  # a view, channels_last strides but not dense
    r = randn(2, 24, 8, 6, gen=gen)  # NCHW
    with torch.no_grad():
        out = dk.fused_conv2d(xv, w, b, residual=r, backend="gemm")
        u = conv_op._prepacked(w).gemm
        dk.fused_conv2d(xv, w, b, residual=r, backend="gemm")
    assert u is not None and conv_op._prepacked(w).gemm is u
    assert rel_err(out, _ref(xv, w, b, r, True)) <= TOL


def test_nan_and_inf_come_out_as_torch_gives_them(gen):
    """A plain dot product, as torch's convolution: NaN and Inf in x, the weight or the residual
    land on the same outputs, and the NaN-keeping ReLU keeps them."""
    x, w, b = _case(gen, 1, 20, 6, 7, 19)
    x[0, 3, 2, 2], x[0, 5, 4, 1], x[0, 7, 0, 6] = float("nan"), float("inf"), -float("inf")
    r = randn(1, 19, 6, 7, gen=gen).contiguous(memory_format=CL)
    r[0, 2, 5, 5] = float("nan")
    for relu in (True, False):
        with torch.no_grad():
            out = dk.fused_conv2d(x, w, b, residual=r, relu=relu, backend="gemm")
        want = F.conv2d(x, w, b) + r
        want = torch.relu(want) if relu else want
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
        assert torch.equal(out[out.isinf()], want[want.isinf()])
        fin = torch.isfinite(want)
        assert rel_err(out[fin].reshape(1, -1), want[fin].double().reshape(1, -1)) <= TOL


def test_packed_weight_is_remade_after_an_inplace_write(gen):
    x, w, b = _case(gen, 1, 16, 5, 5, 16)
    with torch.no_grad():
        dk.fused_conv2d(x, w, b, backend="gemm")
        first = conv_op._prepacked(w).gemm
        w.mul_(2)
        out = dk.fused_conv2d(x, w, b, backend="gemm")
    assert conv_op._prepacked(w).gemm is not first
    assert rel_err(out, _ref(x, w, b, None, True)) <= TOL


def test_without_a_prepacked_weight_or_with_a_gradient_it_runs_the_cpu_backend(gen):
    x = randn(1, 8, 4, 4, gen=gen).contiguous(memory_format=CL)
    w = randn(8, 8, 1, 1, gen=gen)
    out = dk.fused_conv2d(x, w, None, backend="gemm")  # not prepacked: the cpu backend runs it
    assert rel_err(out, _ref(x, w, None, None, True)) <= TOL
    wg = randn(8, 8, 1, 1, gen=gen).requires_grad_()
    conv_op.prepack(wg)
    y = dk.fused_conv2d(x, wg, None, backend="gemm")
    y.sum().backward()
    assert wg.grad is not None and conv_op._prepacked(wg).gemm is None


@pytest.mark.parametrize("kwargs,why", [
    (dict(stride=2), "1x1 convolutions with stride 1 and padding 0"),
    (dict(padding=1), "1x1 convolutions with stride 1 and padding 0"),
])
def test_refuses_what_it_does_not_run_with_the_reason(kwargs, why, gen):
    x, w, b = _case(gen, 1, 8, 6, 6, 8)
    with pytest.raises(dk.BackendUnavailable, match=why):
        dk.fused_conv2d(x, w, b, backend="gemm", **kwargs)
    with pytest.raises(dk.BackendUnavailable, match="float32"):
        dk.fused_conv2d(x.bfloat16(), w.bfloat16(), b.bfloat16(), backend="gemm")
    w3 = randn(8, 8, 3, 3, gen=gen)
    with pytest.raises(dk.BackendUnavailable, match="1x1"):
        dk.fused_conv2d(x, w3, b, backend="gemm")


def test_refuses_when_built_without_avx2(gen, monkeypatch):
    x, w, b = _case(gen, 1, 8, 3, 5, 8)  # (a shape no earlier call left on the fast path)
    monkeypatch.setitem(_ext._state, "info", dict(_ext._state["info"], winograd=False))
    why = backends.reasons("fused_conv2d", x.device, x, w, b, None, [1, 1], [0, 0], True)
    assert "AVX2" in why["gemm"]
    with pytest.raises(dk.BackendUnavailable, match="AVX2"):
        dk.fused_conv2d(x, w, None, backend="gemm")


def test_op_checks_its_arguments_and_keeps_torch_library_contracts(gen):
    x, w, b = _case(gen, 2, 12, 3, 5, 20)
    u = conv_gemm.pack_weight(w)
    r = randn(2, 20, 3, 5, gen=gen).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.deeparch.conv1x1_gemm.default, (x, u, b, r, 20, True))
    torch.library.opcheck(torch.ops.deeparch.conv1x1_gemm.default, (x, u, None, None, 20, False))
    op = torch.ops.deeparch.conv1x1_gemm.default
    with pytest.raises(RuntimeError, match="u must be the packed"):
        op(x, u[:1], b, None, 20, True)
    with pytest.raises(RuntimeError, match="channels_last"):
        op(x.contiguous(), u, b, None, 20, True)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, u, torch.ones(3), None, 20, True)
    with pytest.raises(RuntimeError, match="residual must be"):
        op(x, u, b, r.contiguous(), 20, True)


def test_auto_verifies_and_may_choose_it(gen, monkeypatch, tmp_path):
    """auto lists gemm among the CPU candidates of a 1x1 layer, verifies it against stock
    PyTorch and takes whichever is fastest (here: forced by making it the only one of ours)."""
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(backends._OP_ORDER, ("fused_conv2d", "cpu"), ("gemm", "aten"))
    backends.clear_cache()
    x, w, b = _case(gen, 1, 32, 7, 7, 48)
    monkeypatch.setattr(backends, "MARGIN", -10.0)  # ours always "faster": the verified plugin wins
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, b, padding=0)
    assert "gemm" in backends.cached_choices().values()
    assert rel_err(out, _ref(x, w, b, None, True)) <= TOL
    backends.clear_cache()


def test_compile_with_freezing_leaves_1x1_layers_to_inductor(gen, monkeypatch, tmp_path):
    """Under torch.compile with inductor's freezing a 1x1 layer is recorded as a stock
    convolution (inductor prepacks it for oneDNN and fuses the residual in place) with our
    NaN-keeping ReLU, even where eager auto chose gemm: that measured faster compiled (ops/conv.py
    _dispatch). NaN still comes out where eager puts it."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(backends._OP_ORDER, ("fused_conv2d", "cpu"), ("gemm", "aten"))
    monkeypatch.setattr(backends, "MARGIN", -10.0)
    backends.clear_cache()
    calls = []
    real = conv_gemm.conv1x1
    monkeypatch.setattr(conv_gemm, "conv1x1", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 40, 1), torch.nn.BatchNorm2d(40),
                                torch.nn.ReLU()).eval()
    fused = dk.fuse(model).to(memory_format=CL)
    x = randn(2, 16, 9, 8, gen=gen).contiguous(memory_format=CL)
    xn = x.clone()
    xn[1, 3, 4, 4] = float("nan")
    torch._dynamo.reset()
    with torch.no_grad():
        fused(x)  # eager: auto verifies, times and remembers gemm for this layer
        assert list(backends.cached_choices().values()) == ["gemm"] and calls
        calls.clear()
        compiled = torch.compile(fused, fullgraph=True)
        out = compiled(x)
        assert not calls  # inductor's convolution ran
        assert rel_err(out, model.double()(x.double())) <= TOL
        model.float()
        out_nan, want_nan = compiled(xn), model(xn)
    assert torch.equal(out_nan.isnan(), want_nan.isnan()) and bool(want_nan.isnan().any())
    torch.testing.assert_close(out_nan.nan_to_num(), want_nan.nan_to_num(), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    backends.clear_cache()
