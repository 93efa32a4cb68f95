"""deeparch_kernels.models: every builder against torchvision's (same random weights, randomised
BatchNorm statistics) in eval and train mode, state_dicts both ways, weights= in every form,
backend=."""
import pytest
import torch
import torchvision

import deeparch_kernels as dk
from deeparch_kernels import models
from deeparch_kernels.nn import (FusedBasicBlock, FusedBottleneck, FusedConvReLU2d, FusedSequential,
                                 get_backends)
from deeparch_kernels.verify import MODEL_NAMES, randomize_batchnorm, reference_model, verify_model
from helpers import rel_err

IMAGE = 32  # the smallest size every builder takes (VGG's five pools; adaptive pooling after)
# Gradients of every parameter are compared for these; the deepest ones get one eval forward.
TRAIN = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
         "vgg16_bn")
EVAL_ONLY = ("resnet101", "resnet152", "vgg19", "vgg19_bn")


def test_every_builder_is_covered():
    assert set(TRAIN) | set(EVAL_ONLY) == set(MODEL_NAMES) == set(models.BUILDERS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builder_matches_torchvision(name):
    modes = ("eval",) if name in EVAL_ONLY else ("eval", "train")
    r = verify_model(name, image_size=IMAGE, batch=2, num_classes=10, modes=modes, seed=3)
    assert r.error is None, r.error
    assert set(r.modes) == set(modes)
    for m in r.modes.values():
        assert m.max_rel_err <= 1e-4, str(r)
        if m.mode == "train":
            assert m.grad_max_rel_err is not None and m.grad_max_rel_err <= 1e-4, str(r)
    assert r.passed and r.resolved and set(r.resolved) <= {"cpu", "winograd", "gemm", "aten"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "vgg16_bn"])
def test_builder_matches_torchvision_on_gpu(name, dtype):
    """fp32 (TF32 off) within 1e-4 of torchvision, fp16/bf16 within 1e-2 of torchvision's fp32
    (or twice torchvision's own error in that dtype), eval and train, channels_last."""
    r = verify_model(name, device="cuda", dtype=dtype, image_size=64, batch=4, num_classes=10,
                     channels_last=True, seed=9)
    assert r.error is None and r.passed, str(r)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
def test_cuda_graph_capture_and_replay(backend):
    """Batch-1 latency is host overhead: a fused ResNet-18 must be capturable in a CUDA graph
    (after a warm-up call has made every choice: autotuning, backend timing, split-K workspace)
    and its replays must give the eager result on new inputs."""
    if backend != "auto" and not dk.available_backends("cuda")[backend].available:
        pytest.skip(dk.available_backends("cuda")[backend].reason)
    torch.manual_seed(3)
    m = models.resnet18(num_classes=10, backend=backend)
    randomize_batchnorm(m, torch.Generator().manual_seed(3))
    m = m.to("cuda", torch.float16, memory_format=torch.channels_last).eval()
    static_x = torch.randn(1, 3, 64, 64, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                m(static_x)  # warm-up off the default stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = m(static_x)
        for seed in (4, 5):
            torch.manual_seed(seed)
            static_x.copy_(torch.randn_like(static_x))
            g.replay()
            torch.cuda.synchronize()
            want = m(static_x)
            assert torch.isfinite(static_y).all()
            assert rel_err(static_y, want.double()) <= 1e-3


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_builder_structure_and_init_are_torchvisions(name):
    torch.manual_seed(5)
    ours = getattr(models, name)(num_classes=7)
    torch.manual_seed(5)
    ref = getattr(torchvision.models, name)(num_classes=7)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same modules, same initialisation order
    kinds = {type(m) for m in ours.modules()}
    if name == "resnet18":
        assert isinstance(ours, models.FusedResNet) and FusedBasicBlock in kinds
    else:
        assert isinstance(ours.features, FusedSequential)


def test_vgg_without_bn_uses_fused_conv_relu():
    m = models.vgg11(num_classes=3)
    assert isinstance(m.features[0], FusedConvReLU2d) and isinstance(m.features[1], torch.nn.Identity)
    assert list(m.state_dict()) == list(torchvision.models.vgg11(num_classes=3).state_dict())


def test_resnet50_uses_bottlenecks():
    m = models.resnet50(num_classes=3)
    assert all(isinstance(b, FusedBottleneck) for layer in (m.layer1, m.layer4) for b in layer)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_state_dict_round_trip(name):
    ref = reference_model(name, seed=1, num_classes=10)
    ours = getattr(models, name)(num_classes=10)
    ours.load_state_dict(ref.state_dict())  # strict
    back = getattr(torchvision.models, name)(num_classes=10)
    back.load_state_dict(ours.state_dict())  # strict
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def _outputs_equal(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        return rel_err(a(x), b(x)) <= 1e-5


def test_weights_as_state_dict_and_path(tmp_path):
    ref = reference_model("resnet18", seed=2, num_classes=10)
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    from_sd = models.resnet18(weights=ref.state_dict(), num_classes=10)
    path = tmp_path / "resnet18.pt"
    torch.save(ref.state_dict(), path)
    from_path = models.resnet18(weights=path, num_classes=10)
    from_str = models.resnet18(weights=str(path), num_classes=10)
    for m in (from_sd, from_path, from_str):
        assert _outputs_equal(m, ref, x)
    with pytest.raises(RuntimeError, match="size mismatch"):
        models.resnet18(weights=ref.state_dict())  # num_classes 1000 vs the state_dict's 10
    with pytest.raises(FileNotFoundError, match="neither"):
        models.resnet18(weights=str(tmp_path / "missing.pt"))


def test_vgg_weights_path_skips_init(tmp_path, monkeypatch):
    ref = randomize_batchnorm(torchvision.models.vgg11_bn(num_classes=4), torch.Generator().manual_seed(0))
    path = tmp_path / "vgg.pt"
    torch.save(ref.state_dict(), path)
    m = models.vgg11_bn(weights=path, num_classes=4)
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    assert _outputs_equal(m, ref, x)


def test_weights_enum_goes_through_get_state_dict(monkeypatch):
    """The download itself needs the network: get_state_dict is replaced by a local state_dict,
    everything around it (enum check, num_classes from the meta, strict loading) is real."""
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    local = reference_model("resnet18", seed=4, num_classes=1000)
    seen = {}

    def fake_get_state_dict(self, *args, **kwargs):
        seen.update(kwargs, weights=self)
        return local.state_dict()

    monkeypatch.setattr(type(enum), "get_state_dict", fake_get_state_dict)
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    for w in (enum, "IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        m = models.resnet18(weights=w, progress=False, backend="aten")
        assert m.fc.out_features == len(enum.meta["categories"]) == 1000
        assert _outputs_equal(m, local, x)
        assert seen == {"progress": False, "check_hash": True, "weights": enum}
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet18(weights=enum, num_classes=10)
    with pytest.raises(TypeError):
        models.resnet18(weights=torchvision.models.ResNet34_Weights.IMAGENET1K_V1)  # another model's


def test_vgg_weights_enum(monkeypatch):
    enum = torchvision.models.VGG11_BN_Weights.IMAGENET1K_V1
    local = randomize_batchnorm(torchvision.models.vgg11_bn(), torch.Generator().manual_seed(3))
    monkeypatch.setattr(type(enum), "get_state_dict", lambda self, **kw: local.state_dict())
    m = models.vgg11_bn(weights=enum)
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    assert _outputs_equal(m, local, x)


def test_legacy_pretrained(monkeypatch):
    """torchvision's deprecated ``pretrained=True`` (as in ``models.vgg16(pretrained=True)``)."""
    enum = torchvision.models.VGG11_Weights.IMAGENET1K_V1
    local = torchvision.models.vgg11()
    monkeypatch.setattr(type(enum), "get_state_dict", lambda self, **kw: local.state_dict())
    with pytest.warns(UserWarning, match="pretrained"):
        m = models.vgg11(pretrained=True)
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    assert _outputs_equal(m, local, x)
    assert models.vgg11(pretrained=False, num_classes=3).classifier[-1].out_features == 3
    with pytest.raises(ValueError, match="not both"):
        models.vgg11(pretrained=True, weights=enum)


def test_backend_is_honoured():
    ref = reference_model("resnet18", seed=6, num_classes=10)
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    outs = {}
    for b in ("reference", "cpu"):
        m = models.resnet18(weights=ref.state_dict(), num_classes=10, backend=b).eval()
        assert set(get_backends(m).values()) == {b}
        with torch.no_grad():
            outs[b] = m(x)
    assert rel_err(outs["cpu"], outs["reference"]) <= 1e-5
    v = models.vgg11(num_classes=10, backend="reference")
    assert set(get_backends(v).values()) == {"reference"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_raises_at_forward():
    with pytest.raises(ValueError, match="unknown backend"):
        models.resnet18(backend="tensorrt")  # unknown names: at construction
    m = models.resnet18(num_classes=10, backend="cuda").eval()  # known, can't run CPU tensors
    with torch.no_grad(), pytest.raises(dk.BackendUnavailable, match="runs CUDA tensors"):
        m(torch.randn(1, 3, IMAGE, IMAGE))


def test_channels_last_model():
    r = verify_model("resnet18", image_size=IMAGE, num_classes=10, channels_last=True, seed=8)
    assert r.passed, str(r)
