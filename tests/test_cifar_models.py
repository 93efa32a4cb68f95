"""deeparch_kernels.models.cifar_resnet and the modules behind it (nn.cifar: FusedPlainBlock,
ShortcutA) against a plain-torch definition of the ResNet paper's CIFAR nets written here: same
state_dict, same initialisation from the same seed, same outputs and gradients in training and
eval mode (BatchNorm folded), with and without BatchNorm, option A and B shortcuts."""
import re

import pytest
import torch
from torch import nn

from deeparch_kernels import models
from deeparch_kernels.nn import FusedBasicBlock, FusedPlainBlock, ShortcutA
from deeparch_kernels.verify import randomize_batchnorm
from helpers import rel_err


# --------------------------------------------------------------------------- the reference

class RefBlock(nn.Module):
    """The paper's block in plain torch: conv-BN-ReLU-conv-BN, + shortcut (none when plain),
    ReLU. Option A: strided identity with zero channels concatenated; B: conv1x1 + BN."""

    def __init__(self, inp, planes, stride, plain, shortcut, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.plain, self.stride, self.extra = plain, stride, planes - inp
        self.shortcut = shortcut if not plain and (stride != 1 or inp != planes) else None
        if self.shortcut == "B":
            self.downsample = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.plain:
            return torch.relu(out)
        if self.shortcut == "B":
            idt = self.downsample(x)
        elif self.shortcut == "A":
            sub = x[:, :, ::self.stride, ::self.stride]
            idt = torch.cat([sub, sub.new_zeros(sub.shape[0], self.extra, *sub.shape[2:])], dim=1)
        else:
            idt = x
        return torch.relu(out + idt)


class RefNet(nn.Module):
    def __init__(self, n, plain=False, shortcut="A", norm=nn.BatchNorm2d, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = norm(16)
        inp = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(RefBlock(inp, planes, stride if j == 0 else 1, plain, shortcut, norm))
                inp = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _pair(depth, plain, shortcut, bn, seed=0, in_channels=3):
    norm = nn.BatchNorm2d if bn else nn.Identity
    torch.manual_seed(seed)
    ours = models.cifar_resnet(depth, plain=plain, shortcut=shortcut, norm_layer=None if bn else nn.Identity,
                               in_channels=in_channels)
    torch.manual_seed(seed)
    ref = RefNet((depth - 2) // 6, plain, shortcut, norm, in_channels=in_channels)
    return ours, ref


CASES = [(True, "A", True), (False, "A", True), (False, "B", True), (True, "A", False), (False, "A", False)]
IDS = ["plain", "residual-A", "residual-B", "plain-noBN", "residual-A-noBN"]


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("plain,shortcut,bn", CASES, ids=IDS)
def test_same_state_dict_and_initialisation_as_the_reference(plain, shortcut, bn):
    ours, ref = _pair(14, plain, shortcut, bn, seed=3)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, same modules: same initial weights"
    back = models.cifar_resnet(14, plain=plain, shortcut=shortcut, norm_layer=None if bn else nn.Identity)
    back.load_state_dict(ref.state_dict())  # strict, both ways
    ref.load_state_dict(back.state_dict())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("plain,shortcut,bn", CASES, ids=IDS)
def test_matches_the_reference_in_train_and_eval_mode(plain, shortcut, bn, channels_last):
    gen = torch.Generator().manual_seed(7)
    ours, ref = _pair(14, plain, shortcut, bn, seed=1, in_channels=3)
    randomize_batchnorm(ref, gen)
    ours.load_state_dict(ref.state_dict())
    ref.double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = ours.to(memory_format=fmt)
    x = torch.randn(5, 3, 12, 12, generator=gen)

    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        ours.zero_grad()
        ref.zero_grad()
        xo = x.clone().contiguous(memory_format=fmt).requires_grad_()
        xr = x.double().requires_grad_()
        out, want = ours(xo), ref(xr)
        assert rel_err(out, want) <= 1e-5, mode
        g = torch.randn(out.shape, generator=gen)
        out.backward(g)
        want.backward(g.double())
        assert rel_err(xo.grad, xr.grad) <= 1e-4, mode
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-4, (mode, name)
        if mode == "train":  # BatchNorm's running statistics moved the same way
            for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
                if b.is_floating_point():
                    assert rel_err(b, c) <= 1e-5, name
        else:
            with torch.no_grad():  # the folded path: conv + BN (+ residual) + ReLU as one op
                assert rel_err(ours(x.contiguous(memory_format=fmt)), ref(x.double())) <= 1e-5


@pytest.mark.parametrize("depth", [20, 56])
def test_plain_and_option_a_residual_have_the_same_parameters(depth):
    plain, res = models.cifar_resnet(depth, plain=True), models.cifar_resnet(depth)
    assert [(k, p.shape) for k, p in plain.named_parameters()] == [(k, p.shape) for k, p in res.named_parameters()]


def test_parameter_count_by_hand():
    """ResNet-20, 3 input channels, option A: the 0.27M of the paper's Table 6, derived."""
    n, count = 3, 3 * 16 * 9 + 2 * 16  # stem conv + BN
    inp = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            count += inp * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            inp = planes
    count += 64 * 10 + 10
    assert count == 269_722
    assert sum(p.numel() for p in models.resnet20().parameters()) == count
    assert sum(p.numel() for p in models.plain20().parameters()) == count
    # option B adds the two projections (conv1x1 + BN)
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert sum(p.numel() for p in models.resnet20(shortcut="B").parameters()) == count + extra


@pytest.mark.parametrize("name", sorted(models.CIFAR_BUILDERS))
def test_named_builders(name):
    depth = int(re.sub(r"\D", "", name))
    net = models.CIFAR_BUILDERS[name](num_classes=7, in_channels=1)
    assert getattr(models, name) is models.CIFAR_BUILDERS[name] and name in models.__all__
    assert net.depth == depth and len(net.layer1) == (depth - 2) // 6
    kind = FusedPlainBlock if name.startswith("plain") else FusedBasicBlock
    assert all(type(b) is kind for layer in (net.layer1, net.layer2, net.layer3) for b in layer)
    # 6n + 2 weighted layers: every conv on the main path, plus the classifier
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth
    if depth <= 20:
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_cifar_builders_stay_out_of_the_torchvision_list():
    assert not set(models.CIFAR_BUILDERS) & set(models.BUILDERS)


def test_shapes_and_backend():
    net = models.cifar_resnet(8, backend="aten")
    assert {m.backend for m in net.modules() if hasattr(m, "backend")} == {"aten"}
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert net.eval()(torch.randn(1, 3, 7, 9)).shape == (1, 10)  # odd sizes: stride-2 stages round up


def test_shortcut_a():
    m = ShortcutA(3, 8, 2)
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    x = torch.randn(2, 3, 5, 7)
    y = m(x)
    assert y.shape == (2, 8, 3, 4)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2]) and not y[:, 3:].any()
    assert torch.equal(ShortcutA(4, 4)(x[:, :1].expand(2, 4, 5, 7)), x[:, :1].expand(2, 4, 5, 7))
    xl = x.contiguous(memory_format=torch.channels_last)
    assert m(xl).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out_channels"):
        ShortcutA(8, 4)
    with pytest.raises(ValueError, match="stride"):
        ShortcutA(4, 8, 0)
    with pytest.raises(RuntimeError, match="expected an"):
        m(torch.randn(2, 4, 5, 5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.cifar_resnet(21)
    with pytest.raises(ValueError, match="shortcut"):
        models.cifar_resnet(20, shortcut="C")
    with pytest.raises(ValueError, match="backend"):
        models.cifar_resnet(20, backend="nope")
    with pytest.raises(ValueError, match="no downsample"):
        FusedPlainBlock(16, 32, 2, downsample=ShortcutA(16, 32, 2))
    block = FusedBasicBlock(16, 32, 2, downsample=ShortcutA(16, 32, 2))
    with pytest.raises(ValueError, match="downsample"):
        FusedPlainBlock.from_block(block)
