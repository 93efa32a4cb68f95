"""backend="auto" never returns an unchecked output and never a slower one: implementations
plugged in with backends.register that are wrong, swallow NaN, raise, or are slow never reach the
caller; choices and exclusions persist on disk per machine and software; every dtype torch runs
runs (float64 gradcheck through the public functions and a fused block)."""
import importlib
import json
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk
from deeparch_kernels import backends
from deeparch_kernels.ops import conv as conv_op

add_relu_op = importlib.import_module("deeparch_kernels.ops.add_relu")  # the module, not the function

from helpers import randn


@pytest.fixture(autouse=True)
def fresh_choices(tmp_path, monkeypatch):
    """Each test starts with no remembered choice, and its own cache directory."""
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", str(tmp_path / "cache"))
    backends.clear_cache()
    yield
    backends.clear_cache()


def _special(t):
    """t with a NaN, +Inf and -Inf planted (positions that survive a ReLU differently)."""
    flat = t.view(-1)
    flat[0], flat[1], flat[2] = float("nan"), float("inf"), float("-inf")
    return t


# Deliberately bad implementations, for both ops (a backend gets the op's own arguments).
def _wrong_add_relu(x, identity):
    return torch.relu(x + identity) + 1e-2 * torch.relu(x + identity).abs().max()


def _nan_swallowing_add_relu(x, identity):
    return torch.clamp_min(x + identity, 0).nan_to_num(0.0)  # like fmaxf / oneDNN's ReLU


def _raising(*args):
    raise RuntimeError("kernel launch failed: out of resources")


def _slow_add_relu(x, identity):
    time.sleep(0.003)
    return torch.relu(x + identity)


def _wrong_conv(x, w, b, r, stride, padding, relu):
    y = F.conv2d(x, w, b, stride, padding)
    y[:, 0] = 0  # forgets one output channel
    y = y + r if r is not None else y
    return torch.relu(y) if relu else y


def _nan_swallowing_conv(x, w, b, r, stride, padding, relu):
    y = F.conv2d(x, w, b, stride, padding)
    y = y + r if r is not None else y
    return torch.fmax(y, torch.zeros_like(y)) if relu else y


def _slow_conv(x, w, b, r, stride, padding, relu):
    time.sleep(0.003)
    return conv_op._reference(x, w, b, r, stride, padding, relu)


ADD_RELU_BAD = {"wrong": _wrong_add_relu, "nan_swallowing": _nan_swallowing_add_relu,
                "raising": _raising}
CONV_BAD = {"wrong": _wrong_conv, "nan_swallowing": _nan_swallowing_conv, "raising": _raising}


@pytest.fixture
def plug():
    """plug(op, name, impl): registered for this test only (tried first by auto on the CPU)."""
    added = []

    def _plug(op, name, impl):
        backends.register(op, name, impl, devices=("cpu",))
        added.append((op, name))

    yield _plug
    for op, name in added:
        backends.unregister(op, name)


@pytest.mark.parametrize("kind", list(ADD_RELU_BAD))
def test_bad_add_relu_never_reaches_the_caller(kind, plug, gen):
    plug("add_relu", "bad", ADD_RELU_BAD[kind])
    x, y = _special(randn(3, 5, 7, gen=gen)), randn(3, 5, 7, gen=gen)
    with pytest.warns(RuntimeWarning, match=r"backend 'bad' is not used for add_relu"):
        out = dk.add_relu(x, y)
    assert torch.equal(out.nan_to_num(), torch.relu(x + y).nan_to_num())
    assert torch.equal(out.isnan(), torch.relu(x + y).isnan())
    (ex,) = [e for e in backends.exclusions() if e.backend == "bad"]
    assert ex.op == "add_relu" and ex.reason
    if kind == "raising":
        assert "out of resources" in ex.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again for the same key
        out2 = dk.add_relu(x.clone(), y)
    assert torch.equal(out2.nan_to_num(), out.nan_to_num())


@pytest.mark.parametrize("kind", list(CONV_BAD))
@pytest.mark.parametrize("residual", [False, True])
def test_bad_conv_never_reaches_the_caller(kind, residual, plug, gen):
    plug("fused_conv2d", "bad", CONV_BAD[kind])
    x, w, b = _special(randn(2, 3, 9, 9, gen=gen)), randn(5, 3, 3, 3, gen=gen), randn(5, gen=gen)
    r = randn(2, 5, 9, 9, gen=gen) if residual else None
    with pytest.warns(RuntimeWarning, match=r"backend 'bad' is not used for fused_conv2d"):
        out = dk.fused_conv2d(x, w, b, residual=r)
    want = conv_op._reference(x, w, b, r, [1, 1], [1, 1], True)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.allclose(out.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)
    assert any(e.backend == "bad" and e.op == "fused_conv2d" for e in backends.exclusions())


def test_slow_plugin_loses_the_timing(plug, gen):
    plug("add_relu", "slow", _slow_add_relu)
    plug("fused_conv2d", "slow", _slow_conv)
    x, y = randn(4, 8, 8, gen=gen), randn(4, 8, 8, gen=gen)
    assert torch.equal(dk.add_relu(x, y), torch.relu(x + y))
    dk.fused_conv2d(randn(1, 3, 8, 8, gen=gen), randn(4, 3, 3, 3, gen=gen))
    chosen = {k[0]: v for k, v in backends.cached_choices().items()}
    assert chosen["add_relu"] != "slow" and chosen["fused_conv2d"] != "slow"
    assert not backends.exclusions()  # slow is right: timed, not excluded


def test_a_good_plugin_is_used_when_faster(plug, monkeypatch, gen):
    calls = []

    def good(x, identity):
        calls.append(1)
        return torch.relu(x + identity)

    plug("add_relu", "good", good)
    monkeypatch.setattr(backends, "_time", lambda device, spec, trusted, args:
                        {n: (0.5 if n == "good" else 1.0) for n in trusted})
    x, y = randn(16, gen=gen), randn(16, gen=gen)
    dk.add_relu(x, y)
    assert backends.cached_choices()[next(iter(backends.cached_choices()))] == "good"
    n = len(calls)
    dk.add_relu(x, y)
    assert len(calls) == n + 1  # the fast path runs it


@pytest.mark.parametrize("ms,want", [({"aten": 1.0, "cpu": 0.98}, "aten"),  # within the margin
                                     ({"aten": 1.0, "cpu": 0.95}, "cpu"),
                                     ({"aten": 1.0, "cpu": 1.2}, "aten")])
def test_ours_must_beat_aten_by_the_margin(ms, want, monkeypatch, gen):
    if not dk.available_backends("cpu")["cpu"].available:
        pytest.skip("C++ extension not built")
    monkeypatch.setattr(backends, "_time", lambda device, spec, trusted, args:
                        {n: ms[n] for n in trusted})
    dk.add_relu(randn(10, gen=gen), randn(10, gen=gen))
    assert list(backends.cached_choices().values()) == [want]


@pytest.mark.parametrize("ms,want", [({"early": 0.95, "cpu": 0.94, "aten": 1.0}, "early"),  # a tie
                                     ({"early": 0.95, "cpu": 0.90, "aten": 1.0}, "cpu"),
                                     ({"early": 0.90, "cpu": 0.80, "aten": 0.82}, "aten")])
def test_a_later_one_of_ours_must_beat_an_earlier_by_the_margin(ms, want, plug, monkeypatch, gen):
    """Among ours, ties go to the earlier in the order (a plugin comes before "cpu"), as ties
    with aten go to aten: the one chosen still has to beat aten by the margin."""
    if not dk.available_backends("cpu")["cpu"].available:
        pytest.skip("C++ extension not built")
    plug("add_relu", "early", lambda x, y: torch.relu(x + y))
    assert backends._order("add_relu", torch.device("cpu"))[:2] == ["early", "cpu"]
    monkeypatch.setattr(backends, "_time", lambda device, spec, trusted, args:
                        {n: ms[n] for n in trusted})
    dk.add_relu(randn(10, gen=gen), randn(10, gen=gen))
    assert list(backends.cached_choices().values()) == [want]


def test_no_timing_takes_the_first_checked_candidate(plug, monkeypatch, gen):
    monkeypatch.setenv("DEEPARCH_AUTOTUNE", "0")
    plug("add_relu", "wrong", _wrong_add_relu)
    monkeypatch.setattr(backends, "_time", lambda *a: pytest.fail("timed with DEEPARCH_AUTOTUNE=0"))
    with pytest.warns(RuntimeWarning, match="'wrong' is not used"):
        out = dk.add_relu(randn(10, gen=gen), randn(10, gen=gen))
    assert "wrong" not in backends.cached_choices().values()
    assert torch.isfinite(out).all()


def test_every_candidate_failing_names_every_reason(monkeypatch):
    backends.register("only_bad", "bad1", _raising, devices=("cpu",))
    backends.register("only_bad", "bad2", _raising, devices=("cpu",))
    backends.define_op("only_bad", check=lambda out, *a: None)
    try:
        with pytest.warns(RuntimeWarning):
            with pytest.raises(RuntimeError, match=r"(?s)no backend could run.*bad1: raised.*bad2: raised"):
                backends.choose("only_bad", "auto", torch.device("cpu"), ("k",), (torch.ones(1),))
    finally:
        backends.unregister("only_bad", "bad1")
        backends.unregister("only_bad", "bad2")


def test_check_bounds_catch_small_real_errors(gen):
    """The conv check is tight enough for a bug that is small next to the output: a bias added
    twice, a tap dropped at the border, one ulp-scale noise is accepted."""
    x, w, b = randn(2, 8, 7, 7, gen=gen), randn(6, 8, 3, 3, gen=gen), randn(6, gen=gen) * 0.1
    args = (x, w, b, None, [1, 1], [1, 1], True)
    good = conv_op._reference(*args)
    assert conv_op._check(good, *args) is None
    assert conv_op._check(good * (1 + 2 ** -22), *args) is None
    assert conv_op._check(torch.relu(F.conv2d(x, w, b, 1, 1) + b[:, None, None]), *args) is not None
    dropped, w_no_centre = good.clone(), w.clone()
    w_no_centre[:, :, 1, 1] = 0  # one output pixel misses its centre tap
    dropped[:, :, 3, 3] = torch.relu(F.conv2d(x, w_no_centre, b, 1, 1))[:, :, 3, 3]
    assert conv_op._check(dropped, *args) is not None
    assert "memory format" in conv_op._check(good.contiguous(memory_format=torch.channels_last), *args)
    nan_x = x.clone()
    nan_x[0, 0, 3, 3] = float("nan")
    args = (nan_x, w, b, None, [1, 1], [1, 1], True)
    assert "NaN" in conv_op._check(torch.fmax(F.conv2d(nan_x, w, b, 1, 1), torch.tensor(0.0)), *args)


def test_half_precision_bounds_accept_torch_itself(gen):
    """Stock PyTorch in half precision passes the check it holds our kernels to (the bound
    scales with the dtype's rounding and the reduction length)."""
    for dt in (torch.float16, torch.bfloat16):
        x = randn(2, 64, 9, 9, gen=gen, dtype=dt)
        w, b = randn(32, 64, 3, 3, gen=gen, dtype=dt) * 0.05, randn(32, gen=gen, dtype=dt)
        r = randn(2, 32, 9, 9, gen=gen, dtype=dt)
        args = (x, w, b, r, [1, 1], [1, 1], True)
        fused_once = torch.relu((F.conv2d(x.float(), w.float(), b.float(), 1, 1) + r.float())).to(dt)
        assert conv_op._check(fused_once, *args) is None, dt
        assert add_relu_op._check(torch.relu(x.float() + x.float()).to(dt), x, x) is None


# --------------------------------------------------------------------------- the disk cache

def _cache_file():
    files = backends.choice_cache.files()
    assert len(files) == 1, files
    return files[0]


def test_choices_persist_across_processes_without_checks(monkeypatch, gen):
    x, y = randn(12, gen=gen), randn(12, gen=gen)
    dk.add_relu(x, y)
    first = dict(backends.cached_choices())
    backends.choice_cache.flush()
    data = json.loads(_cache_file().read_text())
    assert list(data["choices"].values()) == list(first.values())
    assert data["identity"]["torch"] == torch.__version__
    # A new process: nothing in memory, the file read back; nothing is checked or timed.
    backends._forget()
    backends.choice_cache.reset()
    monkeypatch.setattr(backends, "_verify", lambda *a: pytest.fail("verified again"))
    monkeypatch.setattr(backends, "_time", lambda *a: pytest.fail("timed again"))
    dk.add_relu(x, y)
    assert dict(backends.cached_choices()) == first


def test_exclusions_persist(plug, monkeypatch, gen):
    plug("add_relu", "wrong", _wrong_add_relu)
    with pytest.warns(RuntimeWarning):
        dk.add_relu(randn(12, gen=gen), randn(12, gen=gen))
    backends._forget()
    backends.choice_cache.reset()
    monkeypatch.setattr(backends, "_verify", lambda *a: pytest.fail("verified again"))
    dk.add_relu(randn(12, gen=gen), randn(12, gen=gen))
    assert [e.backend for e in backends.exclusions()] == ["wrong"]


@pytest.mark.parametrize("damage", ["garbage", "schema", "identity", "entries"])
def test_a_corrupt_or_foreign_cache_is_ignored(damage, gen):
    x, y = randn(12, gen=gen), randn(12, gen=gen)
    dk.add_relu(x, y)
    backends.choice_cache.flush()
    path = _cache_file()
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    else:
        if damage == "schema":
            data["schema"] = 99
        elif damage == "identity":
            data["identity"]["torch"] = "0.0.1"
        else:
            data["choices"] = {k: ["cuda"] for k in data["choices"]}
        path.write_text(json.dumps(data))
    backends._forget()
    backends.choice_cache.reset()
    with pytest.warns(RuntimeWarning, match="ignoring the choice cache"):
        out = dk.add_relu(x, y)
    assert torch.equal(out, torch.relu(x + y))
    backends.choice_cache.flush()
    assert json.loads(path.read_text())["schema"] == backends.ChoiceCache.SCHEMA  # rewritten whole


def test_cache_file_is_keyed_by_versions(monkeypatch):
    cpu = torch.device("cpu")
    a = backends.choice_cache.path(cpu)
    real = backends.ChoiceCache.identity
    monkeypatch.setattr(backends.ChoiceCache, "identity",
                        lambda self, d: {**real(self, d), "torch": "9.9.9"})
    backends.choice_cache.reset()
    assert backends.choice_cache.path(cpu) != a


def test_cache_can_be_switched_off(monkeypatch, tmp_path, gen):
    monkeypatch.setenv("DEEPARCH_CACHE_DIR", "off")
    backends.choice_cache.reset()
    dk.add_relu(randn(12, gen=gen), randn(12, gen=gen))
    backends.choice_cache.flush()
    assert backends.choice_cache.files() == [] and not (tmp_path / "cache").exists()


def test_in_memory_choices_are_bounded(monkeypatch, gen):
    monkeypatch.setattr(backends, "_CHOICES_MAX", 8)
    for n in range(1, 21):
        dk.add_relu(randn(n, gen=gen), randn(n, gen=gen))
    assert len(backends.cached_choices()) == 8


# --------------------------------------------------------------------------- every dtype torch runs

def test_float64_gradcheck_through_the_public_functions(gen):
    x = randn(2, 3, 6, 5, gen=gen, dtype=torch.float64).requires_grad_()
    w = randn(4, 3, 3, 3, gen=gen, dtype=torch.float64).requires_grad_()
    b = randn(4, gen=gen, dtype=torch.float64).requires_grad_()
    r = randn(2, 4, 6, 5, gen=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: dk.fused_conv2d(a[0], a[1], a[2], residual=a[3]), (x, w, b, r))
    assert torch.autograd.gradcheck(lambda a, c: dk.add_relu(a, c), (x, randn(2, 3, 6, 5, gen=gen, dtype=torch.float64).requires_grad_()))
    y = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: dk.add_relu_(a * 1, c), (y, x))
    with pytest.raises(dk.BackendUnavailable, match="float64"):
        dk.add_relu(x, x, backend="cpu")


@pytest.mark.parametrize("train", [False, True])
def test_float64_gradcheck_through_a_fused_block(train, gen):
    from torch import nn

    block = dk.nn.FusedBasicBlock(4, 4).double()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    block.train(train)
    x = randn(2, 4, 5, 5, gen=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,))


def test_fused_model_in_float64_matches_torchvision(gen):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).double().eval()
    fused = dk.fuse(ref).eval()
    x = randn(1, 3, 40, 40, gen=gen, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fused(x), ref(x), rtol=1e-10, atol=1e-10)


def test_cli_shows_and_clears_the_cache(capsys, gen):
    from deeparch_kernels.cli import main

    dk.add_relu(randn(12, gen=gen), randn(12, gen=gen))
    backends.choice_cache.flush()
    assert main(["cache"]) == 0
    shown = capsys.readouterr().out
    assert "1 file(s)" in shown and "1 choices" in shown and torch.__version__ in shown
    assert main(["cache", "--clear"]) == 0
    assert "deleted 1 file(s)" in capsys.readouterr().out
    assert backends.choice_cache.files() == []
