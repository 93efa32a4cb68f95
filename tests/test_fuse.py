"""deeparch_kernels.fuse.fuse: torchvision models and home-made ones, eval and train, switching
modes after fusing, nested containers, memory formats, unsupported convolutions (left unfused,
reported, still right), inplace, the report."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from deeparch_kernels.fuse import FuseReport, fuse
from deeparch_kernels.models import FusedResNet
from deeparch_kernels.nn import (ExactReLU, FusedBasicBlock, FusedBottleneck, FusedConvReLU2d, FusedSequential,
                                 get_backends)
from deeparch_kernels.verify import randomize_batchnorm, verify
from helpers import rel_err

TOL = 1e-4


def _tv(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = getattr(torchvision.models, name)(num_classes=10, **kw)
    return randomize_batchnorm(m, torch.Generator().manual_seed(seed))


def _x(*shape, seed=0, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fuse_torchvision_model(name, mode):
    ref = _tv(name).train(mode == "train")
    fused, report = fuse(ref, backend="cpu", return_report=True)
    assert isinstance(report, FuseReport) and report.mode == mode and report.skipped == []
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert set(get_backends(fused).values()) == {"cpu"}
    if name == "resnet18":
        assert isinstance(fused, FusedResNet)
        assert all(isinstance(b, FusedBasicBlock) for layer in (fused.layer1, fused.layer4) for b in layer)
        assert len(report.fused) == 1 + 8  # the stem and eight blocks
    else:
        assert isinstance(fused.features, FusedSequential)
        assert len(report.fused) == 13 + 2  # thirteen Conv2d -> BN -> ReLU, two Linear -> ReLU
        assert all(f.pattern == "Conv2d -> BatchNorm2d -> ReLU" for f in report.fused[:13])
        assert [(f.path, f.pattern) for f in report.fused[13:]] == [("classifier.1", "Linear -> ReLU"),
                                                                    ("classifier.4", "Linear -> ReLU")]
        assert all(isinstance(fused.classifier[i], ExactReLU) for i in (1, 4))
    r = verify(fused, ref, _x(2, 3, 32, 32), modes=(mode,), tol=TOL)
    assert r.passed, str(r)
    if mode == "train":
        assert r.modes["train"].grad_max_rel_err <= TOL


def test_fused_model_switches_between_train_and_eval():
    """Fused in eval mode, trained (BN in batch mode, running statistics and weights change), then
    evaluated again (BN refolded from the new values): torchvision side by side throughout."""
    ref = _tv("resnet18", seed=1).eval()
    fused = fuse(ref)
    x = _x(4, 3, 32, 32, seed=1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, fused)]
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) <= TOL
    for step in range(3):
        for m, opt in zip((ref, fused), opts):
            m.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), torch.arange(4) % 10).backward()
            opt.step()
        for m in (ref, fused):
            m.eval()
        with torch.no_grad():
            assert rel_err(fused(x), ref(x)) <= TOL, step
    for (k, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        assert rel_err(a, b) <= TOL, k


class _Stage(nn.Module):
    """A home-made container: fuse() walks into it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "a": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                               nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                             nn.BatchNorm2d(16), nn.ReLU(inplace=True))),
            "b": nn.Sequential(BasicBlock(16, 16),
                               Bottleneck(16, 4, downsample=None)),
        })

    def forward(self, x):
        return self.blocks["b"](self.blocks["a"](x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList([_Stage()])
        self.head = nn.Conv2d(16, 4, 1)  # not in a pattern

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return self.head(x).mean((2, 3))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_nested_containers(mode):
    torch.manual_seed(0)
    ref = randomize_batchnorm(_Net(), torch.Generator().manual_seed(0)).train(mode == "train")
    fused, report = fuse(ref, return_report=True)
    stage = fused.stages[0].blocks
    assert isinstance(fused.stem, FusedSequential)
    assert isinstance(stage["a"][0], FusedConvReLU2d) and isinstance(stage["a"][1], nn.Identity)
    assert isinstance(stage["a"][2], FusedSequential)
    assert isinstance(stage["b"][0], FusedBasicBlock) and isinstance(stage["b"][1], FusedBottleneck)
    assert report.fused_paths() == ["stem.0", "stages.0.blocks.a.0", "stages.0.blocks.a.2.0",
                                    "stages.0.blocks.b.0", "stages.0.blocks.b.1"]
    assert report.skipped_paths() == ["head"]
    assert "not in a pattern" in report.skipped[0].reason
    r = verify(fused, ref, _x(2, 3, 12, 12), modes=(mode,), tol=TOL)
    assert r.passed, str(r)


def test_unsupported_convs_left_unfused_and_reported():
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # grouped
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # dilated
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8),  # reflect padding
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
    )
    randomize_batchnorm(ref, torch.Generator().manual_seed(0))
    for mode in ("eval", "train"):
        ref.train(mode == "train")
        fused, report = fuse(ref, return_report=True)
        assert report.fused_paths() == ["0", "9"]
        assert {s.path: s.reason.split(" ")[0] for s in report.skipped} == {
            "2": "groups=2", "4": "dilation=(2,", "7": "padding_mode='reflect'"}
        assert type(fused[2]) is nn.Conv2d and type(fused[4]) is nn.Conv2d
        assert "groups=2" in str(report) and "dilation" in str(report)
        r = verify(fused, ref, _x(2, 3, 9, 9), modes=(mode,), tol=TOL)
        assert r.passed, str(r)


def test_resnext_grouped_conv2_reported_and_right():
    ref = _tv("resnext50_32x4d", seed=2).eval()
    fused, report = fuse(ref, return_report=True)
    assert len(report.skipped) == 16  # conv2 of each of the 16 blocks: groups=32
    assert all(s.path.endswith("conv2") and "groups=32" in s.reason for s in report.skipped)
    r = verify(fused, ref, _x(1, 3, 32, 32), modes=("eval",), tol=TOL)
    assert r.passed, str(r)


@pytest.mark.parametrize("model_cl,input_cl", [(False, True), (True, True), (True, False)])
def test_channels_last(model_cl, input_cl):
    ref = _tv("resnet18", seed=3).eval()
    if model_cl:
        ref = ref.to(memory_format=torch.channels_last)
    fused = fuse(ref)
    x = _x(2, 3, 32, 32, seed=3, channels_last=input_cl)
    r = verify(fused, ref, x, modes=("eval", "train"), tol=TOL)
    assert r.passed, str(r)


def test_inplace_false_leaves_the_original_untouched():
    ref = _tv("resnet18", seed=4).eval()
    before = copy.deepcopy(ref.state_dict())
    types = [type(m) for m in ref.modules()]
    fused = fuse(ref)
    with torch.no_grad():
        fused(_x(1, 3, 32, 32))
    assert fused is not ref and [type(m) for m in ref.modules()] == types
    assert not any("_fold_" in n for n, _ in ref.named_buffers())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())
    assert all(p is not q for p, q in zip(fused.parameters(), ref.parameters()))
    same = fuse(ref, inplace=True)
    assert isinstance(same, FusedResNet) and same.layer1 is ref.layer1  # rewritten in place


def test_fuse_is_idempotent_and_sets_backend():
    ref = _tv("vgg11_bn", seed=5).eval()
    once = fuse(ref, backend="aten")
    twice, report = fuse(once, backend="reference", return_report=True)
    assert set(get_backends(twice).values()) == {"reference"}
    assert report.skipped == []
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(twice(x), ref(x)) <= TOL


def test_fuse_vgg_without_bn():
    ref = _tv("vgg11", seed=6).eval()
    fused, report = fuse(ref, return_report=True)
    assert [f.pattern for f in report.fused] == ["Conv2d -> ReLU"] * 8 + ["Linear -> ReLU"] * 2
    assert sum(isinstance(m, FusedConvReLU2d) for m in fused.modules()) == 8
    torchvision.models.vgg11(num_classes=10).load_state_dict(fused.state_dict())  # strict
    r = verify(fused, ref, _x(2, 3, 32, 32), modes=("eval", "train"), tol=TOL)
    assert r.passed, str(r)


def test_unknown_backend_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        fuse(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), backend="gpu")


class _PoisonLogit(nn.Module):
    """A model whose logits are its reference's, but one of them NaN (or ``value``)."""

    def __init__(self, inner, value=float("nan")):
        super().__init__()
        self.inner, self.value = inner, value

    def forward(self, x):
        y = self.inner(x).clone()
        y[0, 1] = self.value
        return y


@pytest.mark.parametrize("where", ["out", "reference"])
def test_verify_fails_nan_where_the_other_side_is_finite(where):
    """A NaN on either side only (torch's semantics are NaN exactly where the reference has it)
    is an infinite error; NaN in the same place on both sides is not an error."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    poisoned = _PoisonLogit(copy.deepcopy(ref)).eval()
    fused, reference = (poisoned, ref) if where == "out" else (ref, poisoned)
    r = verify(fused, reference, torch.randn(2, 3, 4, 4), modes=("eval",), tol=1e-4)
    assert not r.passed and r.modes["eval"].max_rel_err == float("inf")
    both = verify(_PoisonLogit(copy.deepcopy(ref)).eval(), poisoned, torch.randn(2, 3, 4, 4),
                  modes=("eval",), tol=1e-4)
    assert both.passed, both
