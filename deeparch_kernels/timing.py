"""The one timer of the library: ``backend="auto"``'s choice, the main job (deeparch_kernels.bench)
and the pytest-benchmark suite all time with it. Timing done right, on both devices.

GPU: warm-up calls, then per repetition: flush L2 (zero a buffer larger than L2, as
``triton.testing.do_bench`` does), record a CUDA event, run, record another; one synchronise at
the end; the median and the 20th/80th percentiles of the per-call event times. Because the flush
runs on the device between calls, host overhead hides behind it and the numbers are device time.

CPU: warm-up calls, then ``time.perf_counter`` around each call; median, p20, p80. The
providers of one case are interleaved (``Timer.many``: one call of each per round), so that load
from other processes on a shared machine falls on all of them alike.

Both stop early once ``max_time_s`` is spent (at least ``min_reps`` samples), so a 150 ms CPU
call does not take 100 repetitions. Callers rotate among several input sets (``Rotation``) when
one set would fit in the last-level cache, so repeated calls do not measure the cache.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> Timing:
    return Timing(statistics.median(samples_ms), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8),
                  len(samples_ms))


class Rotation:
    """Cycles through input sets: ``rot()`` returns the next one."""

    def __init__(self, sets: Sequence):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets = list(sets)
        self.i = 0

    def __call__(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def __len__(self) -> int:
        return len(self.sets)


def rotation_count(set_bytes: int, cache_bytes: int, *, factor: float = 4.0, max_sets: int = 16,
                   max_total_bytes: int = 2 << 30) -> int:
    """How many input sets to rotate among so their total exceeds ``factor`` x the cache (1 when
    one set already does), within ``max_sets`` and ``max_total_bytes``."""
    if set_bytes <= 0:
        return 1
    want = math.ceil(factor * cache_bytes / set_bytes)
    by_memory = max(1, max_total_bytes // set_bytes)
    return int(max(1, min(want, max_sets, by_memory)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 on a GPU; the CPU's last-level cache (32 MiB when it can't be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in base.glob("index*"):
            size = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            num = int(size.rstrip("KMG"))
            best = max(best, num * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def flush_buffer(device: torch.device, nbytes: Optional[int] = None) -> torch.Tensor:
    """A buffer larger than the GPU's L2: zeroing it between calls flushes the cache."""
    nbytes = nbytes or max(256 << 20, 2 * last_level_cache_bytes(device))
    return torch.empty(int(nbytes), dtype=torch.int8, device=device)


class Timer:
    """Times callables on one device. ``warmup``: calls before timing; ``reps``: at most this many
    timed calls; ``min_reps``; ``max_time_s``: stop adding reps after this long."""

    def __init__(self, device: torch.device, *, warmup: int = 3, reps: int = 50, min_reps: int = 5,
                 max_time_s: float = 1.0, flush_bytes: Optional[int] = None):
        self.device = device
        self.warmup = max(0, int(warmup))
        self.reps = max(1, int(reps))
        self.min_reps = max(1, min(int(min_reps), self.reps))
        self.max_time_s = float(max_time_s)
        self._flush = flush_buffer(device, flush_bytes) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> Timing:
        if self.device.type == "cuda":
            return self._time_cuda(fn)
        return self._time_cpu(fn)

    def many(self, fns: Dict[str, Callable[[], object]]) -> Tuple[Dict[str, Timing], Dict[str, BaseException]]:
        """Time several callables of one case. On a CPU they are interleaved, one call of each per
        round, so that load from other processes falls on all of them alike and their ratios hold;
        on a GPU each is timed in turn (device events are not disturbed by host load). A callable
        that raises is dropped and its exception returned."""
        errors: Dict[str, BaseException] = {}
        if self.device.type == "cuda":
            out = {}
            for k, f in fns.items():
                try:
                    out[k] = self(f)
                except Exception as e:  # noqa: BLE001
                    errors[k] = e
            return out, errors
        live = dict(fns)

        def call(k):
            try:
                live[k]()
                return True
            except Exception as e:  # noqa: BLE001
                errors[k] = e
                del live[k]
                return False

        for k in list(live):
            for _ in range(max(1, self.warmup)):
                if not call(k):
                    break
        samples: Dict[str, List[float]] = {k: [] for k in live}
        deadline = time.perf_counter() + self.max_time_s * max(1, len(live))
        for i in range(self.reps):
            for k in list(live):
                t0 = time.perf_counter()
                if call(k):
                    samples[k].append((time.perf_counter() - t0) * 1e3)
            if i + 1 >= self.min_reps and time.perf_counter() > deadline:
                break
        return {k: summarize(v) for k, v in samples.items() if k in live and v}, errors

    def _time_cpu(self, fn: Callable[[], object]) -> Timing:
        for _ in range(self.warmup):
            fn()
        samples: List[float] = []
        deadline = time.perf_counter() + self.max_time_s
        for i in range(self.reps):
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            samples.append((t1 - t0) * 1e3)
            if i + 1 >= self.min_reps and t1 > deadline:
                break
        return summarize(samples)

    def _time_cuda(self, fn: Callable[[], object]) -> Timing:
        dev = self.device
        with torch.cuda.device(dev):
            fn()  # first call: compilation, autotuning, allocator
            torch.cuda.synchronize(dev)
            # Estimate one call (with the flush) to size the run within max_time_s.
            t0 = time.perf_counter()
            for _ in range(max(1, self.warmup)):
                self._flush.zero_()
                fn()
            torch.cuda.synchronize(dev)
            per_call = (time.perf_counter() - t0) / max(1, self.warmup)
            reps = self.reps
            if per_call > 0:
                reps = min(reps, max(self.min_reps, int(self.max_time_s / per_call)))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for s, e in zip(starts, ends):
                self._flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(dev)
            samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return summarize(samples)


class Budget:
    """A soft wall-clock budget for the timing part of a run (0 or None: unlimited). Work that
    can be dropped (torch.compile baselines, further cases) asks ``allows(cost_s)`` first."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = float(seconds) if seconds else 0.0
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if not self.seconds else self.seconds - self.elapsed()

    def allows(self, cost_s: float = 0.0) -> bool:
        return self.left() > cost_s
