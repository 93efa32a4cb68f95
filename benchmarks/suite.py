"""Helpers of the pytest-benchmark suite in this folder (as tests/helpers.py for the tests): the
same cases and providers as ``deeparch-bench`` (deeparch_kernels.bench.specs), sized for the
device, and one helper that times a call correctly.

Environment:
  DEEPARCH_BENCH_DEVICE          cpu / cuda (default: cuda when available)
  DEEPARCH_BENCH_SHAPES          a --shapes spec for the op benchmarks (default: anchors on a
                                 GPU; a small CPU set: the 8.4M-element add+ReLU of the foundation
                                 bar, two ResNet layers at batch 1)
  DEEPARCH_BENCH_COMPILE         0 to drop the torch.compile providers (default 1)
  DEEPARCH_BENCH_MODELS          comma list (default: all three on a GPU, resnet18 on a CPU)
  DEEPARCH_BENCH_COMPILE_MODELS  1 to compile whole models on a CPU too (default: GPU only)

Each case is timed once, by pytest-benchmark. On a GPU each round is ``fn()`` between two CUDA
events and a synchronise, after an L2 flush in pedantic's untimed setup: pytest-benchmark's
clock gives the host time (launch and synchronisation included), the events of the same calls
the device time, stored in each benchmark's ``extra_info`` as ``device_median_ms`` /
``device_p20_ms`` / ``device_p80_ms``: read those for kernels under ~50 us.
"""
import os
import time
from typing import Callable, List, Optional

import torch

from deeparch_kernels.testing import BENCH_MODELS
from deeparch_kernels.timing import flush_buffer, last_level_cache_bytes, rotation_count, summarize, synchronize
from deeparch_kernels.bench.cases import AddCase, ConvCase, build_cases, dtype_name
from deeparch_kernels.bench.env import device_name, git_info, resolve_device
from deeparch_kernels.bench.specs import SPECS

DEVICE = resolve_device(os.environ.get("DEEPARCH_BENCH_DEVICE") or None)
GPU = DEVICE.type == "cuda"
COMPILE = os.environ.get("DEEPARCH_BENCH_COMPILE", "1") != "0"
COMPILE_MODELS = COMPILE and (GPU or os.environ.get("DEEPARCH_BENCH_COMPILE_MODELS", "0") == "1")

# The CPU default: small enough for a couple of minutes on 2 cores, and the foundation bar.
CPU_CASES = {"add_relu": [AddCase((32, 256, 32, 32)), AddCase((32, 64, 56, 56)), AddCase((4, 64, 28, 28))],
             "fused_conv2d": [ConvCase(1, C, H, H, C, 3, s, None, torch.float32, "channels_last", form, "resnet")
                              for C, H, s in [(64, 56, 1), (256, 14, 1), (128, 56, 2)]
                              for form in ("bias_relu", "residual")]}


def cases(op: str) -> list:
    """The cases of an op family (specs.SPECS key): DEEPARCH_BENCH_SHAPES, else the anchor table
    on a GPU, else CPU_CASES."""
    shapes = os.environ.get("DEEPARCH_BENCH_SHAPES")
    if not shapes and not GPU:
        return CPU_CASES[op]
    cs = build_cases([s.strip() for s in (shapes or "anchors").split(",") if s.strip()], DEVICE.type)
    return [c for c in cs.add + cs.conv if isinstance(c, SPECS[op].case_type)]


def model_names() -> List[str]:
    env = os.environ.get("DEEPARCH_BENCH_MODELS")
    if env is not None:
        return [m.strip() for m in env.split(",") if m.strip() and m.strip() != "none"]
    return list(BENCH_MODELS) if GPU else ["resnet18"]


def our_backends() -> List[str]:
    """Our backends that can be timed here (not 'reference'; never Triton's CPU interpreter)."""
    import deeparch_kernels as dk

    return [n for n, a in dk.available_backends(DEVICE).items()
            if a.available and n != "reference" and not (n == "triton" and not GPU)]


def case_id(c) -> str:
    if isinstance(c, AddCase):
        return f"{c.label}-{dtype_name(c.dtype)}-{c.fmt}"
    return f"{c.C}-{c.K}-{c.H}x{c.W}-s{c.stride}-N{c.N}-{c.form}-{dtype_name(c.dtype)}-{c.memory_format}"


def providers(case) -> list:
    """The providers of a case (specs.py), as deeparch-bench times them."""
    spec = SPECS[case.op]
    return spec.providers(case, our_backends(), spec.ops, COMPILE)


def bench_case(benchmark, case, provider: str) -> None:
    """One provider on one case: its inputs (rotated when one set fits in the cache), compiled
    once for the compile provider, timed by bench_call."""
    spec = SPECS[case.op]
    prov = {p.name: p for p in providers(case)}[provider]
    sets = spec.inputs(case, DEVICE, rotation_count(case.bytes, last_level_cache_bytes(DEVICE)))
    fn, _ = prov.timed(sets, DEVICE)
    conv = isinstance(case, ConvCase)
    bench_call(benchmark, fn, group=f"{'conv' if conv else 'add_relu'} {case.label}" + (f" {case.form}" if conv else "")
               + f" {dtype_name(case.dtype)} {case.memory_format if conv else case.fmt}",
               extra={"provider": provider, "op": prov.op, "case": case.label, "form": case.form if conv else None,
                      "dtype": dtype_name(case.dtype), "bytes": case.bytes, "flops": case.flops if conv else None,
                      "input_sets": len(sets)})


_ENV = None
_FLUSH: Optional[torch.Tensor] = None


def env_info() -> dict:
    global _ENV
    if _ENV is None:
        _ENV = {"device": str(DEVICE), "device_name": device_name(DEVICE), "torch": torch.__version__,
                "git_commit": git_info().get("commit")}
    return _ENV


def bench_call(benchmark, fn: Callable[[], object], *, group: str, extra: Optional[dict] = None,
               max_time_s: float = 1.0) -> None:
    """Time ``fn`` once with pytest-benchmark's pedantic mode; on a GPU with device events too
    (see above)."""
    global _FLUSH
    benchmark.group = group
    benchmark.extra_info.update(env_info())
    benchmark.extra_info.update(extra or {})
    fn()  # warm: compilation, autotuning, allocator
    synchronize(DEVICE)
    t0 = time.perf_counter()
    fn()
    synchronize(DEVICE)
    one = max(time.perf_counter() - t0, 1e-6)
    rounds, warmup = int(max(5, min(200, max_time_s / one))), 2 if one < 0.05 else 1
    if not GPU:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return
    if _FLUSH is None:
        _FLUSH = flush_buffer(DEVICE)
    events = []

    def flush() -> None:  # pedantic's setup: untimed, before every round
        _FLUSH.zero_()

    def target():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(DEVICE)
        events.append((start, end))

    benchmark.pedantic(target, setup=flush, rounds=rounds, warmup_rounds=warmup,
                       iterations=1)
    if len(events) > warmup:  # none with --benchmark-disable: the target ran once, untimed
        t = summarize([s.elapsed_time(e) for s, e in events[warmup:]])
        benchmark.extra_info.update(device_median_ms=t.median_ms, device_p20_ms=t.p20_ms, device_p80_ms=t.p80_ms,
                                    device_reps=t.reps)

