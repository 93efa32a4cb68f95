"""The cpu backend's oneDNN-prepacked weights (issue 13): same results as torch, NaN kept, a
write through the weight seen, the fused modules' folds prepacked and dropped with the fold;
under torch.compile with inductor's freezing the epilogue stays NaN-exact."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import deeparch_kernels as dk
from deeparch_kernels.ops import conv as conv_op

from helpers import backends_for, randn

pytestmark = pytest.mark.skipif("cpu" not in backends_for("cpu") or not torch.backends.mkldnn.is_available(),
                                reason="needs the C++ extension and oneDNN")


def _ref(x, w, b, r, stride, padding, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    if r is not None:
        y = y + r.double()
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("oneDNN_bf16", [True, False], ids=["this-cpu", "no-oneDNN-bf16"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_prepacked_conv_matches_float64(dtype, tol, residual, relu, oneDNN_bf16, gen, monkeypatch):
    """bfloat16 is prepacked only where oneDNN's bf16 path exists (AVX512BW/VL/DQ or
    AVX-NE-CONVERT); elsewhere (an AVX2-only CPU, simulated by "no-oneDNN-bf16") the weight is
    left alone and the C++ op runs it, with the same result."""
    if not oneDNN_bf16:
        monkeypatch.setattr(conv_op, "_prepack_dtypes", lambda: (torch.float32,))
    packs = dtype in conv_op._prepack_dtypes()
    cl = torch.channels_last
    x = randn(2, 16, 11, 9, gen=gen, dtype=dtype).contiguous(memory_format=cl)
    w = (randn(24, 16, 3, 3, gen=gen) / 12).to(dtype)
    b = randn(24, gen=gen, dtype=dtype)
    r = randn(2, 24, 6, 5, gen=gen, dtype=dtype).contiguous(memory_format=cl) if residual else None
    x[0, 3, 4, 4] = float("nan")
    conv_op.prepack(w)
    with torch.no_grad():
        out = conv_op._cpu(x, w, b, r, [2, 2], [1, 1], relu)
    assert bool(conv_op._prepacked(w).by_geometry) == packs, "prepacked path taken where it can't run, or not taken"
    want = _ref(x, w, b, r, 2, 1, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=cl)
    assert torch.equal(out.isnan(), want.isnan()) and bool(want.isnan().any())
    fin = want.isfinite()
    err = (out.double() - want)[fin].abs().max() / want[fin].abs().max()
    assert err < tol
    assert conv_op._check(out, x, w, b, r, [2, 2], [1, 1], relu) is None


def test_a_write_through_the_weight_repacks(gen):
    cl = torch.channels_last
    x = randn(1, 8, 7, 7, gen=gen).contiguous(memory_format=cl)
    w = randn(8, 8, 3, 3, gen=gen)
    conv_op.prepack(w)
    with torch.no_grad():
        conv_op._cpu(x, w, None, None, [1, 1], [1, 1], False)
        w.mul_(2)  # an optimizer step, load_state_dict, ...: bumps the version counter
        out = conv_op._cpu(x, w, None, None, [1, 1], [1, 1], False)
    torch.testing.assert_close(out, F.conv2d(x, w, None, 1, 1))


def test_prepacked_copies_go_with_the_weight(gen):
    w = randn(4, 3, 3, 3, gen=gen)
    conv_op.prepack(w)
    n = len(conv_op._PACKED)
    del w
    assert len(conv_op._PACKED) == n - 1
    w = randn(4, 3, 3, 3, gen=gen)
    conv_op.prepack(w)
    conv_op.forget_prepacked(w)
    assert conv_op._prepacked(w) is None


def test_gradients_and_nchw_take_the_plain_op(gen):
    x = randn(1, 3, 6, 6, gen=gen)  # NCHW: the output is NCHW, not what oneDNN's packed op gives
    w = randn(4, 3, 3, 3, gen=gen)
    conv_op.prepack(w)
    with torch.no_grad():
        out = conv_op._cpu(x, w, None, None, [1, 1], [1, 1], True)
    assert out.is_contiguous() and not conv_op._prepacked(w).by_geometry
    wg = w.clone().requires_grad_()
    conv_op.prepack(wg)
    y = conv_op._cpu(x.contiguous(memory_format=torch.channels_last), wg, None, None, [1, 1], [1, 1], True)
    y.sum().backward()
    assert wg.grad is not None and not conv_op._prepacked(wg).by_geometry


def test_fused_resnet_prepacks_its_folds_on_the_cpu(gen):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last)
    fused = dk.fuse(tv).eval()
    x = randn(1, 3, 64, 64, gen=gen).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-4, atol=1e-4)
    keys = list(fused.layer1[0]._fold_cache.keys())
    assert keys and all(conv_op._prepacked(fused.layer1[0]._fold_cache._folds[k].weight) is not None for k in keys)


def test_fuse_inside_inference_mode_keeps_its_folds(gen):
    """fuse() called inside torch.inference_mode() still gives a model whose folds and prepacked
    weights are kept between calls (its deep copy is made outside: inference tensors keep no
    version counter)."""
    import warnings
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last)
    x = randn(1, 3, 64, 64, gen=gen).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "inference tensor" warning
        fused = dk.fuse(tv, backend="cpu")
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-4, atol=1e-4)
        folds = dict(fused.layer1[0]._fold_cache._folds)
        packed = {k: conv_op._prepacked(f.weight) for k, f in folds.items()}
        assert folds and all(p is not None and p.by_geometry for p in packed.values())
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-4, atol=1e-4)
    assert all(fused.layer1[0]._fold_cache._folds[k] is f for k, f in folds.items())  # kept


def test_inference_tensor_weights_warn_and_stay_right(gen):
    """A model built inside inference_mode holds inference tensors (no version counter), and
    fuse(inplace=True) keeps them: nothing can be cached; the result is still right and a warning
    says why it is slow and what to do."""
    torch.manual_seed(0)
    x = randn(1, 3, 64, 64, gen=gen).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        tv = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last)
        want = tv(x)
        fused = dk.fuse(tv, backend="cpu", inplace=True)
        with pytest.warns(RuntimeWarning, match="inference_mode"):
            torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4)
    assert not fused.layer1[0]._fold_cache._folds


def test_compile_with_freezing_keeps_nan(gen, monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    torch.manual_seed(0)
    block = dk.nn.FusedBasicBlock(8, 8).eval().to(memory_format=torch.channels_last)
    x = randn(1, 8, 6, 6, gen=gen).contiguous(memory_format=torch.channels_last)
    x[0, 2, 3, 3] = float("nan")
    with torch.no_grad():
        want = block(x)
        out = torch.compile(block)(x)
    assert torch.equal(out.isnan(), want.isnan()) and bool(want.isnan().any())
    torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-4)


def test_freezing_epilogue_compiles_with_dynamic_shapes_and_exports(gen, monkeypatch):
    """The freezing path's epilogue (a stock add, then deeparch::relu_ in place on the
    convolution's fresh output) under torch.compile with a dynamic batch size and under
    torch.export: torch's values, NaN where eager puts it."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    torch.manual_seed(0)
    block = dk.nn.FusedBasicBlock(8, 8).eval().to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(block, dynamic=True)
    with torch.no_grad():
        for n in (2, 3):
            x = randn(n, 8, 6, 5, gen=gen).contiguous(memory_format=torch.channels_last)
            x[n - 1, 2, 3, 3] = float("nan")
            want, out = block(x), compiled(x)
            assert torch.equal(out.isnan(), want.isnan()) and bool(want.isnan().any())
            torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-4)
        exported = torch.export.export(block, (x,)).module()
        out = exported(x)
    assert torch.equal(out.isnan(), want.isnan())
    torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_a_fold_keeps_its_call_bound_and_drops_it_when_anything_differs(gen, monkeypatch):
    """After an eager inference call, each fold keeps its fused_conv2d call bound
    (ops/conv.py BoundConv: the fast path's per-call work done once, oneDNN on the prepacked
    weight). Later calls with inputs like the first take it and give the full path's result bit
    for bit, NaN included; a call unlike the bound one (another shape, other arguments, autocast,
    a gradient needed, auto's choices forgotten, oneDNN off) takes the full path."""
    cl = torch.channels_last
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=cl)
    block = dk.fuse(tv, backend="cpu").layer2[0]  # conv1 stride 2, conv2 + residual, downsample
    x = randn(2, 64, 15, 13, gen=gen).contiguous(memory_format=cl)
    x[1, 5, 3, 3] = float("nan")
    with torch.inference_mode():
        want = block(x)  # the full path, which binds
        folds = block._fold_cache._folds
        assert set(folds) == {"conv1", "conv2", "downsample"}
        runs = []
        for k, f in folds.items():
            assert f.bound is not None, k
            f.bound.run = (lambda run, k: lambda *a: runs.append(k) or run(*a))(f.bound.run, k)
        packed_runs = []
        run_prepacked = conv_op._run_prepacked
        monkeypatch.setattr(conv_op, "_run_prepacked",
                            lambda *a: packed_runs.append(a[1]) or run_prepacked(*a))
        got = block(x)
        assert sorted(runs) == ["conv1", "conv2", "downsample"]
        assert len(packed_runs) == 3 and all(p.is_mkldnn for p in packed_runs)  # oneDNN's packing
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got, tv.layer2[0](x), rtol=1e-4, atol=1e-4, equal_nan=True)
        assert got[1].isnan().any() and not got[0].isnan().any()
        runs.clear()
        x3 = randn(3, 64, 15, 13, gen=gen).contiguous(memory_format=cl)
        torch.testing.assert_close(block(x3), tv.layer2[0](x3), rtol=1e-4, atol=1e-4)
        assert not runs  # another batch: the full path (and the folds now bind to it)
    bound = folds["conv1"].bound
    s, p = (2, 2), (1, 1)
    assert bound.matches(x3, None, s, p, True, "cpu")
    assert not bound.matches(x3, None, (1, 1), p, True, "cpu")
    assert not bound.matches(x3, None, s, p, False, "cpu")
    assert not bound.matches(x3, None, s, p, True, "aten")
    assert not bound.matches(x3.contiguous(), None, s, p, True, "cpu")
    assert not bound.matches(x3, x3, s, p, True, "cpu")
    assert not bound.matches(x3.clone().requires_grad_(), None, s, p, True, "cpu")
    with torch.no_grad():
        assert bound.matches(x3.clone().requires_grad_(), None, s, p, True, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not bound.matches(x3, None, s, p, True, "cpu")
    with torch.backends.mkldnn.flags(enabled=False):
        assert not bound.matches(x3, None, s, p, True, "cpu")
    dk.backends.clear_cache()
    assert not bound.matches(x3, None, s, p, True, "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(block(x3), tv.layer2[0](x3), rtol=1e-4, atol=1e-4)
    assert folds["conv1"].bound is not bound and folds["conv1"].bound.matches(x3, None, s, p, True, "cpu")


def test_a_bound_call_sees_stride_edits(gen):
    """A conv's stride edited after its fold was bound (replaced, or a list edited in place) is
    what the next call runs, as with torch's modules."""
    cl = torch.channels_last
    torch.manual_seed(0)
    seq = dk.nn.FusedSequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU()).eval()
    x = randn(1, 8, 9, 11, gen=gen).contiguous(memory_format=cl)

    def check():
        torch.testing.assert_close(seq(x), torch.relu(seq[1](seq[0](x))), rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        check(), check()
        assert seq._fold_cache._folds["0"].bound is not None
        seq[0].stride = [1, 1]
        check()
        seq[0].stride[0] = 2
        check()
        seq[0].stride = (1, 2)
        check(), check()
