"""torch's contracts at the ops (issue 16): each test is named after the contract it keeps.

In-place writes bump the version counter and refuse overlap, as torch's own in-place ops do;
what torch accepts (broadcasting, type promotion, mixed memory formats, "same"/"valid"
padding, numpy and 0-d tensor ints, unbatched inputs, grouped and dilated convolutions,
autocast) is accepted with torch's result; the output's memory format is torch's; dynamic
shapes compile and export without specialising.
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels import backends

from helpers import backends_for, randn

CPU_BACKENDS = [b for b in ("cpu", "aten", "reference", "triton") if b in backends_for("cpu")]


# --------------------------------------------------------------------------- in-place contracts

def test_relu_inplace_op_bumps_once_keeps_nan_and_records_its_gradient():
    """deeparch::relu_ (the freezing path's opaque epilogue, ops/conv.py): torch's relu_ in
    place, one version bump per call, NaN kept, and with a gradient needed torch's own autograd."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    x = torch.tensor([-1.0, 0.5, float("nan"), -0.0, float("inf"), -float("inf")])
    want = torch.relu(x)
    v = x._version
    torch.ops.deeparch.relu_(x)
    assert x._version == v + 1
    assert torch.equal(x.isnan(), want.isnan()) and torch.equal(x.nan_to_num(), want.nan_to_num())
    leaf = torch.randn(6, requires_grad=True)
    y = leaf * 1.0
    torch.ops.deeparch.relu_(y)
    y.sum().backward()
    assert torch.equal(leaf.grad, (leaf > 0).float())
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch.ops.deeparch.relu_(leaf)
    with pytest.raises(RuntimeError, match="single memory location"):  # as x.relu_() refuses
        torch.ops.deeparch.relu_(torch.zeros(1).expand(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_relu_inplace_op_is_torchs_relu_on_every_value(dtype):
    """deeparch::relu_'s own kernels (fp16/bf16 on their bits, fp32 compares; vec_kernels.h):
    every 16-bit pattern, and fp32's specials and random bits, come out as torch.relu gives them
    -- the same bits, -0 and +-inf included, NaN where torch has NaN -- in a dense tensor (whose
    length leaves a vector tail), a channels_last one and a strided view (torch's relu_ there)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    if dtype == torch.float32:
        bits = torch.cat([torch.randint(-2**31, 2**31 - 1, (100_003,), dtype=torch.int32),
                          torch.tensor([0, -2**31, 0x7f800000, -0x800000, 0x7fc00000, -1, 1, -2**31 + 1],
                                       dtype=torch.int32)])
    else:
        bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    want = torch.relu(x)

    def same(got, want):
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        ib = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got[~nan].view(ib), want[~nan].view(ib))  # bit for bit: -0 stays -0

    for t in (x.clone(), x[1:].clone()):  # two lengths: vector tails differ
        torch.ops.deeparch.relu_(t)
        same(t, torch.relu(t.new_empty(0)) if t.numel() == 0 else want[-t.numel():])
    n = x.numel() // 64 * 64
    cl = x[:n].reshape(-1, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    torch.ops.deeparch.relu_(cl)
    same(cl.flatten(), want[:n])
    base = x.clone()
    torch.ops.deeparch.relu_(base[::3])  # strided: only the view's elements change
    same(base[::3], want[::3])
    assert torch.equal(base.view(bits.dtype)[1::3], bits[1::3])


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_add_relu_inplace_bumps_the_version_counter(backend):
    """The issue's reproducer: autograd must refuse a saved tensor overwritten in place."""
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5)
    z = (x * w).sum()  # saves x for w's gradient
    v = x._version
    dk.add_relu_(x, torch.randn(5), backend=backend)
    assert x._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


def test_fused_add_relu_module_inplace_bumps_the_version_counter():
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5)
    z = (x * w).sum()
    dk.nn.FusedAddReLU(inplace=True)(x, torch.randn(5))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


def test_add_relu_inplace_op_bumps_once_per_call():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    x = torch.randn(8)
    v = x._version
    torch.ops.deeparch.add_relu_(x, torch.randn(8))
    assert x._version == v + 1
    with torch.inference_mode():  # inference tensors keep no version counter; still runs
        y = torch.randn(8)
        torch.ops.deeparch.add_relu_(y, torch.ones(8))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_add_relu_inplace_refuses_partial_overlap(backend):
    b = torch.arange(0.0, 40.0)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        dk.add_relu_(b[1:], b[:-1], backend=backend)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        dk.add_relu_(torch.zeros(1).expand(8), torch.randn(8), backend=backend)
    x = torch.randn(16)
    want = torch.relu(x + x)
    assert torch.equal(dk.add_relu_(x, x, backend=backend), want)  # the same view: fine


def test_add_relu_inplace_refuses_overlap_on_the_fast_path_too():
    b = torch.arange(0.0, 40.0)
    dk.add_relu_(b[0:10], b[20:30])  # no overlap: remembered on the fast path
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        dk.add_relu_(b[0:10], b[5:15])  # same signatures, now overlapping


def test_add_relu_inplace_op_refuses_partial_overlap_directly():
    b = torch.arange(0.0, 40.0)
    ops = [torch.ops.deeparch.add_relu_] if "cpu" in CPU_BACKENDS else []
    if "triton" in CPU_BACKENDS:
        ops.append(torch.ops.deeparch.add_relu_triton_)
    for op in ops:
        with pytest.raises(RuntimeError, match="single memory location"):
            op(b[1:], b[:-1])


def test_add_relu_inplace_on_a_leaf_that_requires_grad_raises_like_torch():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        dk.add_relu_(x, torch.randn(4))


# --------------------------------------------------------------------------- what torch accepts

def test_add_relu_accepts_broadcast_and_promotion_like_torch(gen):
    x = randn(2, 3, 4, 5, gen=gen)
    for identity in (randn(3, 1, 1, gen=gen), randn(5, gen=gen), torch.tensor(0.5),
                     randn(2, 3, 4, 5, gen=gen, dtype=torch.float16),
                     randn(2, 3, 4, 5, gen=gen, dtype=torch.float64)):
        want = torch.relu(x + identity)
        out = dk.add_relu(x, identity)
        assert out.dtype == want.dtype and torch.equal(out, want)
    small = randn(3, 1, 1, gen=gen)  # x broadcast up
    assert torch.equal(dk.add_relu(small, x), torch.relu(small + x))


def test_add_relu_inplace_casts_back_like_out_plus_equals(gen):
    """torchvision's ``out += identity`` with fp16 out and an fp32 identity."""
    x = randn(2, 3, 4, 5, gen=gen, dtype=torch.float16)
    identity = randn(2, 3, 4, 5, gen=gen)
    want = x.clone()
    want += identity
    want = torch.relu(want)
    out = dk.add_relu_(x, identity)
    assert out is x and x.dtype == torch.float16 and torch.equal(x, want)
    with pytest.raises(ValueError, match="must fit x"):
        dk.add_relu_(randn(3, 1, gen=gen), randn(3, 4, gen=gen))
    with pytest.raises(TypeError, match="can't be cast"):
        dk.add_relu_(torch.ones(3, dtype=torch.int32), randn(3, gen=gen))


def test_add_relu_accepts_mixed_memory_formats_and_other_dtypes(gen):
    x = randn(2, 3, 4, 5, gen=gen, channels_last=True)
    y = randn(2, 3, 4, 5, gen=gen)
    out = dk.add_relu(x, y)
    assert torch.equal(out, torch.relu(x + y))
    assert out.is_contiguous(memory_format=torch.channels_last)
    ints = torch.randint(-5, 5, (7,))
    assert torch.equal(dk.add_relu(ints, ints), torch.relu(ints + ints))


def test_clear_errors_for_nested_and_sparse_tensors():
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    with pytest.raises(TypeError, match="nested tensor"):
        dk.add_relu(nested, nested)
    sparse = torch.randn(4, 4).to_sparse()
    with pytest.raises(TypeError, match="layout torch.sparse_coo"):
        dk.add_relu(sparse, sparse)
    with pytest.raises(TypeError, match="layout torch.sparse_coo"):
        dk.fused_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3).to_sparse())


def _ref_conv(x, w, b=None, r=None, stride=1, padding=0, dilation=1, groups=1, relu=True):
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


def test_conv_accepts_same_valid_and_index_like_ints(gen):
    x, b = randn(2, 3, 9, 8, gen=gen), randn(5, gen=gen)
    for k in (3, 4, (2, 5)):
        w = randn(5, 3, *((k, k) if isinstance(k, int) else k), gen=gen)
        for pad in ("same", "valid"):
            torch.testing.assert_close(dk.fused_conv2d(x, w, b, padding=pad), _ref_conv(x, w, b, padding=pad))
    w = randn(5, 3, 3, 3, gen=gen)
    for stride, pad in ((np.int64(2), np.int32(1)), (torch.tensor(2), torch.tensor(1)), ([2], (1,)),
                        ((np.int64(2), 2), [1, np.int16(1)])):
        torch.testing.assert_close(dk.fused_conv2d(x, w, b, stride=stride, padding=pad),
                                   _ref_conv(x, w, b, stride=2, padding=1))


def test_conv_accepts_unbatched_grouped_and_dilated_inputs(gen):
    x, w = randn(4, 9, 9, gen=gen), randn(6, 4, 3, 3, gen=gen)
    r = randn(6, 9, 9, gen=gen)
    torch.testing.assert_close(dk.fused_conv2d(x, w, residual=r, padding=1),
                               _ref_conv(x.unsqueeze(0), w, r=r.unsqueeze(0), padding=1).squeeze(0))
    xb = x.unsqueeze(0)
    wg = randn(6, 2, 3, 3, gen=gen)
    torch.testing.assert_close(dk.fused_conv2d(xb, wg, groups=2, padding=1), _ref_conv(xb, wg, groups=2, padding=1))
    torch.testing.assert_close(dk.fused_conv2d(xb, w, dilation=2, padding=2), _ref_conv(xb, w, dilation=2, padding=2))
    with pytest.raises(dk.BackendUnavailable, match="groups=2"):
        dk.fused_conv2d(xb, wg, groups=2, backend="cpu")


def test_conv_residual_in_another_dtype_format_or_broadcast(gen):
    x, w, b = randn(2, 3, 7, 7, gen=gen), randn(4, 3, 3, 3, gen=gen), randn(4, gen=gen)
    for r in (randn(2, 4, 7, 7, gen=gen, channels_last=True),  # mixed formats: converted
              randn(2, 4, 7, 7, gen=gen, dtype=torch.float64),  # type promotion
              randn(4, 1, 1, gen=gen),  # broadcast
              randn(2, 4, 7, 7, gen=gen, dtype=torch.float16)):
        out = dk.fused_conv2d(x, w, b, residual=r, padding=1)
        want = _ref_conv(x, w, b, r, padding=1)
        assert out.dtype == want.dtype
        torch.testing.assert_close(out, want)


def test_conv_under_autocast_casts_like_conv2d(gen):
    x, w, b = randn(2, 3, 8, 8, gen=gen), randn(4, 3, 3, 3, gen=gen), randn(4, gen=gen)
    r = randn(2, 4, 8, 8, gen=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dk.fused_conv2d(x.bfloat16(), w, b, residual=r, padding=1)  # bf16 x, fp32 weight
        want = torch.relu(F.conv2d(x.bfloat16(), w, b, 1, 1) + r)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_output_memory_format_is_torchs_for_ambiguous_strides(backend, gen):
    if backend == "triton":
        pytest.skip("covered by the kernel tests (slow in the interpreter)")
    x = randn(2, 7, 7, 1, gen=gen).permute(0, 2, 1, 3)  # the ambiguous layout
    w = randn(3, 7, 1, 1, gen=gen)
    out = dk.fused_conv2d(x, w, padding=0, backend=backend)
    want = F.conv2d(x, w)
    assert out.stride() == want.stride(), (out.stride(), want.stride())
    for xs in (randn(2, 1, 5, 5, gen=gen), randn(1, 3, 1, 1, gen=gen)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            xx = xs.contiguous(memory_format=fmt)
            ww = randn(4, xs.shape[1], 1, 1, gen=gen).contiguous(memory_format=fmt)
            assert dk.fused_conv2d(xx, ww, padding=0, backend=backend).stride() == F.conv2d(xx, ww).stride()


# --------------------------------------------------------------------------- dynamic shapes

def _conv_fn(x, w, b, r):
    return dk.fused_conv2d(x, w, b, residual=r, padding=1)


def _add_fn(x, y):
    return dk.add_relu(x, y) * 2


def test_compile_dynamic_fullgraph_does_not_recompile(gen):
    w, b = randn(4, 3, 3, 3, gen=gen), randn(4, gen=gen)
    conv = torch.compile(_conv_fn, dynamic=True, fullgraph=True)
    add = torch.compile(_add_fn, dynamic=True, fullgraph=True)
    sizes = (2, 3, 5)
    for i, n in enumerate(sizes):
        x, r = randn(n, 3, 6 + i, 7, gen=gen), randn(n, 4, 6 + i, 7, gen=gen)
        ctx = torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext()
        with ctx:
            torch.testing.assert_close(conv(x, w, b, r), _ref_conv(x, w, b, r, padding=1))
            torch.testing.assert_close(add(x, x), torch.relu(x + x) * 2)


def test_export_with_a_dynamic_batch(gen):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(randn(4, 3, 3, 3, gen=gen))

        def forward(self, x, r):
            return dk.add_relu(dk.fused_conv2d(x, self.w, residual=r, padding=1), r)

    batch = torch.export.Dim("batch", min=1, max=64)
    x, r = randn(2, 3, 6, 6, gen=gen), randn(2, 4, 6, 6, gen=gen)
    m = M()
    ep = torch.export.export(m, (x, r), dynamic_shapes={"x": {0: batch}, "r": {0: batch}})
    for n in (1, 5):
        xn, rn = randn(n, 3, 6, 6, gen=gen), randn(n, 4, 6, 6, gen=gen)
        torch.testing.assert_close(ep.module()(xn, rn), m(xn, rn))
        want = torch.relu(torch.relu(F.conv2d(xn, m.w, None, 1, 1) + rn) + rn)
        torch.testing.assert_close(ep.module()(xn, rn), want)


def test_compiled_conv_keeps_nan_like_torch(gen):
    x, w = randn(1, 3, 6, 6, gen=gen), randn(4, 3, 3, 3, gen=gen)
    x[0, 0, 2, 2] = float("nan")
    out = torch.compile(_conv_fn, fullgraph=True)(x, w, None, None)
    want = _ref_conv(x, w, padding=1)
    assert torch.equal(out.isnan(), want.isnan()) and bool(want.isnan().any())
    y = randn(4, 4, gen=gen)
    y[1, 1] = float("nan")
    out = torch.compile(_add_fn, fullgraph=True)(y, y)
    assert torch.equal(out.isnan(), (torch.relu(y + y) * 2).isnan())


def test_fx_symbolic_trace_records_one_node_per_op(gen):
    class M(torch.nn.Module):
        def forward(self, x, w, r):
            return dk.add_relu(dk.fused_conv2d(x, w, padding=1), r)

    gm = torch.fx.symbolic_trace(M())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [dk.fused_conv2d, dk.add_relu]
    x, w, r = randn(1, 3, 5, 5, gen=gen), randn(4, 3, 3, 3, gen=gen), randn(1, 4, 5, 5, gen=gen)
    torch.testing.assert_close(gm(x, w, r), M()(x, w, r))


def test_auto_choice_cache_is_bounded(monkeypatch, gen):
    monkeypatch.setattr(backends, "_CHOICES_MAX", 16)
    backends.clear_cache()
    for n in range(1, 40):
        dk.add_relu(randn(n, gen=gen), randn(n, gen=gen))
    assert len(backends.cached_choices()) <= 16
    backends.clear_cache()
