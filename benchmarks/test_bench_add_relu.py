"""Residual add + ReLU: our backends (out of place and in place) vs eager ``relu(a + b)``,
torchvision's ``out += identity; out = relu(out)`` and torch.compile, on the anchor table's
shapes (GPU) or a CPU set that includes 32x256x32x32 fp32 (8.4M elements).

``test_cpu_bar_8m``: the foundation issue's bar, our C++ add+ReLU ("cpu") >= 1.5x eager
``torch.relu(a + b)`` for >= 8M-element fp32 tensors, measured by the project's interleaved A/B
timer (timing.Timer.many)."""
import pytest
import torch

import suite
from deeparch_kernels.bench.cases import AddCase
from deeparch_kernels.bench.specs import add_inputs
from deeparch_kernels.timing import Timer

OURS = suite.our_backends()
CASES = suite.cases("add_relu")


@pytest.mark.parametrize("provider", [p.name for p in suite.providers(CASES[0])] if CASES else [])
@pytest.mark.parametrize("case", CASES, ids=suite.case_id)
def test_add_relu(benchmark, case, provider):
    suite.bench_case(benchmark, case, provider)


@pytest.mark.skipif(suite.GPU or "cpu" not in OURS, reason="the CPU bar: needs the C++ CPU backend on a CPU run")
def test_cpu_bar_8m(benchmark):
    """cpu add_relu vs eager relu(a + b), fp32, 32x256x32x32 = 8,388,608 elements, timed once:
    pytest-benchmark times one interleaved A/B measurement (timing.Timer.many)."""
    import deeparch_kernels as dk

    case = AddCase((32, 256, 32, 32), torch.float32, "channels_last")
    assert case.numel >= 8_000_000
    (a, b), = add_inputs(case, suite.DEVICE, 1)
    fns = {"cpu": lambda: dk.add_relu(a, b, backend="cpu"), "eager": lambda: torch.relu(a + b)}
    assert torch.equal(fns["cpu"](), fns["eager"]())
    timer = Timer(suite.DEVICE, warmup=3, reps=25, min_reps=25, max_time_s=60)
    benchmark.group = "foundation bar: add_relu 8.4M fp32 (cpu vs eager, interleaved)"
    t, errors = benchmark.pedantic(timer.many, args=(fns,), rounds=1, iterations=1)
    assert not errors, errors
    speedup = t["eager"].median_ms / t["cpu"].median_ms
    print(f"\ncpu add_relu vs eager relu(a + b), fp32 {case.label} ({case.numel / 1e6:.1f}M): "
          f"{t['cpu'].median_ms:.2f} ms vs {t['eager'].median_ms:.2f} ms = {speedup:.2f}x (bar: 1.5x)")
    benchmark.extra_info.update(suite.env_info(), provider="cpu", speedup_vs_eager=speedup, bar=1.5,
                                cpu_median_ms=t["cpu"].median_ms, eager_median_ms=t["eager"].median_ms)
    assert speedup >= 1.5, f"cpu add_relu is {speedup:.2f}x eager at 8.4M fp32 elements; the bar is 1.5x"
