"""Support for the pytest-benchmark suite in benchmarks/: the same cases and providers as
``deeparch-bench``, sized for the device, and one helper that times a call correctly.

Environment:
  DEEPARCH_BENCH_DEVICE          cpu / cuda (default: cuda when available)
  DEEPARCH_BENCH_SHAPES          a --shapes spec for the op benchmarks (default: anchors on a
                                 GPU; a small CPU set: the 8.4M-element add+ReLU of the foundation
                                 bar, two ResNet layers at batch 1)
  DEEPARCH_BENCH_COMPILE         0 to drop the torch.compile providers (default 1)
  DEEPARCH_BENCH_MODELS          comma list (default: all three on a GPU, resnet18 on a CPU)
  DEEPARCH_BENCH_COMPILE_MODELS  1 to compile whole models on a CPU too (default: GPU only)

GPU timing: pytest-benchmark's own clock runs around ``fn(); torch.cuda.synchronize()`` (host
time, including the launch and the synchronisation), and the device time measured with CUDA
events and an L2 flush (timing.Timer, as the CLI) is stored in each benchmark's ``extra_info``
as ``device_median_ms`` / ``device_p20_ms`` / ``device_p80_ms``: read those for kernels under
~50 us.
"""
from __future__ import annotations

import os
import time
from typing import Callable, List, Optional

import torch

from .cases import AddCase, ConvCase, build_cases, dtype_name
from ..timing import last_level_cache_bytes
from .env import device_name, git_info, resolve_device
from ..timing import Rotation, Timer, rotation_count, synchronize

DEVICE = resolve_device(os.environ.get("DEEPARCH_BENCH_DEVICE") or None)
GPU = DEVICE.type == "cuda"
COMPILE = os.environ.get("DEEPARCH_BENCH_COMPILE", "1") != "0"
COMPILE_MODELS = COMPILE and (GPU or os.environ.get("DEEPARCH_BENCH_COMPILE_MODELS", "0") == "1")

# The CPU default: small enough for a couple of minutes on 2 cores, and the foundation bar.
CPU_ADD = [AddCase((32, 256, 32, 32)), AddCase((32, 64, 56, 56)), AddCase((4, 64, 28, 28))]
CPU_CONV = [ConvCase(1, C, H, H, C, 3, s, None, torch.float32, "channels_last", form, "resnet")
            for C, H, s in [(64, 56, 1), (256, 14, 1), (128, 56, 2)] for form in ("bias_relu", "residual")]


def _cases():
    spec = os.environ.get("DEEPARCH_BENCH_SHAPES")
    if spec:
        return build_cases([s.strip() for s in spec.split(",") if s.strip()], DEVICE.type)
    if GPU:
        return build_cases(["anchors"], "cuda")
    return None


def add_cases() -> List[AddCase]:
    c = _cases()
    return c.add if c is not None else CPU_ADD


def conv_cases() -> List[ConvCase]:
    c = _cases()
    return c.conv if c is not None else CPU_CONV


def model_names() -> List[str]:
    env = os.environ.get("DEEPARCH_BENCH_MODELS")
    if env is not None:
        return [m.strip() for m in env.split(",") if m.strip() and m.strip() != "none"]
    return ["vgg16", "resnet18", "resnet50"] if GPU else ["resnet18"]


def our_backends() -> List[str]:
    """Our backends that can be timed here (not 'reference'; never Triton's CPU interpreter)."""
    import deeparch_kernels as dk

    return [n for n, a in dk.available_backends(DEVICE).items()
            if a.available and n != "reference" and not (n == "triton" and not GPU)]


def add_case_id(c: AddCase) -> str:
    return f"{c.label}-{dtype_name(c.dtype)}-{c.fmt}"


def conv_case_id(c: ConvCase) -> str:
    return f"{c.C}-{c.K}-{c.H}x{c.W}-s{c.stride}-N{c.N}-{c.form}-{dtype_name(c.dtype)}-{c.memory_format}"


def n_sets(case) -> int:
    return rotation_count(case.bytes, last_level_cache_bytes(DEVICE))


_ENV = None
_TIMER: Optional[Timer] = None


def env_info() -> dict:
    global _ENV
    if _ENV is None:
        _ENV = {"device": str(DEVICE), "device_name": device_name(DEVICE), "torch": torch.__version__,
                "git_commit": git_info().get("commit")}
    return _ENV


def bench_call(benchmark, fn: Callable[[], object], *, group: str, extra: Optional[dict] = None,
               max_time_s: float = 1.0) -> None:
    """Time ``fn`` with pytest-benchmark's pedantic mode, synchronising on a GPU (see above)."""
    benchmark.group = group
    benchmark.extra_info.update(env_info())
    benchmark.extra_info.update(extra or {})
    fn()  # warm: compilation, autotuning, allocator
    synchronize(DEVICE)
    if GPU:
        global _TIMER
        if _TIMER is None or _TIMER.max_time_s != max_time_s:
            _TIMER = Timer(DEVICE, warmup=5, reps=100, min_reps=10, max_time_s=max_time_s)
        t = _TIMER(fn)
        benchmark.extra_info.update(device_median_ms=t.median_ms, device_p20_ms=t.p20_ms,
                                    device_p80_ms=t.p80_ms, device_reps=t.reps)

        def target():
            fn()
            torch.cuda.synchronize(DEVICE)
    else:
        target = fn
    t0 = time.perf_counter()
    target()
    one = max(time.perf_counter() - t0, 1e-6)
    rounds = int(max(5, min(200, max_time_s / one)))
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=2 if one < 0.05 else 1, iterations=1)


def compiled(fn: Callable, first_args: tuple) -> Callable:
    """torch.compile(fn) for one case (dynamic=False, after a dynamo reset), compiled now."""
    torch._dynamo.reset()
    c = torch.compile(fn, dynamic=False)
    c(*first_args)
    synchronize(DEVICE)
    return c


def rotating(fn: Callable, sets: List[tuple]) -> Callable[[], object]:
    rot = Rotation(sets)
    return lambda: fn(*rot())
