"""torch's contracts kept by the fused modules and fuse() (issue 16, the module half): BatchNorm
folds as fresh as torch's modules (AdaBN, ``.data`` edits, EMA, torch.compile), hooks,
parametrizations, torch.fx and torchvision's feature extraction, TorchScript refused with what to
use instead, clear errors. The reference is the torch/torchvision module in float64, unless the
module can't be converted (hook-based parametrizations can't be deep-copied), then in fp32."""
import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune as prune
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock

from deeparch_kernels import models
from deeparch_kernels._precision import no_tf32
from deeparch_kernels.fuse import fuse
from deeparch_kernels.models import FusedResNet
from deeparch_kernels.nn import (ConvBNFolding, FoldCache, FusedAddReLU, FusedBasicBlock,
                                 FusedConvAddReLU2d, FusedConvReLU2d, FusedSequential, set_backend)
from deeparch_kernels.nn import common as nn_common, folding as nn_folding
from deeparch_kernels.verify import MODEL_NAMES, randomize_batchnorm
from helpers import TOL as TOL_BY_DTYPE, rel_err

TOL = 1e-4  # an fp32 fused model against the float64 torch model (a few dozen layers)
TOL_SAME = 1e-5  # small fp32 modules against the same fp32 torch modules (folding rounds only)


def _tv(name="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    m = getattr(torchvision.models, name)(num_classes=10, **kw)
    return randomize_batchnorm(m, torch.Generator().manual_seed(seed)).eval()


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_matches_f64(fused, ref, x, tol=TOL):
    """fused(x) against ref as it stands now, evaluated in float64."""
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        out, want = fused(x), ref64(x.double())
    assert rel_err(out, want) <= tol, rel_err(out, want)


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _adapt_bn(model, x):
    """AdaBN / test-time adaptation: the BatchNorm layers alone in train mode for one batch."""
    for bn in _bns(model):
        bn.train()
    with torch.no_grad():
        model(x)
    for bn in _bns(model):
        bn.eval()


def _tiny_resnet(seed=0):
    torch.manual_seed(seed)
    m = FusedResNet(FusedBasicBlock, [1, 1, 1, 1], num_classes=10, backend="cpu")
    return randomize_batchnorm(m, torch.Generator().manual_seed(seed)).eval()


def _tv_twin(fused_resnet):
    """torchvision's ResNet with the same architecture and state."""
    tv = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    tv.load_state_dict(fused_resnet.state_dict())
    return tv.train(fused_resnet.training)


# --------------------------------------------------------------------------- item 3: fresh folds

def test_fold_sees_adabn_running_stats():
    """Running statistics updated by BatchNorm layers put in train mode and back (no version
    counter is bumped on running_mean/var): the issue's 0.79 relative error."""
    tv = _tv("resnet18")
    fused = fuse(tv)
    x = _x(2, 3, 32, 32)
    _assert_matches_f64(fused, tv, x)  # folds cached
    shifted = _x(8, 3, 32, 32, seed=1) * 2 + 1
    for m in (tv, fused):
        _adapt_bn(m, shifted)
    _assert_matches_f64(fused, tv, x)
    for m in (tv, fused):  # momentum=None: the cumulative average
        for bn in _bns(m):
            bn.momentum = None
            bn.reset_running_stats()
        _adapt_bn(m, shifted)
    _assert_matches_f64(fused, tv, x)


def test_fold_sees_data_edits_of_batchnorm():
    """An EMA of weights written through ``.data`` (its own version counter) into BatchNorm's
    parameters and buffers: the issue's 0.26 relative error."""
    tv, teacher = _tv("resnet18", seed=0), _tv("resnet18", seed=1)
    fused = fuse(tv)
    x = _x(2, 3, 32, 32)
    _assert_matches_f64(fused, tv, x)
    for m in (tv, fused):
        for bn, src in zip(_bns(m), _bns(teacher)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).data.mul_(0.5).add_(getattr(src, name).data, alpha=0.5)
    _assert_matches_f64(fused, tv, x)


@pytest.mark.parametrize("what", ["running_mean", "running_var", "weight", "bias", "conv_bias",
                                  "eps", "dtype"])
def test_fold_sees_each_batchnorm_input_on_its_own(what):
    """The CPU fold is kept while each thing it is made from is unchanged by value: an edit of
    any one of them alone (through ``.data``, no version counter bumped), BatchNorm's eps, or a
    BatchNorm buffer replaced by one of the same values in another dtype, is seen at the next
    call, inside inference_mode too."""
    torch.manual_seed(3)
    seq = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    randomize_batchnorm(seq, torch.Generator().manual_seed(4)).eval()
    fused = FusedSequential.from_sequential(copy.deepcopy(seq))
    x = _x(2, 5, 7, 9, seed=5)
    with torch.inference_mode():
        _assert_matches_f64(fused, seq, x, TOL_SAME)
        keys = list(fused._fold_cache.keys())
        for m in (seq, fused):
            conv, bn = m[0], m[1]
            if what == "eps":
                bn.eps = 0.5
            elif what == "dtype":
                bn.running_var = bn.running_var.double() * 0 + 2.0 ** -20  # exact in fp32 too
            else:
                t = conv.bias if what == "conv_bias" else getattr(bn, what)
                t.data.mul_(1.5 if what == "running_var" else -1.5).add_(0.25)
        _assert_matches_f64(fused, seq, x, TOL_SAME)
        assert list(fused._fold_cache.keys()) == keys  # refolded, not dropped


def test_fold_value_check_compares_bytes_in_one_call():
    """The CPU fold check's C++ comparison (csrc/module.cpp same_bits, via nn/folding.py
    _same_values): pairwise None and None or equal bytes; a dtype, shape, device or layout that
    differs, a non-contiguous tensor, -0 against +0 all say "changed" (a refold, never a stale
    fold); equal NaN bytes say "same" (the fold made from them stands); non-tensors raise."""
    from deeparch_kernels import _ext

    same = _ext.same_bits()
    if same is None:
        pytest.skip("C++ extension not built")
    a = torch.tensor([1.0, float("nan"), -2.0])
    assert same((a, None), (a.clone(), None)) and same((), ())
    assert not same((a,), (None,)) and not same((None,), (a,)) and not same((a,), (a, a))
    assert not same((a,), (a.double(),)) and not same((a,), (a[:2].clone(),))
    assert not same((a,), (torch.tensor([1.0, float("nan"), 2.0]),))
    assert not same((torch.tensor([0.0]),), (torch.tensor([-0.0]),))
    b = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert not same((b.t().contiguous(),), (b.t(),))  # same values, not contiguous
    with pytest.raises(TypeError):
        same((1.0,), (1.0,))
    x = _x(1, 5, 6, 6, seed=1)  # and through a module: a NaN running_var keeps its fold
    seq = nn.Sequential(nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6)).eval()
    seq[1].running_var[2] = float("nan")
    fused = FusedSequential.from_sequential(copy.deepcopy(seq))
    with torch.no_grad():
        out = fused(x)
        fold = next(iter(fused._fold_cache._folds.values()))
        out2 = fused(x)
    assert next(iter(fused._fold_cache._folds.values())) is fold
    assert torch.equal(out.isnan(), seq(x).isnan()) and torch.equal(out2.isnan(), out.isnan())


def test_fold_sees_conv_weight_updates():
    """conv.weight changed in place under no_grad, by an optimizer, by torch's EMA
    (AveragedModel), or replaced (``.data =``, a new Parameter): all seen at the next call."""
    tv = _tv("resnet18")
    fused = fuse(tv)
    x = _x(2, 3, 32, 32)
    _assert_matches_f64(fused, tv, x)
    with torch.no_grad():
        for m in (tv, fused):
            m.layer1[0].conv1.weight.mul_(1.5)
            m.conv1.weight.data = m.conv1.weight.data * 0.5
            m.layer2[0].conv2.weight = nn.Parameter(m.layer2[0].conv2.weight * -1)
    _assert_matches_f64(fused, tv, x)
    for m in (tv, fused):  # an optimizer step taken in eval mode (BatchNorm frozen)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().mean().backward()
        opt.step()
    _assert_matches_f64(fused, tv, x)
    teacher = _tv("resnet18", seed=1)
    emas = [torch.optim.swa_utils.AveragedModel(
        m, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5), use_buffers=True)
        for m in (tv, fused)]
    for ema in emas:
        ema.update_parameters(teacher)  # torch's EMA: in place, under no_grad
    _assert_matches_f64(emas[1].module, emas[0].module, x)


def test_fold_sees_conv_weight_data_edits_after_eval():
    """In-place edits through ``conv.weight.data`` leave no trace (``.data`` has its own version
    counter) -- the one update the eager cache can't see, as for torch's inference freezing.
    ``.eval()`` (or ``refresh_folds()``) refolds; the traced fold (test below) sees it anyway."""
    tv = _tv("resnet18")
    fused = fuse(tv)
    x = _x(2, 3, 32, 32)
    _assert_matches_f64(fused, tv, x)
    for m in (tv, fused):
        for conv in m.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.data.mul_(0.9).add_(0.01)
    fused.eval()
    _assert_matches_f64(fused, tv, x)


def test_compiled_fold_sees_updates():
    """torch.compile folds inside the graph from the live parameters and buffers: in-place
    running-statistic updates under no_grad (the issue's 0.41), AdaBN, ``.data`` edits of conv
    weights are all seen without recompiling."""
    fused = _tiny_resnet(seed=2)
    tv = _tv_twin(fused).eval()
    x = _x(2, 3, 32, 32, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    _assert_matches_f64(compiled, tv, x)
    with torch.no_grad():
        for m in (tv, fused):
            m.bn1.running_var.mul_(4)
            m.layer1[0].bn2.running_mean.add_(1)
    _assert_matches_f64(compiled, tv, x)
    for m in (tv, fused):
        m.layer2[0].conv1.weight.data.mul_(-2)
        m.layer3[0].bn1.weight.data.mul_(3)
    _assert_matches_f64(compiled, tv, x)
    for m in (tv, fused):
        _adapt_bn(m, _x(8, 3, 32, 32, seed=3) + 1)
    _assert_matches_f64(compiled, tv, x)


def test_fold_cache_is_derived_state_only():
    """The cache is no buffer (not in state_dict, not broadcast by DDP); copies and pickles start
    empty and refold; ``.to()`` and mode switches drop it."""
    tv = _tv("resnet18")
    fused = fuse(tv)
    x = _x(1, 3, 32, 32)
    with torch.no_grad():
        fused(x)
    assert set(fused._fold_cache.keys()) == {"stem"}
    assert set(fused.layer2[0]._fold_cache.keys()) == {"conv1", "conv2", "downsample"}
    assert not any("fold" in n for n, _ in fused.named_buffers())
    for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert not set(other.layer2[0]._fold_cache.keys())
        _assert_matches_f64(other, tv, x)
    fused.to(torch.float32)
    assert not set(fused.layer2[0]._fold_cache.keys())
    half = copy.deepcopy(fused).to(torch.bfloat16)
    with torch.no_grad():
        assert rel_err(half(x.bfloat16()), copy.deepcopy(tv).double()(x.double())) <= 3e-2


def test_fold_cache_off_the_cpu_reads_no_values():
    """Off the CPU (CUDA) the cache decides by version counters and storages only, so it never
    waits for the device: checked here on the meta device, which has no values at all."""
    conv = nn.Conv2d(4, 6, 3, device="meta")
    bn = nn.BatchNorm2d(6, device="meta").eval()
    cache = FoldCache()
    w1, b1 = cache.get("p", conv, bn, conv.weight)
    assert w1.device.type == "meta" and w1.shape == conv.weight.shape and b1.shape == (6,)
    assert cache.get("p", conv, bn, conv.weight)[0] is w1  # nothing changed: the same fold
    bn.num_batches_tracked.add_(1)  # what every train-mode BatchNorm call does
    w2, _ = cache.get("p", conv, bn, conv.weight)
    assert w2 is not w1
    with torch.no_grad():
        bn.running_var.mul_(2)
    w3, _ = cache.get("p", conv, bn, conv.weight)
    assert w3 is not w2 and cache.get("p", conv, bn, conv.weight)[0] is w3
    conv.weight = nn.Parameter(torch.empty_like(conv.weight))
    assert cache.get("p", conv, bn, conv.weight)[0] is not w3


@pytest.mark.gpu
def test_fold_sees_updates_on_cuda():
    """Off the CPU the cache is keyed on version counters (num_batches_tracked's for AdaBN); a
    captured CUDA graph folds inside the graph, so its replays see in-place updates as the
    replays of torch's modules do."""
    fused = _tiny_resnet(seed=4)
    tv = _tv_twin(fused).eval()
    fused = set_backend(fused, "auto").cuda()
    x = _x(2, 3, 32, 32, seed=4)

    def check(out=None):
        with torch.no_grad():
            got = fused(x.cuda()) if out is None else out
            want = copy.deepcopy(tv).double()(x.double())
        assert rel_err(got.cpu(), want) <= TOL

    with no_tf32():
        check()
        _adapt_bn(tv, x * 2 + 1)
        _adapt_bn(fused, (x * 2 + 1).cuda())
        check()
        with torch.no_grad():
            for m in (tv, fused):
                m.layer1[0].conv1.weight.mul_(2)
        check()
        static_x = x.cuda()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fused(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = fused(static_x)
            for m in (tv, fused):
                m.layer2[0].bn1.running_var.mul_(4)
                m.layer3[0].conv2.weight.mul_(-1)
            graph.replay()
            torch.cuda.synchronize()
        check(static_y)


# --------------------------------------------------------------------------- item 4: hooks

def _conv_relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.ReLU(inplace=True)).eval()


def _add_conv_relu_hooks(net, log):
    def double_input(mod, args):
        log.append(("pre", tuple(args[0].shape)))
        return (args[0] * 2,)

    def record(mod, args, out):
        log.append(("post", out.detach().clone()))

    def plus_one(mod, args, out):
        return out + 1

    net[0].register_forward_pre_hook(double_input)
    net[1].register_forward_hook(record)
    net[3].register_forward_hook(plus_one)


def test_fuse_keeps_conv_forward_hooks():
    """Conv2d -> ReLU: the conv's forward pre-hooks and the ReLU's forward hooks move onto the
    fused module, as torch.ao's fuse_modules moves them; hooks that change the input or the
    output change the result as they do in torch."""
    nets, logs = {}, {}
    for name in ("torch", "torch.ao", "ours"):
        nets[name], logs[name] = _conv_relu_net(), []
        _add_conv_relu_hooks(nets[name], logs[name])
    nets["torch.ao"] = torch.ao.quantization.fuse_modules(nets["torch.ao"], [["0", "1"], ["2", "3"]])
    nets["ours"] = fuse(nets["ours"], backend="cpu")
    assert [type(m) for m in nets["ours"]] == [FusedConvReLU2d, nn.Identity] * 2
    assert not nets["ours"][1]._forward_hooks and not nets["ours"][3]._forward_hooks
    x = _x(2, 3, 7, 9)
    ref64 = copy.deepcopy(nets["torch"]).double()
    with torch.no_grad():
        want = ref64(x.double())
        for name, net in nets.items():
            assert rel_err(net(x), want) <= TOL_SAME, name
    assert [e[0] for e in logs["torch"]] == ["pre", "post"] * 2  # the float64 copy's hooks too
    for name in ("torch.ao", "ours"):
        assert [e[0] for e in logs[name]] == ["pre", "post"], name
        assert rel_err(logs[name][1][1], logs["torch"][3][1]) <= TOL_SAME, name
    # with_kwargs / always_call hooks keep their flags (torch.ao drops them)
    seq = _conv_relu_net()
    seen = []
    seq[1].register_forward_hook(lambda m, a, kw, o: seen.append(sorted(kw)), with_kwargs=True)
    seq[1].register_forward_hook(lambda m, a, o: seen.append("always"), always_call=True)
    fused = fuse(seq)
    with torch.no_grad():
        fused(x)
    assert seen == [[], "always"]


def test_fuse_keeps_conv_relu_whose_hooks_see_the_conv_output():
    """A conv forward hook sees the convolution's own output and a ReLU pre-hook its input: such
    a pair stays torch's Conv2d -> ReLU, reported, and its hooks fire with torch's values."""
    for where in ("conv_forward", "relu_pre"):
        net = _conv_relu_net()
        seen = []
        if where == "conv_forward":
            net[0].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        else:
            net[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        fused, report = fuse(net, return_report=True)
        assert type(fused[0]) is nn.Conv2d and type(fused[2]) is FusedConvReLU2d
        assert report.skipped_paths() == ["0"] and "hooks" in report.skipped[0].reason
        x = _x(2, 3, 6, 6)
        with torch.no_grad():
            out = fused(x)
            want = net(x)
        assert rel_err(out, want) <= TOL_SAME
        assert torch.equal(seen[0], seen[1]) and (seen[0] < 0).any()  # pre-ReLU values


def _record_every_module(model, log):
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)) or name.endswith("downsample"):
            handles.append(m.register_forward_hook(
                lambda mod, a, o, name=name: log.append((name, o.detach().clone()))))
    return handles


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hooks_inside_fused_blocks_keep_firing(mode):
    """Forward hooks on the convs, BatchNorms, ReLUs and downsamples inside fused blocks fire as
    in torchvision (same modules, same order, same values), in eval under no_grad too; a hook
    that replaces an output changes the result as in torchvision; removing the hooks brings the
    folded path back."""
    tv = _tv("resnet18").train(mode == "train")
    fused = fuse(tv)
    logs = {"tv": [], "fused": []}
    handles = _record_every_module(tv, logs["tv"]) + _record_every_module(fused, logs["fused"])
    for m in (tv, fused):
        handles.append(m.layer2[0].bn1.register_forward_hook(lambda mod, a, o: o * 0.5))
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        out, want = fused(x), tv(x)
    assert rel_err(out, want) <= TOL
    assert [n for n, _ in logs["fused"]] == [n for n, _ in logs["tv"]]
    assert len(logs["tv"]) == 60  # 20 convs, 20 BNs, 17 ReLU calls, 3 downsamples
    for (n, a), (_, b) in zip(logs["fused"], logs["tv"]):
        assert rel_err(a, b) <= TOL, n
    for h in handles:
        h.remove()
    fused.eval(), tv.eval()
    _assert_matches_f64(fused, tv, x)
    assert set(fused.layer2[0]._fold_cache.keys()) == {"conv1", "conv2", "downsample"}


def test_global_module_hooks_see_every_module():
    """Global hooks (register_module_forward_hook) run for every module torch calls: while one is
    registered the fused model calls the same modules, in the same order, as torchvision's."""
    for name in ("resnet18", "vgg11_bn"):
        tv = _tv(name)
        fused = fuse(tv)
        names = {id(m): n for model in (tv, fused) for n, m in model.named_modules()}
        calls = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda mod, a, o: calls.append(names.get(id(mod))))
        try:
            x = _x(1, 3, 32, 32)
            with torch.no_grad():
                fused(x)
                n_fused = len(calls)
                tv(x)
        finally:
            handle.remove()
        assert calls[:n_fused] == calls[n_fused:], name
        _assert_matches_f64(fused, tv, x)


# --------------------------------------------------------------------------- items 4, 5: parametrizations

def _weight_norm_old(conv):
    return torch.nn.utils.weight_norm(conv)


def _spectral_norm_old(conv):
    return torch.nn.utils.spectral_norm(conv)


def _prune(conv):
    return prune.l1_unstructured(conv, "weight", amount=0.3)


PARAMETRIZATIONS = {
    "parametrizations.weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "weight_norm": _weight_norm_old,
    "spectral_norm": _spectral_norm_old,
    "prune": _prune,
}
HOOK_BASED = ("weight_norm", "spectral_norm", "prune")  # forward pre-hooks compute the weight
NO_DEEPCOPY = ("weight_norm", "prune")  # torch can't deep-copy modules with these


def _update_parametrized(conv, kind):
    """A change only the parametrization's inputs see."""
    with torch.no_grad():
        if kind == "parametrizations.weight_norm":
            conv.parametrizations.weight.original0.mul_(1.5)
        elif kind == "parametrizations.spectral_norm":
            conv.parametrizations.weight.original.mul_(-1)
        elif kind == "weight_norm":
            conv.weight_g.mul_(1.5)
        elif kind == "spectral_norm":
            conv.weight_orig.mul_(-1)
    if kind == "prune":
        prune.l1_unstructured(conv, "weight", amount=0.5)  # more pruning: a new mask


def _parametrized_net(kind, bn, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [nn.ReLU()]
    net = nn.Sequential(*layers, BasicBlock(8, 8))
    PARAMETRIZATIONS[kind](net[0])
    PARAMETRIZATIONS[kind](net[-1].conv1)
    return randomize_batchnorm(net, torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("bn", [False, True], ids=["conv_relu", "conv_bn_relu"])
@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
def test_fuse_keeps_parametrized_convs(kind, bn):
    """fuse() on convs under weight_norm, spectral_norm (both APIs) and prune: no crash; every
    pair is fused through the parametrization or left to torch with the reason; the state_dict
    is torch's; the folds read the weight through the parametrization, so its updates are seen
    (the issue's ~1 relative error), in eval and in training."""
    ref, ours = _parametrized_net(kind, bn), _parametrized_net(kind, bn)
    if kind in NO_DEEPCOPY:
        with pytest.raises(RuntimeError, match="inplace=True"):
            fuse(ours)  # fuse() works on a deep copy, which torch can't make: it says what to do
    fused, report = fuse(ours, inplace=True, return_report=True)
    assert list(fused.state_dict()) == list(ref.state_dict())
    first = fused[0]
    if bn:
        assert isinstance(fused, FusedSequential) and type(first).forward is nn.Conv2d.forward
        hooked = [s.path for s in report.skipped if "hooks" in s.reason]
        assert hooked == (["0", "3.conv1"] if kind in HOOK_BASED else [])
    elif kind in HOOK_BASED:
        assert isinstance(first, FusedConvReLU2d) and first._forward_pre_hooks  # moved on
        assert [s.path for s in report.skipped] == ["2.conv1"]
    else:
        assert report.skipped_paths() == ["0"] and "parametrized" in report.skipped[0].reason
    x = _x(2, 3, 8, 8)
    for step in range(2):
        for mode in ("eval", "train"):
            fused.train(mode == "train"), ref.train(mode == "train")
            with torch.no_grad():
                out, want = fused(x), ref(x)
            assert rel_err(out, want) <= TOL_SAME, (step, mode)
        for net in (fused, ref):
            _update_parametrized(net[0], kind)
            _update_parametrized(net[-1].conv1, kind)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_from_conv_refuses_what_it_cant_keep():
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="parametrized"):
        FusedConvReLU2d.from_conv(conv)
    hooked = nn.Conv2d(3, 4, 3)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="forward or backward hooks"):
        FusedConvReLU2d.from_conv(hooked)
    FusedConvReLU2d.from_conv(hooked, relu=False)  # nothing hidden without the ReLU
    old = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError, match="pre-hooks"):
        FusedConvReLU2d.from_conv(old, nn.BatchNorm2d(4).eval())
    # a parametrized conv folds with a BatchNorm through its parametrization (frozen snapshot)
    bn = randomize_batchnorm(nn.BatchNorm2d(4), torch.Generator().manual_seed(0)).eval()
    folded = FusedConvReLU2d.from_conv(conv.eval(), bn)
    x = _x(1, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(folded(x), torch.relu(bn(conv(x)))) <= TOL_SAME


# --------------------------------------------------------------------------- item 7: fx, TorchScript

def _n_fused_conv_nodes(graph):
    return sum(n.op == "call_function" and n.target is nn_common.fused_conv for n in graph.nodes)


@pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_symbolic_trace_every_fused_builder(name):
    """Every builder traces with torch.fx.symbolic_trace in eval mode (one fused_conv node per
    convolution, BatchNorm folded in the graph) and in train mode (torch's conv and BatchNorm
    leaves, the residual add+ReLU one node). Built on the meta device: tracing reads no values
    (the graphs run against the modules in the tests below)."""
    with torch.device("meta"):
        m = getattr(models, name)(num_classes=10)
    n_convs = sum(isinstance(c, nn.Conv2d) for c in m.modules())
    expect_train = n_convs if name.startswith("vgg") and not name.endswith("_bn") else 0
    assert _n_fused_conv_nodes(torch.fx.symbolic_trace(m.eval()).graph) == n_convs
    assert _n_fused_conv_nodes(torch.fx.symbolic_trace(m.train()).graph) == expect_train
    # torchvision's feature extraction traces both modes with its own tracer
    fe = create_feature_extractor(m, ["layer4" if name.startswith("resnet") else "features"])
    assert _n_fused_conv_nodes(fe.eval_graph) == n_convs
    assert _n_fused_conv_nodes(fe.train_graph) == expect_train


@pytest.mark.parametrize("source", ["builder:resnet18", "builder:vgg11_bn", "fuse:resnet18",
                                    "fuse:vgg11"])
def test_fx_graph_of_fused_model_runs_as_the_model(source):
    how, name = source.split(":")
    tv = _tv(name)
    fused = fuse(tv) if how == "fuse" else getattr(models, name)(weights=tv.state_dict(),
                                                                 num_classes=10).eval()
    x = _x(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(fused)
    _assert_matches_f64(gm, tv, x)
    gm_train = torch.fx.symbolic_trace(fused.train())
    for seed in (1, 2):  # the same dropout masks in both; BatchNorm statistics move in step
        torch.manual_seed(seed)
        want = fused(x)
        torch.manual_seed(seed)
        assert torch.equal(gm_train(x), want)


def test_fx_traces_the_fused_modules():
    """FusedConvReLU2d, FusedConvAddReLU2d and FusedAddReLU trace as one call each."""
    x, r = _x(2, 4, 6, 6), _x(2, 4, 6, 6, seed=1)
    for m, args in ((FusedConvReLU2d(4, 4, 3, padding=1), (x,)),
                    (FusedConvAddReLU2d(4, 4, 3, padding=1), (x, r)),
                    (FusedAddReLU(), (x, r))):
        gm = torch.fx.symbolic_trace(m)
        assert sum(n.op == "call_function" for n in gm.graph.nodes) == 1, type(m).__name__
        with torch.no_grad():
            assert torch.equal(gm(*args), m(*args))


@pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode")
def test_create_feature_extractor_on_fused_resnet50():
    """How detection and segmentation models take a backbone: torchvision's feature extractor on
    a fused ResNet-50 returns torchvision's features, in eval and in train mode."""
    tv = _tv("resnet50")
    nodes = ["layer1", "layer3", "layer4"]
    ours = create_feature_extractor(fuse(tv), nodes)
    ref = create_feature_extractor(copy.deepcopy(tv), nodes)
    ref64 = create_feature_extractor(copy.deepcopy(tv).double(), nodes)
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        got, want = ours(x), ref64(x.double())
    assert list(got) == nodes
    for k in nodes:
        assert rel_err(got[k], want[k]) <= TOL, k
    # training: BatchNorm normalises with the batch; 4 x 64x64 gives layer4 16 values per channel
    # (fewer amplify rounding without bound), compared with torchvision in the same dtype
    ours.train(), ref.train()
    x = _x(4, 3, 64, 64)
    got, want = ours(x), ref(x)
    for k in nodes:
        assert rel_err(got[k], want[k]) <= TOL, k


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript_refused_with_pointer_to_compile():
    """torch.jit.script and torch.jit.trace (deprecated by PyTorch) are refused at once with a
    message naming torch.compile / torch.export."""
    x = _x(1, 3, 32, 32)
    for m in (fuse(_tv("resnet18")), FusedConvReLU2d(3, 4, 3), FusedAddReLU(),
              FusedSequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))):
        with pytest.raises(RuntimeError, match="torch.jit.script can't compile.*torch.compile"):
            torch.jit.script(m)
    with pytest.raises(RuntimeError, match="torch.jit.trace can't compile.*torch.export"):
        torch.jit.trace(fuse(_tv("resnet18")), x)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(FusedAddReLU(), (x, x))


# --------------------------------------------------------------------------- dynamic shapes

def test_fused_model_code_traces_with_dynamic_batch():
    """The module-level code (folds, hooks checks, residual formats) traces under
    torch.compile(dynamic=True, fullgraph=True) without recompiling across batch sizes, and
    under torch.export with a dynamic batch dimension."""
    fused = _tiny_resnet(seed=5)
    tv = _tv_twin(fused).eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fused, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (2, 3, 5):
        _assert_matches_f64(compiled, tv, _x(n, 3, 32, 32, seed=n))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(fused, (_x(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    for n in (1, 4):
        _assert_matches_f64(ep.module(), tv, _x(n, 3, 32, 32, seed=n))


@pytest.mark.slow
def test_fused_model_trains_under_dynamic_compile_like_torchvision():
    """Training (torch's conv and BatchNorm, the fused add+ReLU) under torch.compile(dynamic=
    True, fullgraph=True): compiled as often as torchvision's own model is (torch specialises
    training BatchNorm on the batch size), same outputs."""
    fused = _tiny_resnet(seed=5)
    tv = _tv_twin(fused)
    graphs, outs = {}, {}
    for name, m in (("ours", fused.train()), ("torchvision", tv.train())):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(m, dynamic=True, fullgraph=True, backend="aot_eager")
        # 64x64: BatchNorm normalises 12+ values per channel in layer4
        outs[name] = [compiled(_x(n, 3, 64, 64, seed=n)) for n in (3, 4, 5)]
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs["ours"] == graphs["torchvision"]
    for a, b in zip(outs["ours"], outs["torchvision"]):
        assert rel_err(a, b) <= TOL


# --------------------------------------------------------------------------- item 9: clear errors

def test_fuse_refuses_non_modules_with_type_error():
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got function"):
        fuse(lambda t: t)
    with pytest.raises(TypeError, match="got Tensor"):
        fuse(torch.zeros(1))


def test_fold_is_differentiable_when_traced():
    """The traced fold (compile/export/fx) is differentiable: gradients reach conv's and bn's
    parameters in eval mode as through torch's modules."""
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    randomize_batchnorm(bn, torch.Generator().manual_seed(0)).eval()
    x = _x(2, 3, 6, 6)
    w, b = nn_folding.fold_conv_bn(conv, bn)
    nn.functional.conv2d(x, w, b).square().sum().backward()
    got = [p.grad.clone() for p in (conv.weight, conv.bias, bn.weight, bn.bias)]
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        p.grad = None
    bn(conv(x)).square().sum().backward()
    for g, p in zip(got, (conv.weight, conv.bias, bn.weight, bn.bias)):
        assert rel_err(g, p.grad) <= TOL_SAME
    assert issubclass(FusedSequential, ConvBNFolding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fold_matches_torch_for_every_batchnorm_form(dtype, affine, bias):
    """fold_conv_bn against torch's conv + eval BatchNorm in float64 on the same values: conv
    with or without bias, BatchNorm with or without affine parameters, per-dtype tolerance; the
    weight keeps its memory format."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, bias=bias).to(dtype)
    bn = nn.BatchNorm2d(7, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
    bn = bn.to(dtype).eval()
    conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        w, b = nn_folding.fold_conv_bn(conv, bn)
        x = _x(2, 5, 6, 7).double()
        want = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x))
        got = nn.functional.conv2d(x, w.double(), b.double())
    assert w.dtype == b.dtype == dtype and w.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) <= TOL_BY_DTYPE[dtype]
