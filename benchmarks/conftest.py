"""pytest-benchmark suite for deeparch-kernels: the same cases and providers as deeparch-bench
(deeparch_kernels/bench), parametrised by provider: each of our available backends, eager
PyTorch, torchvision's pattern, torch.compile.

    python -m pytest benchmarks/ --benchmark-only                       # CPU: ~1-2 minutes
    python -m pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/$(date +%F)-cpu-pytest.json

See benchmarks/README.md and benchmarks/suite.py (environment switches)."""
import pytest
import torch

import suite


def pytest_report_header(config):
    e = suite.env_info()
    return (f"deeparch-kernels benchmarks on {e['device']} ({e['device_name']}), torch {e['torch']}, "
            f"commit {(e['git_commit'] or '?')[:12]}; ours: {', '.join(suite.our_backends()) or 'none'}; "
            f"compile {'on' if suite.COMPILE else 'off'}")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Every stored run says what it ran on."""
    from deeparch_kernels.bench.env import environment

    output_json["deeparch"] = environment(suite.DEVICE)


@pytest.fixture(scope="session")
def device():
    return suite.DEVICE


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield
