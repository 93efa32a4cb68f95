"""deeparch-bench lesson: the 3x3-stack table against hand-derived numbers, the gradient-flow
probe, a tiny run of the command (files, JSON keys, determinism across processes), data errors
and usage errors. The conclusions themselves are the committed run's business, not the tests'."""
import json

import pytest
import torch

from deeparch_kernels import cli, lesson
from deeparch_kernels.models import cifar_resnet

TINY = ["--depths", "8,14", "--seeds", "0,1", "--epochs", "1", "--train-samples", "48",
        "--test-samples", "16", "--grad-batch", "8", "--device", "cpu", "-q"]


def test_stack_table_by_hand():
    c = 64
    want = {  # name: (layers, weights = layers * k * k * C * C, receptive field 1 + layers * (k - 1), ReLUs)
        "one 7x7": (1, 49 * c * c, 7, 1),
        "three 3x3": (3, 3 * 9 * c * c, 7, 3),
        "one 5x5": (1, 25 * c * c, 5, 1),
        "two 3x3": (2, 2 * 9 * c * c, 5, 2),
    }
    rows = lesson.stack_table(c)
    assert [r["name"] for r in rows] == list(want)
    for r in rows:
        layers, params, rf, relus = want[r["name"]]
        assert (r["layers"], r["params"], r["receptive_field"], r["relus"]) == (layers, params, rf, relus)
        assert r["macs_per_pixel"] == params  # stride 1: every weight is one multiply-add per output pixel
    assert want["one 7x7"][1] == 200_704 and want["three 3x3"][1] == 110_592  # the seed's 49 vs 27, x 64^2


def test_receptive_field_of_deeper_stacks():
    assert lesson._receptive_field(3, 4, 2) == 9
    assert lesson._receptive_field(5, 2, 1) == 9
    assert lesson._receptive_field(1, 3, 2) == 1


def test_gradient_flow_probe_leaves_the_net_alone():
    torch.manual_seed(0)
    net = cifar_resnet(14, in_channels=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    f = lesson.gradient_flow(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in net.parameters())
    assert len(f["conv_grad_norm"]) == 13 and f["conv_names"][0] == "conv1"
    assert f["conv_names"][-1] == "layer3.1.conv2"
    assert len(f["block_grad_rms"]) == len(f["block_act_rms"]) == 7  # stem + 6 blocks
    assert all(v is not None and v > 0 for v in f["conv_grad_norm"] + f["block_grad_rms"] + f["block_act_rms"])
    assert f["grad_ratio"] == pytest.approx(f["conv_grad_norm"][0] / f["conv_grad_norm"][-1])
    assert f["signal_ratio"] == pytest.approx(f["block_grad_rms"][0] / f["block_grad_rms"][-1])
    # the stem's weight gradient, computed directly
    net.train()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert f["conv_grad_norm"][0] == pytest.approx(net.conv1.weight.grad.norm().item(), rel=1e-5)


def _synthetic(n_train=40, n_test=12):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n_train + n_test,), generator=gen)
    x = torch.randn(n_train + n_test, 1, 8, 8, generator=gen) + y.view(-1, 1, 1, 1).float()
    return lesson.Data("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 4, "synthetic")


def test_run_is_deterministic_across_worker_processes():
    s = lesson.Settings(depths=[8], seeds=[0, 1], epochs=2, grad_batch=8, jobs=1)
    one = lesson.run(s, data=_synthetic())
    two = lesson.run(lesson.Settings(**{**s.__dict__, "jobs": 2}), data=_synthetic())
    assert one["settings"]["jobs"] == 1 and two["settings"]["jobs"] == 2
    for name in ("plain-8", "resnet-8"):
        a, b = one["nets"][name], two["nets"][name]
        assert [p["seed"] for p in a["per_seed"]] == [0, 1]
        for pa, pb in zip(a["per_seed"], b["per_seed"]):
            assert pa["curves"]["train_loss"] == pb["curves"]["train_loss"]
            assert pa["curves"]["train_error"] == pb["curves"]["train_error"]
            assert pa["grad_ratio_init"] == pb["grad_ratio_init"]
    # the plain net and its residual twin start from the same weights (same seed, same shapes)
    assert one["nets"]["plain-8"]["params"] == one["nets"]["resnet-8"]["params"]


def test_tiny_run_of_the_command(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "res"
    assert cli.main(["lesson", *TINY, "--out", str(out), "--no-plot"]) == 0
    stdout = capsys.readouterr().out
    assert "## Conclusions" in stdout and "| three 3x3 | 3 | 110,592 |" in stdout
    r = json.loads((out / "lesson.json").read_text())
    for key in ("schema", "settings", "device", "seconds", "cpu_seconds", "table", "nets", "gradient_flow",
                "conclusions", "load_average"):
        assert key in r, key
    assert {"layers", "params", "macs_per_pixel", "receptive_field", "relus"} <= set(r["table"][0])
    assert list(r["nets"]) == ["plain-8", "plain-14", "resnet-8", "resnet-14"]
    for name, n in r["nets"].items():
        for key in ("final_train_error", "final_test_error", "per_seed", "curves", "grad_ratio_init",
                    "grad_ratio_epoch1", "signal_ratio_init"):
            assert key in n, (name, key)
        assert 0 <= n["final_train_error"] <= 1 and 0 <= n["final_test_error"] <= 1
        assert set(n["grad_ratio_init"]) == {"bn", "no_bn"}
        assert [p["seed"] for p in n["per_seed"]] == [0, 1]
        assert n["curves"]["epoch"] == [1] and len(n["per_seed"][0]["curves"]["test_error"]) == 1
    assert r["settings"]["train_samples_used"] == 48 and r["settings"]["depths"] == [8, 14]
    assert r["seconds"] > 0 and r["device"]["device"] == "cpu"
    assert all({"id", "claim", "reproduced", "text"} <= set(c) for c in r["conclusions"])
    md = (out / "lesson.md").read_text()
    assert "| plain-14 |" in md and "## Gradient flow" in md and "![" not in md
    assert not (out / "lesson.png").exists()  # --no-plot

    # --replot draws from the JSON alone (the figure is drawn once here: it is the slow part)
    again = tmp_path / "again"
    assert cli.main(["lesson", "--replot", str(out / "lesson.json"), "--out", str(again), "-q"]) == 0
    md2 = (again / "lesson.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert md2 == md and not (again / "lesson.png").exists()
    else:
        assert (again / "lesson.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert md2.replace("\n![degradation and gradient flow](lesson.png)\n", "") == md


def test_without_scikit_learn(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["lesson", *TINY, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "deeparch-kernels[lesson]" in err
    assert not (tmp_path / "lesson.json").exists()


def test_cifar10_missing_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["lesson", "--data", "cifar10", "--data-dir", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "no CIFAR-10 there" in err and "cifar-10-batches-py" in err and "download=True" in err
    assert cli.main(["lesson", "--data", "cifar10", "-q"]) == 1
    assert "needs --data-dir" in capsys.readouterr().err


def test_cifar10_through_torchvisions_loader(monkeypatch, tmp_path):
    import numpy as np
    import torchvision

    calls = []

    class FakeCIFAR10:  # what torchvision's CIFAR10 exposes: uint8 NHWC data, int targets
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            n = 20 if train else 10
            rng = np.random.default_rng(int(train))
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(rng.integers(0, 10, n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    d = lesson.load_cifar10_data(tmp_path)
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]  # never downloads
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32)
    assert d.in_channels == 3 and d.y_train.dtype == torch.long
    mean = d.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)  # standardised per channel on the train set
    raw = torch.as_tensor(FakeCIFAR10(tmp_path).data[3]).permute(2, 0, 1).float() / 255
    assert torch.corrcoef(torch.stack([raw.flatten(), d.x_train[3].flatten()]))[0, 1] > 0.99  # NHWC -> NCHW


@pytest.mark.parametrize("argv,needle", [
    (["--depths", "20,21"], "6n+2"),
    (["--depths", "x"], "comma-separated integers"),
    (["--seeds", ""], "at least one"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--batch-size", "1"], "--batch-size"),
    (["--data-dir", "/tmp"], "--data cifar10"),
    (["--data", "imagenet"], "invalid choice"),
    (["--backend", "nope"], "unknown backend"),
    (["--device", "tpu"], "--device"),
])
def test_usage_errors_exit_2(argv, needle, capsys):
    assert cli.main(["lesson", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_help_and_replot_errors(tmp_path, capsys):
    assert cli.main(["lesson", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--data", "--data-dir", "--depths", "--seeds", "--epochs", "--jobs", "--replot", "--out"):
        assert opt in out
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert cli.main(["lesson", "--replot", str(bad)]) == 2
    assert "not a lesson.json" in capsys.readouterr().err


@pytest.mark.gpu
def test_tiny_run_on_the_gpu(tmp_path):
    pytest.importorskip("sklearn")
    argv = [a if a != "cpu" else "cuda" for a in TINY]
    assert cli.main(["lesson", *argv, "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "lesson.json").read_text())
    assert r["device"]["device"].startswith("cuda") and r["settings"]["jobs"] == 1
