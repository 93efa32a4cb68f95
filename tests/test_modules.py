"""deeparch_kernels.nn: the fused modules against the torch/torchvision modules they replace --
outputs, every gradient, BatchNorm running statistics, state_dicts, the eval-mode fold cache,
memory formats, backends."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

import deeparch_kernels as dk
from deeparch_kernels.nn import (FusedBasicBlock, FusedBottleneck, FusedConvAddReLU2d,
                                 FusedConvReLU2d, FusedSequential, fold_conv_bn, get_backends,
                                 set_backend)
from helpers import randn, rel_err

TOL32 = 1e-5  # fp32 against fp32 torch; a fold changes rounding only


def _randomize(module, gen):
    """Random conv/BN parameters and BN running statistics (not the defaults 0/1)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return module


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(a, b, tol=TOL32):
    assert a.keys() == b.keys()
    for n in a:
        assert rel_err(a[n], b[n]) <= tol, (n, rel_err(a[n], b[n]))


def _train_step_compare(ours, ref, x, tol=TOL32):
    """One train-mode forward/backward in both: outputs, all gradients, BN running stats."""
    ours.train(), ref.train()
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = ours(xo), ref(xr)
    assert rel_err(out, want) <= tol
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert rel_err(xo.grad, xr.grad) <= tol
    _assert_grads_close(_grads(ours), _grads(ref), tol)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), k


# --------------------------------------------------------------------------- FusedConvReLU2d

@pytest.mark.parametrize("backend", ["cpu", "aten", "reference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_relu_matches_conv2d_relu(backend, channels_last, gen):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    fused = FusedConvReLU2d(5, 7, 3, stride=2, padding=1, backend=backend)
    fused.load_state_dict(conv.state_dict())
    assert list(fused.state_dict()) == ["weight", "bias"]
    x = randn(2, 5, 9, 11, gen=gen, channels_last=channels_last)
    res = randn(2, 7, 5, 6, gen=gen, channels_last=channels_last)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = fused(xo, res), torch.relu(conv(xr) + res)
    assert out.stride() == want.stride()
    assert rel_err(out, want) <= TOL32
    out.sum().backward(), want.sum().backward()
    assert rel_err(xo.grad, xr.grad) <= TOL32
    assert rel_err(fused.weight.grad, conv.weight.grad) <= TOL32
    assert rel_err(fused.bias.grad, conv.bias.grad) <= TOL32
    plain = FusedConvReLU2d(5, 7, 3, padding=1, bias=False, relu=False, backend=backend)
    assert rel_err(plain(x), F.conv2d(x, plain.weight, None, 1, 1)) <= TOL32
    assert (plain(x) < 0).any()  # relu=False really leaves the negatives


def test_conv_add_relu_signature_and_same_padding(gen):
    m = FusedConvAddReLU2d(4, 4, 3, padding="same")
    x, r = randn(1, 4, 6, 6, gen=gen), randn(1, 4, 6, 6, gen=gen)
    assert rel_err(m(x, r), torch.relu(F.conv2d(x, m.weight, m.bias, padding=1) + r)) <= TOL32
    with pytest.raises(TypeError):
        m(x)  # the residual is required, as in torch.ao's ConvAddReLU2d


def test_from_conv_shares_parameters_and_folds_bn(gen):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), _randomize(nn.BatchNorm2d(6), gen)
    f = FusedConvReLU2d.from_conv(conv, backend="aten")
    assert f.weight is conv.weight and f.bias is conv.bias and f.backend == "aten"
    x = randn(2, 3, 8, 8, gen=gen)
    with pytest.raises(ValueError, match="eval mode"):
        FusedConvReLU2d.from_conv(conv, bn)  # training: BN can't be folded
    conv.eval(), bn.eval()
    folded = FusedConvReLU2d.from_conv(conv, bn)
    assert not folded.training
    ref = fuse_conv_bn_eval(conv, bn)  # torch's own fold
    assert torch.equal(folded.weight, ref.weight) and torch.equal(folded.bias, ref.bias)
    with torch.no_grad():
        assert rel_err(folded(x), torch.relu(bn(conv(x)))) <= TOL32


@pytest.mark.parametrize("kwargs,match", [({"groups": 2}, "groups=2"), ({"dilation": 2}, "dilation"),
                                          ({"padding_mode": "reflect"}, "padding_mode")])
def test_unsupported_convs_refused(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        FusedConvReLU2d(4, 4, 3, padding=1, **kwargs)
    with pytest.raises(NotImplementedError, match=match):
        FusedConvReLU2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, **kwargs))


def test_unknown_backend_name_refused_at_construction():
    with pytest.raises(ValueError, match="unknown backend"):
        FusedConvReLU2d(3, 3, 1, backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        FusedBasicBlock(8, 8, backend="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_raises_at_forward(gen):
    block = FusedBasicBlock(8, 8, backend="cuda")  # a known name: accepted at construction
    x = randn(1, 8, 4, 4, gen=gen)
    with pytest.raises(dk.BackendUnavailable, match="'cuda' backend runs CUDA tensors"):
        block(x)  # training: the fused add+ReLU
    block.eval()
    with torch.no_grad(), pytest.raises(dk.BackendUnavailable, match="CUDA tensors"):
        block(x)  # eval: the fused convolutions


# --------------------------------------------------------------------------- FusedSequential

def _conv_bn_relu_seq():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))


def test_fused_sequential_eval_and_train(gen):
    torch.manual_seed(0)
    ref = _randomize(_conv_bn_relu_seq(), gen)
    ours = FusedSequential.from_sequential(copy.deepcopy(ref), backend="cpu")
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = randn(2, 3, 10, 10, gen=gen)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= TOL32
    assert set(ours._fold_cache.keys()) == {"0", "7"}  # not the groups=2 conv
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]  # no fold buffers
    _train_step_compare(ours, ref, x)
    assert not set(ours._fold_cache.keys())  # dropped in training
    ours.eval(), ref.eval()  # the step changed the parameters and statistics: refolded
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= TOL32
    assert list(ours[0:3].state_dict()) == list(ref[0:3].state_dict())
    assert ours[0:3].backend == "cpu"


# --------------------------------------------------------------------------- blocks

def _block_pair(kind, gen, stride=2, **kw):
    torch.manual_seed(0)
    tv_cls, ours_cls = (BasicBlock, FusedBasicBlock) if kind == "basic" else (Bottleneck, FusedBottleneck)
    inplanes, planes = 16, 8
    out = planes * tv_cls.expansion
    ds = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)) \
        if stride != 1 or inplanes != out else None
    ref = _randomize(tv_cls(inplanes, planes, stride, ds, **kw), gen)
    ours = ours_cls(inplanes, planes, stride, copy.deepcopy(ds), **kw)
    ours.load_state_dict(ref.state_dict())  # strict: same names
    return ours, ref


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("stride", [1, 2])
def test_block_matches_torchvision(kind, stride, gen):
    ours, ref = _block_pair(kind, gen, stride)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = randn(2, 16, 9, 9, gen=gen)
    _train_step_compare(ours, ref, x)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= TOL32
    # eval mode with autograd: BN unfolded, gradients reach every parameter as in torchvision
    for m in (ours, ref):
        m.zero_grad()
    g = torch.randn_like(ref(x))
    (ours(x) * g).sum().backward(), (ref(x) * g).sum().backward()
    _assert_grads_close(_grads(ours), _grads(ref))


def test_block_eval_runs_fused_convs(gen, monkeypatch):
    """In eval mode under no_grad the block is 2 (+1 downsample) fused_conv2d calls, the last with
    the residual and the ReLU; in training, one fused add+ReLU."""
    ours, _ = _block_pair("basic", gen, stride=2)
    calls = []
    import deeparch_kernels.nn.common as mod  # where the modules call fused_conv2d and add_relu
    real_conv, real_add = mod.fused_conv2d, mod.add_relu

    def conv(*a, **k):
        calls.append(("conv", k["residual"] is not None, k["relu"]))
        return real_conv(*a, **k)

    def add(*a, **k):
        calls.append(("add_relu",))
        return real_add(*a, **k)

    monkeypatch.setattr(mod, "fused_conv2d", conv)
    monkeypatch.setattr(mod, "add_relu", add)
    x = randn(2, 16, 8, 8, gen=gen)
    ours.eval()
    with torch.no_grad():
        ours(x)
    assert sorted(calls) == sorted([("conv", False, False), ("conv", False, True), ("conv", True, True)])
    calls.clear()
    ours.train()
    ours(x)
    assert calls == [("add_relu",)]


def test_bottleneck_with_groups_and_dilation_falls_back(gen):
    ours, ref = _block_pair("bottleneck", gen, stride=1, groups=2, base_width=64, dilation=2)
    assert ours.conv2.groups == 2 and ours.conv2.dilation == (2, 2)
    x = randn(2, 16, 8, 8, gen=gen)
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= TOL32
    _train_step_compare(ours, ref, x)


@pytest.mark.parametrize("model_format,input_format", [("nhwc", "nhwc"), ("nhwc", "nchw"), ("nchw", "nhwc")])
def test_block_memory_formats(model_format, input_format, gen):
    ours, ref = _block_pair("bottleneck", gen, stride=2)
    if model_format == "nhwc":
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    x = randn(2, 16, 8, 8, gen=gen, channels_last=input_format == "nhwc")
    ours.eval(), ref.eval()
    with torch.no_grad():
        out, want = ours(x), ref(x)
    assert rel_err(out, want) <= TOL32
    cl = torch.channels_last
    assert out.is_contiguous(memory_format=cl) == want.is_contiguous(memory_format=cl)
    _train_step_compare(ours, ref, x)


# --------------------------------------------------------------------------- the fold cache

def test_fold_is_torchs_and_stays_out_of_the_state_dict(gen):
    ours, ref = _block_pair("basic", gen)
    ours.eval()
    w, b = fold_conv_bn(ours.conv1, ours.bn1)
    conv = fuse_conv_bn_eval(ours.conv1, ours.bn1)
    assert rel_err(w, conv.weight) <= 1e-6 and rel_err(b, conv.bias) <= 1e-6
    with torch.no_grad():
        ours(randn(1, 16, 5, 5, gen=gen))
        cw, cb = ours._fold_cache.get("conv1", ours.conv1, ours.bn1, ours.conv1.weight)
    assert torch.equal(cw, w) and torch.equal(cb, b)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # strict, both ways
    ours.load_state_dict(ref.state_dict())


def test_fold_cache_follows_parameter_changes(gen):
    ours, ref = _block_pair("basic", gen)
    ours.eval(), ref.eval()
    x = randn(2, 16, 8, 8, gen=gen)
    with torch.no_grad():
        ours(x)
        # in-place updates of a conv weight and of BN statistics
        for m in (ours, ref):
            m.conv2.weight.mul_(1.5)
            m.bn1.running_var.add_(0.3)
        assert rel_err(ours(x), ref(x)) <= TOL32
        # load_state_dict of new weights
        _randomize(ref, torch.Generator().manual_seed(7))
        ours.load_state_dict(ref.state_dict())
        assert rel_err(ours(x), ref(x)) <= TOL32
        # a replaced parameter
        for m in (ours, ref):
            m.bn2.weight = nn.Parameter(m.bn2.weight * 0.5)
        assert rel_err(ours(x), ref(x)) <= TOL32
        # a deep copy, and a dtype change
        c = copy.deepcopy(ours)
        assert rel_err(c(x), ref(x)) <= TOL32
        c = c.to(torch.bfloat16)
        assert rel_err(c(x.bfloat16()), ref(x)) <= 3e-2


def test_inference_mode_fold_usable_outside(gen):
    ours, ref = _block_pair("basic", gen)
    ours.eval(), ref.eval()
    x = randn(2, 16, 8, 8, gen=gen)
    with torch.inference_mode():
        assert rel_err(ours(x), ref(x)) <= TOL32
    ours.requires_grad_(False), ref.requires_grad_(False)  # frozen: the folded path, with x's grad
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xo).sum().backward(), ref(xr).sum().backward()
    assert rel_err(xo.grad, xr.grad) <= TOL32


def test_frozen_batchnorm_in_training(gen):
    """Fine-tuning with BN frozen in eval mode while the block trains."""
    ours, ref = _block_pair("bottleneck", gen)
    ours.train(), ref.train()
    for m in (ours, ref):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    x = randn(2, 16, 8, 8, gen=gen)
    g = torch.randn_like(ref(x))
    (ours(x) * g).sum().backward(), (ref(x) * g).sum().backward()
    assert rel_err(ours(x), ref(x)) <= TOL32
    _assert_grads_close(_grads(ours), _grads(ref))


def test_autocast_bf16_cpu(gen):
    ours, ref = _block_pair("basic", gen)
    ours.eval(), ref.eval()
    x = randn(2, 16, 8, 8, gen=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    with torch.no_grad():
        want = ref(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, want) <= 3e-2


# --------------------------------------------------------------------------- backends

def test_set_backend_and_backend_results_agree(gen):
    torch.manual_seed(0)
    model = nn.Sequential(FusedConvReLU2d(3, 16, 3, padding=1),
                          FusedBasicBlock(16, 16), FusedBottleneck(16, 4))
    _randomize(model, gen).eval()
    x = randn(2, 3, 8, 8, gen=gen)
    outs = {}
    for b in ("reference", "cpu", "aten"):
        set_backend(model, b)
        assert set(get_backends(model).values()) == {b}
        with torch.no_grad():
            outs[b] = model(x)
    assert rel_err(outs["cpu"], outs["reference"]) <= TOL32
    assert rel_err(outs["aten"], outs["reference"]) <= TOL32
    with pytest.raises(ValueError):
        set_backend(model, "nope")
