"""The CPU ``winograd`` backend (issue 13): Winograd F(4x4, 3x3) and F(2x2, 3x3) (csrc/cpu/winograd.cpp)
against float64 on odd sizes and channel counts (the kernel's vector tails), views and both
residual layouts; NaN and Inf exactly as torch gives them (the direct convolution
runs such inputs); its transformed weight kept while the weight is unchanged and remade after an
in-place write; what it refuses, with the reason; ``auto`` verifies it like every backend."""
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels import backends
from deeparch_kernels.ops import conv as conv_op, conv_winograd
from deeparch_kernels.testing import nonfinite_mismatch, op_tolerance, rel_err

from helpers import backends_for, randn

pytestmark = pytest.mark.skipif("cpu" not in backends_for("cpu") or not torch.backends.mkldnn.is_available(),
                                reason="needs the C++ extension and oneDNN")
CL = torch.channels_last
TOL = op_tolerance("fused_conv2d", torch.float32, torch.device("cpu"))


def _ref(x, w, b, r, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, 1)
    if r is not None:
        y = y + r.double()
    return torch.relu(y) if relu else y


def _torch(x, w, b, r, relu):
    """torch's own fp32 result, for NaN/Inf positions."""
    y = F.conv2d(x, w, b, 1, 1)
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


def _case(gen, n, c, h, w_, k, bias=True):
    x = randn(n, c, h, w_, gen=gen).contiguous(memory_format=CL)
    w = randn(k, c, 3, 3, gen=gen) / math.sqrt(9 * c)
    conv_op.prepack(w)
    b = randn(k, gen=gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("n,c,h,w,k", [(1, 1, 1, 1, 1), (2, 3, 5, 7, 4), (1, 16, 8, 8, 24),
                                        (3, 5, 9, 6, 7), (1, 32, 14, 13, 16), (2, 8, 2, 3, 5),
                                        (1, 64, 11, 10, 48), (2, 21, 6, 9, 33),
                                        (1, 24, 10, 2, 20), (1, 40, 4, 20, 36),  # 5 last rows
                                        (1, 144, 6, 7, 40),  # U prefetched into L2
                                        (2, 64, 41, 38, 64)])  # threads on chunks of their own
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("m", [2, 4])
def test_kernel_matches_float64(n, c, h, w, k, bias, relu, m, gen):
    x, wt, b = _case(gen, n, c, h, w, k, bias)
    r = randn(n, k, h, w, gen=gen).contiguous(memory_format=CL)
    t = conv_winograd.transform_weight(wt, m)
    for res in (None, r):
        out = conv_winograd.conv3x3(x, t, b, res, relu)
        assert out.shape == (n, k, h, w) and out.is_contiguous(memory_format=CL)
        assert rel_err(out, _ref(x, wt, b, res, relu)) <= TOL


@pytest.mark.parametrize("m", [2, 4])
def test_kernel_error_is_near_the_direct_convolutions(m, gen):
    """On ResNet's widest layer (512 channels: the longest sums) the Winograd result stays within
    a small factor of oneDNN's direct convolution's error (F(4x4)'s points 0, +-3/2, +-2/3 are
    chosen for this: the usual 0, +-1, +-2 measured ~8x the direct error here)."""
    x, wt, b = _case(gen, 1, 512, 7, 7, 512)
    ref = _ref(x, wt, b, None, False)
    direct = rel_err(F.conv2d(x, wt, b, 1, 1), ref)
    out = conv_winograd.conv3x3(x, conv_winograd.transform_weight(wt, m), b, None, False)
    assert rel_err(out, ref) <= 4 * direct


def test_tile_size_rule():
    """m = 4 unless there are few tiles (then reading its 36/16 larger transformed weight costs
    more than the products it saves): the choices measured faster on these layers (see
    conv_winograd's cost comment for how)."""
    assert conv_winograd.tile((1, 64, 56, 56)) == 4
    assert conv_winograd.tile((1, 128, 28, 28)) == 4
    assert conv_winograd.tile((1, 256, 14, 14)) == 2
    assert conv_winograd.tile((1, 512, 7, 7)) == 2
    assert conv_winograd.tile((1, 512, 28, 28)) == 4
    assert conv_winograd.tile((8, 512, 7, 7)) == 4
    assert conv_winograd.tile((8, 256, 14, 14)) == 4


@pytest.mark.parametrize("residual", [None, "nchw", "cl"])
@pytest.mark.parametrize("relu", [True, False])
def test_backend_matches_float64(residual, relu, gen):
    x, w, b = _case(gen, 2, 16, 9, 10, 20)
    r = None if residual is None else randn(2, 20, 9, 10, gen=gen)
    if residual == "cl":
        r = r.contiguous(memory_format=CL)
    out = torch.full((2, 20, 9, 10), float("nan")).contiguous(memory_format=CL)  # poisoned
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, b, residual=r, relu=relu, backend="winograd")
    assert conv_op._prepacked(w).winograd  # the Winograd path ran
    assert out.is_contiguous(memory_format=CL)
    assert rel_err(out, _ref(x, w, b, r, relu)) <= TOL


def test_strided_view_input(gen):
    big = randn(2, 24, 12, 12, gen=gen).contiguous(memory_format=CL)
    x = big[:, 4:20, 1:10, 2:11]  # a channels_last view, not contiguous
    w = randn(8, 16, 3, 3, gen=gen) / 12
    conv_op.prepack(w)
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, None, backend="winograd")
    assert rel_err(out, _ref(x, w, None, None, True)) <= TOL


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e37])
@pytest.mark.parametrize("relu", [True, False])
def test_nonfinite_and_huge_inputs_come_out_as_torch_gives_them(value, relu, gen):
    """A NaN would smear over its 4x4 tile and an Inf turn into NaN through the transforms: such
    inputs (and inputs near overflow) run on the direct convolution, so positions match torch."""
    x, w, b = _case(gen, 1, 16, 10, 10, 6)
    x[0, 3, 4, 5] = value
    x[0, 1, 9, 0] = value
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, b, relu=relu, backend="winograd")
    want = _torch(x, w, b, None, relu)
    assert nonfinite_mismatch(out, want) is None
    assert rel_err(out, _ref(x, w, b, None, relu)) <= TOL or value == 3e37


@pytest.mark.parametrize("where", ["first", "last"])
def test_nonfinite_input_in_any_chunk_runs_the_direct_convolution(where, gen):
    """With many tiles the threads take chunks of their own: a NaN in the first or the last
    chunk still sends the whole call to the direct convolution (NaN where torch puts it)."""
    x, w, b = _case(gen, 2, 64, 41, 38, 64)
    x[0 if where == "first" else 1, 5, 2 if where == "first" else 39, 3] = float("nan")
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, b, backend="winograd")
    assert conv_op._prepacked(w).winograd  # the Winograd kernel was tried
    assert nonfinite_mismatch(out, _torch(x, w, b, None, True)) is None
    assert rel_err(out, _ref(x, w, b, None, True)) <= TOL


def test_nonfinite_residual_comes_out_as_torch_gives_it(gen):
    x, w, b = _case(gen, 1, 16, 6, 6, 8)
    r = randn(1, 8, 6, 6, gen=gen).contiguous(memory_format=CL)
    r[0, 2, 3, 3], r[0, 5, 0, 1], r[0, 1, 1, 1] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, b, residual=r, backend="winograd")
    assert nonfinite_mismatch(out, _torch(x, w, b, r, True)) is None


def test_nonfinite_weight_runs_the_cpu_backend(gen):
    """A non-finite weight: the cpu backend's direct convolution runs it, bit for bit. (That one,
    oneDNN on the prepacked weight, skips the zero padding where torch's conv2d multiplies it, so
    at the borders Inf * 0 is not NaN there: a difference from torch that this does not change.)"""
    x, w, b = _case(gen, 1, 16, 6, 6, 4)
    with torch.no_grad():
        w[1, 2, 0, 0] = float("inf")
        out = dk.fused_conv2d(x, w, b, backend="winograd")
        direct = dk.fused_conv2d(x, w, b, backend="cpu")
    assert [t.bound for t in conv_op._prepacked(w).winograd.values()] == [float("inf")]
    assert torch.equal(out.nan_to_num(), direct.nan_to_num()) and torch.equal(out.isnan(), direct.isnan())


def test_weight_written_in_place_is_seen(gen):
    x, w, b = _case(gen, 1, 16, 7, 7, 8)
    with torch.no_grad():
        dk.fused_conv2d(x, w, b, backend="winograd")
        first = dict(conv_op._prepacked(w).winograd)
        w.mul_(-2.0)
        out = dk.fused_conv2d(x, w, b, backend="winograd")
    now = conv_op._prepacked(w).winograd
    assert first and now.keys() == first.keys() and all(now[m] is not first[m] for m in now)
    assert rel_err(out, _ref(x, w, b, None, True)) <= TOL


def test_unprepacked_weight_or_gradient_runs_the_cpu_backend(gen):
    x = randn(1, 16, 7, 7, gen=gen).contiguous(memory_format=CL)
    w = randn(8, 16, 3, 3, gen=gen) / 12
    out = dk.fused_conv2d(x, w, None, backend="winograd")  # not prepacked: the cpu backend runs it
    assert rel_err(out, _ref(x, w, None, None, True)) <= TOL
    wg = w.clone().requires_grad_()
    conv_op.prepack(wg)
    y = dk.fused_conv2d(x, wg, None, backend="winograd")
    y.sum().backward()
    assert wg.grad is not None and not conv_op._prepacked(wg).winograd


@pytest.mark.parametrize("what,args,why", [
    ("stride", dict(stride=2), "stride 1"),
    ("1x1", dict(kernel=1), "3x3"),
    ("padding", dict(padding=0), "padding 1"),
    ("bf16", dict(dtype=torch.bfloat16), "float32"),
    ("channels", dict(channels=4), "16 or more"),
])
def test_refuses_what_it_does_not_run_with_the_reason(what, args, why, gen):
    dtype = args.get("dtype", torch.float32)
    k = args.get("kernel", 3)
    c = args.get("channels", 16)
    x = randn(1, c, 6, 6, gen=gen, dtype=dtype)
    w = randn(4, c, k, k, gen=gen, dtype=dtype)
    with pytest.raises(dk.BackendUnavailable, match=why):
        dk.fused_conv2d(x, w, None, stride=args.get("stride", 1), padding=args.get("padding", k // 2),
                        backend="winograd")


def test_auto_verifies_and_may_choose_it(gen, monkeypatch, tmp_path):
    """auto lists winograd among the CPU candidates of a 3x3 layer, verifies it against stock
    PyTorch and takes whichever is fastest (here: forced by making it the only one of ours)."""
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(backends._OP_ORDER, ("fused_conv2d", "cpu"), ("aten",))
    backends.clear_cache()
    x, w, b = _case(gen, 1, 16, 10, 10, 16)
    why = backends.reasons("fused_conv2d", x.device, x, w, b, None, [1, 1], [1, 1], True)
    assert why["winograd"] is None
    monkeypatch.setattr(backends, "MARGIN", -10.0)  # ours always "faster": the verified plugin wins
    with torch.no_grad():
        out = dk.fused_conv2d(x, w, b)
    assert "winograd" in backends.cached_choices().values()
    assert rel_err(out, _ref(x, w, b, None, True)) <= TOL
    backends.clear_cache()


def test_compile_with_freezing_runs_the_remembered_winograd(gen, monkeypatch, tmp_path):
    """Under torch.compile with inductor's freezing a layer winograd may run is recorded as
    deeparch::fused_conv2d_frozen, whose auto choice (here winograd) runs from the compiled graph
    (one graph: fullgraph), keeping the transform of the frozen weight; NaN still comes out where
    eager puts it."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(backends._OP_ORDER, ("fused_conv2d", "cpu"), ("aten",))
    monkeypatch.setattr(backends, "MARGIN", -10.0)  # the verified winograd always wins the timing
    backends.clear_cache()
    calls = []
    real = conv_winograd.conv3x3
    monkeypatch.setattr(conv_winograd, "conv3x3", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.BatchNorm2d(24),
                                torch.nn.ReLU()).eval()
    fused = dk.fuse(model).to(memory_format=CL)
    x = randn(2, 16, 9, 8, gen=gen).contiguous(memory_format=CL)
    xn = x.clone()
    xn[1, 3, 4, 4] = float("nan")
    torch._dynamo.reset()
    with torch.no_grad():
        fused(x)  # eager: auto verifies, times and remembers winograd for this layer
        assert list(backends.cached_choices().values()) == ["winograd"]
        calls.clear()
        compiled = torch.compile(fused, fullgraph=True)
        out = compiled(x)
        assert calls  # the compiled graph ran Winograd
        assert rel_err(out, model.double()(x.double())) <= TOL
        # the frozen op's later calls run the call bound on its first, not the full dispatch
        dispatched, calls[:] = [], []
        real_choose = backends.choose
        monkeypatch.setattr(backends, "choose", lambda *a: dispatched.append(1) or real_choose(*a))
        assert torch.equal(compiled(x), out) and calls and not dispatched
        other = randn(3, 16, 9, 8, gen=gen).contiguous(memory_format=CL)  # another shape: dispatched
        assert rel_err(compiled(other), model.double()(other.double())) <= TOL and dispatched
        model.float()
        model.float()
        out_nan, want_nan = compiled(xn), model(xn)
    assert torch.equal(out_nan.isnan(), want_nan.isnan()) and bool(want_nan.isnan().any())
    torch.testing.assert_close(out_nan.nan_to_num(), want_nan.nan_to_num(), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    backends.clear_cache()


def test_compile_with_freezing_and_dynamic_shapes_after_winograd_was_chosen(gen, monkeypatch, tmp_path):
    """A dynamic batch size under freezing after winograd was chosen: the graph compiles (the
    choice is made when the op runs, not read while tracing) and gives torch's result."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(backends._OP_ORDER, ("fused_conv2d", "cpu"), ("aten",))
    monkeypatch.setattr(backends, "MARGIN", -10.0)
    backends.clear_cache()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.BatchNorm2d(24),
                                torch.nn.ReLU()).eval()
    fused = dk.fuse(model).to(memory_format=CL)
    torch._dynamo.reset()
    with torch.no_grad():
        fused(randn(2, 16, 9, 8, gen=gen).contiguous(memory_format=CL))  # remembers winograd
        compiled = torch.compile(fused, dynamic=True)
        for n in (2, 3):
            x = randn(n, 16, 9, 8, gen=gen).contiguous(memory_format=CL)
            assert rel_err(compiled(x), model.double()(x.double())) <= TOL
            model.float()
    torch._dynamo.reset()
    backends.clear_cache()


def test_a_build_without_avx2_says_so(monkeypatch):
    """An extension built for the default ISA (DEEPARCH_CPU_ISA=default) has no Winograd kernel:
    the backend says why it can't run, and auto leaves it out."""
    from deeparch_kernels import _ext

    monkeypatch.setitem(_ext._state, "info", dict(_ext._state["info"], winograd=False))
    x = torch.randn(1, 16, 6, 6)
    w = torch.randn(8, 16, 3, 3)
    why = backends.reasons("fused_conv2d", x.device, x, w, None, None, [1, 1], [1, 1], True)
    assert "AVX2" in why["winograd"]
    with pytest.raises(dk.BackendUnavailable, match="AVX2"):
        dk.fused_conv2d(x, w, None, backend="winograd")


def test_kernel_refuses_a_wrong_transform_with_a_message(gen):
    x, w, b = _case(gen, 1, 16, 6, 6, 8)
    t = conv_winograd.transform_weight(w, 4)
    with pytest.raises(RuntimeError, match="u must be the packed"):
        conv_winograd.conv3x3(x, t._replace(tile=2), b, None, True)
    with pytest.raises(RuntimeError, match="bias must be"):
        conv_winograd.conv3x3(x, t, torch.ones(3), None, True)


@pytest.mark.parametrize("m", [2, 4])
def test_kernel_op_keeps_torch_library_contracts(m, gen):
    """opcheck: schema, fake (the output's metadata, for FakeTensorMode and tracing) and the
    dispatcher; the fake's output is the kernel's, shape, strides and dtype."""
    x, w, b = _case(gen, 2, 12, 5, 7, 20)
    t = conv_winograd.transform_weight(w, m)
    r = randn(2, 20, 5, 7, gen=gen).contiguous(memory_format=CL)
    op = torch.ops.deeparch.winograd_conv3x3.default
    for args in ((x, t.u, b, r, 20, True, m, t.bound), (x, t.u, None, None, 20, False, m, t.bound)):
        torch.library.opcheck(op, args)
    y, ok = op(x, t.u, b, r, 20, True, m, t.bound)
    assert ok and rel_err(y, _ref(x, w, b, r, True)) <= TOL
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fy, fok = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                       for a in (x, t.u, b, r, 20, True, m, t.bound)))
    assert (fy.shape, fy.stride(), fy.dtype, fok) == (y.shape, y.stride(), y.dtype, True)


def test_frozen_op_rebinds_for_another_bias_input_or_weight_write(gen):
    """fused_conv2d_frozen runs its call bound on the first only for the same bias tensor and
    inputs like the first's, and while the weight is unchanged: another bias, another input
    shape or an in-place write of the weight each give torch's result."""
    x, w, b = _case(gen, 1, 16, 10, 10, 24)
    b2 = randn(24, gen=gen)
    op = torch.ops.deeparch.fused_conv2d_frozen
    with torch.no_grad():
        for xx, bb in ((x, b), (x, b), (x, b2), (x[:, :, :7], b2), (x, b2)):
            xx = xx.contiguous(memory_format=CL)
            assert rel_err(op(xx, w, bb, None, [1, 1], [1, 1], True), _ref(xx, w, bb, None, True)) <= TOL
        w.mul_(-1.5)
        assert rel_err(op(x, w, b2, None, [1, 1], [1, 1], True), _ref(x, w, b2, None, True)) <= TOL
    alive = weakref.ref(w)  # the bound call kept with the weight's derived copies does not keep it
    del w
    gc.collect()
    assert alive() is None
