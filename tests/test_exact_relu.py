"""deeparch_kernels.nn.ExactReLU: torch's ReLU in eager (bit for bit, inplace or not, hooks kept
when fuse() swaps it in) and under torch.compile with inductor's freezing, where a stock ReLU
after a bf16 Linear is folded into oneDNN's post-op and loses NaN."""
import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import deeparch_kernels as dk
from deeparch_kernels import _ext
from deeparch_kernels.nn import ExactReLU
from deeparch_kernels.nn.relu import exact_relus_after_linears
from helpers import randn


def _specials(gen, dtype=torch.float32):
    x = randn(5, 37, gen=gen, dtype=dtype)
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -float("nan")])
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("inplace", [False, True])
def test_eager_is_torch_relu_bit_for_bit(gen, dtype, inplace):
    x = _specials(gen, dtype)
    want = torch.relu(x)
    arg = x.clone()
    version = arg._version
    out = ExactReLU(inplace=inplace)(arg)
    assert (arg._version > version) == inplace  # an in-place ReLU bumps the version counter
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(torch.where(want.isnan(), 0, out).signbit(), torch.where(want.isnan(), 0, want).signbit())
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert (out is arg) == inplace
    if not inplace:
        torch.testing.assert_close(arg, x, rtol=0, atol=0, equal_nan=True)  # input untouched


def test_swapped_in_after_linears_only_keeping_hooks(gen):
    seq = nn.Sequential(nn.Linear(7, 9), nn.ReLU(inplace=True), nn.Dropout(), nn.ReLU(), nn.Linear(9, 3),
                        nn.ReLU())
    seen = []
    old = seq[1]
    old.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    assert exact_relus_after_linears(seq) == ["1", "5"]
    assert type(seq[1]) is ExactReLU and type(seq[5]) is ExactReLU and type(seq[3]) is nn.ReLU
    assert seq[1].inplace and not seq[5].inplace
    assert exact_relus_after_linears(seq) == []  # already done: nothing to swap again
    x = randn(4, 7, gen=gen)
    out = seq.eval()(x)
    assert len(seen) == 1 and bool((seen[0] >= 0).all())
    assert out.shape == (4, 3)
    gm = torch.fx.symbolic_trace(seq)  # traced as torch's relu
    torch.testing.assert_close(gm(x), out, rtol=0, atol=0)


def test_exports_with_a_dynamic_batch_keeping_nan(gen):
    """torch.export records it as torch's relu, for any batch size: the exported program gives
    eager's result, NaN where eager puts it."""
    model = nn.Sequential(nn.Linear(16, 12), ExactReLU(), nn.Linear(12, 5)).eval()
    x = randn(3, 16, gen=gen)
    x[1, 4] = float("nan")
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.ops.aten.relu.default in [n.target for n in ep.graph.nodes]
    for xx in (x, torch.cat([x, randn(4, 16, gen=gen)])):
        torch.testing.assert_close(ep.module()(xx), model(xx), rtol=0, atol=0, equal_nan=True)


def test_vgg_builders_and_fuse_use_it(gen):
    ours = dk.models.vgg11(num_classes=10)
    assert [i for i, m in enumerate(ours.classifier) if isinstance(m, ExactReLU)] == [1, 4]
    tv = torchvision.models.vgg11(num_classes=10).eval()
    fused, report = dk.fuse(tv, return_report=True)
    assert [(f.path, f.pattern) for f in report.fused if f.pattern == "Linear -> ReLU"] == [
        ("classifier.1", "Linear -> ReLU"), ("classifier.4", "Linear -> ReLU")]
    assert isinstance(fused.classifier[1], ExactReLU) and isinstance(fused.classifier[4], ExactReLU)


@pytest.mark.parametrize("dtype,dynamic", [(torch.bfloat16, False), (torch.bfloat16, True),
                                           (torch.float32, True)])
def test_compiled_linear_relu_keeps_nan(dtype, dynamic, gen, monkeypatch):
    """inductor with freezing hands a bf16 Linear (and, with a dynamic batch, an fp32 one) to
    oneDNN with the ReLU after it as a post-op, which turns NaN into 0; with ExactReLU the
    compiled model puts NaN where eager does."""
    from torch._inductor import config as inductor_config

    if _ext.cpu_reason():
        pytest.skip(f"no deeparch CPU kernels: {_ext.cpu_reason()}")
    monkeypatch.setattr(inductor_config, "freezing", True)
    x = randn(3, 64, gen=gen, dtype=dtype)
    x[1, 5] = float("nan")

    def run(relu):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), relu, nn.Linear(48, 16)).eval().to(dtype)
        torch._dynamo.reset()
        with torch.no_grad():
            return model(x), torch.compile(model, dynamic=dynamic)(x)

    want, stock = run(nn.ReLU())
    assert bool(want[1].isnan().all()) and not bool(want[0].isnan().any())
    want_ours, ours = run(ExactReLU())
    torch.testing.assert_close(want_ours, want, rtol=0, atol=0, equal_nan=True)  # eager: the same
    assert torch.equal(ours.isnan(), want.isnan())
    torch.testing.assert_close(ours.nan_to_num(), want.nan_to_num(), rtol=1.6e-2, atol=1e-2)
    if torch.equal(stock.isnan(), want.isnan()):
        pytest.skip("this torch's inductor no longer folds the ReLU into oneDNN's linear (ours is right either way)")
    torch._dynamo.reset()
