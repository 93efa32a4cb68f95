"""Timing of the ops, each case's providers side by side on the same inputs:

  add+ReLU   eager ``torch.relu(a + b)``; torchvision's in-place ``out += identity;
             out = relu(out)`` (``add_``, ``relu_``); ``torch.compile`` of the eager function;
             each of our backends, out of place (``add_relu``) and in place (``add_relu_``)
  conv       eager ``relu(conv2d(x, w, b))`` (bias_relu form) or ``conv2d(x, w, b).add_(identity)
             .relu_()`` (residual form: torchvision's ``out += identity; out = relu(out)`` with the
             BatchNorm folded into the bias); ``conv-only``: conv2d alone, the floor the fused
             epilogue is measured against; ``torch.compile`` of the eager function; each of our
             backends through ``fused_conv2d``

Each case draws fresh random inputs (never zeros) and rotates among several input sets when one
set would fit in the last-level cache. torch.compile compiles once per case (``dynamic=False``,
after ``torch._dynamo.reset()``); its compile time is recorded, not timed. In-place providers get
their own copies of the inputs they overwrite.

Per row: median/p20/p80 ms; GB/s (fewest bytes: inputs read once, output written once) or
TFLOP/s; % of the measured ceiling (copy bandwidth for add+ReLU, matmul rate in the dtype for
conv); speedup vs eager (eager_ms / ms; in-place rows are compared with torchvision's in-place
pattern) and vs torch.compile (compile_ms / ms). Above 1 means faster than that baseline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .cases import AddCase, ConvCase, dtype_name
from ..timing import Budget, Rotation, Timer, last_level_cache_bytes, rotation_count, synchronize
from .verify import classify


@dataclass
class Provider:
    name: str
    kind: str  # "ours" | "baseline"
    op: str
    fn: Callable
    backend: Optional[str] = None
    inplace: bool = False  # overwrites its first input
    compiled: bool = False  # torch.compile(fn) once per case
    eager_provider: Optional[str] = "eager"  # the row its "vs eager" speedup is taken against


class CompileEstimate:
    """A running estimate of one torch.compile's cost, to decide whether the budget allows more."""

    def __init__(self, first_guess_s: float):
        self.samples: List[float] = []
        self.first = first_guess_s

    def add(self, s: float) -> None:
        self.samples.append(s)

    def estimate(self) -> float:
        if not self.samples:
            return self.first
        recent = self.samples[-3:]
        return sum(recent) / len(recent)


def _fmt(case) -> Optional[torch.memory_format]:
    return torch.channels_last if case.memory_format == "channels_last" else torch.contiguous_format


def _randn(shape, dtype, device, fmt=None, scale=1.0) -> torch.Tensor:
    if len(shape) == 4 and fmt is not None:
        t = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    else:
        t = torch.empty(shape, dtype=dtype, device=device)
    return t.normal_(0.0, scale)


# -- providers ---------------------------------------------------------------------------------
def _eager_add(a, b):
    return torch.relu(a + b)


def _torchvision_add(a, b):
    a += b  # BasicBlock/Bottleneck: out += identity; out = self.relu(out)  (ReLU(inplace=True))
    return torch.relu_(a)


def add_providers(backends: Sequence[str], ops: Sequence[str], compile_: bool) -> List[Provider]:
    import deeparch_kernels as dk

    provs: List[Provider] = []
    if "add_relu" in ops:
        provs.append(Provider("eager", "baseline", "add_relu", _eager_add))
    if "add_relu_" in ops:
        provs.append(Provider("torchvision", "baseline", "add_relu_", _torchvision_add, inplace=True))
    if compile_:
        provs.append(Provider("compile", "baseline", "add_relu", _eager_add, compiled=True))
    for b in backends:
        if "add_relu" in ops:
            provs.append(Provider(b, "ours", "add_relu", lambda x, y, b=b: dk.add_relu(x, y, backend=b),
                                  backend=b))
        if "add_relu_" in ops:
            provs.append(Provider(f"{b}:inplace", "ours", "add_relu_",
                                  lambda x, y, b=b: dk.add_relu_(x, y, backend=b), backend=b,
                                  inplace=True, eager_provider="torchvision"))
    return provs


def conv_providers(case: ConvCase, backends: Sequence[str], compile_: bool) -> List[Provider]:
    import deeparch_kernels as dk

    s, p = case.stride, case.pad
    if case.form == "residual":
        def eager(x, w, b, r):
            return F.conv2d(x, w, b, s, p).add_(r).relu_()

        def compilable(x, w, b, r):
            return torch.relu(F.conv2d(x, w, b, s, p) + r)

        def ours(x, w, b, r, backend):
            return dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, backend=backend)
    else:
        def eager(x, w, b, r=None):
            return torch.relu(F.conv2d(x, w, b, s, p))

        compilable = eager

        def ours(x, w, b, r=None, backend="auto"):
            return dk.fused_conv2d(x, w, b, stride=s, padding=p, backend=backend)

    def conv_only(x, w, b, r=None):
        return F.conv2d(x, w, b, s, p)

    provs = [Provider("eager", "baseline", "fused_conv2d", eager),
             Provider("conv-only", "baseline", "fused_conv2d", conv_only)]
    if compile_:
        provs.append(Provider("compile", "baseline", "fused_conv2d", compilable, compiled=True))
    for b in backends:
        provs.append(Provider(b, "ours", "fused_conv2d", lambda *a, b=b: ours(*a, backend=b), backend=b))
    return provs


# -- inputs ------------------------------------------------------------------------------------
def add_inputs(case: AddCase, device: torch.device, n_sets: int) -> List[tuple]:
    fmt = _fmt(case)
    return [(_randn(case.shape, case.dtype, device, fmt), _randn(case.shape, case.dtype, device, fmt))
            for _ in range(n_sets)]


def conv_inputs(case: ConvCase, device: torch.device, n_sets: int) -> List[tuple]:
    fmt = _fmt(case)
    sets = []
    for _ in range(n_sets):
        x = _randn(case.shape, case.dtype, device, fmt)
        w = _randn((case.K, case.C, case.k, case.k), case.dtype, device, fmt,
                   scale=(case.C * case.k * case.k) ** -0.5)
        b = _randn((case.K,), case.dtype, device)
        r = _randn(case.out_shape, case.dtype, device, fmt) if case.form == "residual" else None
        sets.append((x, w, b, r))
    return sets


# -- running -----------------------------------------------------------------------------------
def _base_row(case, device: torch.device) -> dict:
    conv = isinstance(case, ConvCase)
    return {
        "section": "op",
        "case": case.label,
        "shape": list(case.shape),
        "weight_shape": [case.K, case.C, case.k, case.k] if conv else None,
        "stride": case.stride if conv else None,
        "padding": case.pad if conv else None,
        "form": case.form if conv else None,
        "net": case.net if conv else None,
        "dtype": dtype_name(case.dtype),
        "memory_format": case.memory_format if conv else case.fmt,
        "device": str(device),
        "bytes": case.bytes,
        "flops": case.flops if conv else None,
    }


def _derive(rows: List[dict], case, ceilings: dict) -> None:
    """Fill GB/s, TFLOP/s, % roofline and the speedups once every provider of a case is timed."""
    by = {r["provider"]: r for r in rows if r.get("median_ms")}
    copy_gbps = (ceilings.get("copy") or {}).get("gbps")
    mm = (ceilings.get("matmul") or {}).get(dtype_name(case.dtype)) or {}
    for r in rows:
        ms = r.get("median_ms")
        r.setdefault("gbps", None)
        r.setdefault("tflops", None)
        r.setdefault("roofline_pct", None)
        r.setdefault("speedup_vs_eager", None)
        r.setdefault("speedup_vs_compile", None)
        if not ms:
            continue
        r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9
        if isinstance(case, ConvCase):
            r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
            if mm.get("tflops"):
                r["roofline_pct"] = 100.0 * r["tflops"] / mm["tflops"]
        elif copy_gbps:
            r["roofline_pct"] = 100.0 * r["gbps"] / copy_gbps
        base = by.get(r.get("eager_provider") or "eager")
        if base is not None:
            r["speedup_vs_eager"] = base["median_ms"] / ms
        if "compile" in by:
            r["speedup_vs_compile"] = by["compile"]["median_ms"] / ms


class OpBench:
    def __init__(self, device: torch.device, timer: Timer, ceilings: dict, budget: Budget, *,
                 backends: Sequence[str], ops: Sequence[str], compile_: bool,
                 compile_reserve_s: float = 0.0, log: Callable[[str], None] = lambda s: None):
        self.device = device
        self.timer = timer
        self.ceilings = ceilings
        self.budget = budget
        self.backends = list(backends)
        self.ops = list(ops)
        self.compile = compile_
        self.reserve = compile_reserve_s
        self.log = log
        self.compile_cost = CompileEstimate(20.0 if device.type == "cpu" else 8.0)
        self.notes: List[str] = []
        self.cache_bytes = last_level_cache_bytes(device)

    def _n_sets(self, case) -> int:
        return rotation_count(case.bytes, self.cache_bytes)

    def _allow_compile(self) -> bool:
        if not self.compile:
            return False
        ok = self.budget.allows(self.compile_cost.estimate() + self.reserve)
        if not ok and not any("budget" in n for n in self.notes):
            self.notes.append("torch.compile skipped for later cases: the time budget (--budget) "
                              "would not cover another compile")
        return ok

    def _empty_row(self, prov: Provider, sets: List[tuple]) -> dict:
        return {"provider": prov.name, "kind": prov.kind, "op": prov.op, "backend": prov.backend,
                "eager_provider": prov.eager_provider, "median_ms": None, "p20_ms": None,
                "p80_ms": None, "reps": 0, "compile_s": None, "status": "ok", "note": "",
                "input_sets": len(sets)}

    def prepare(self, prov: Provider, sets: List[tuple], row: dict) -> Optional[Callable[[], object]]:
        """The timed callable of a provider (its own input copies, compiled once), or None with
        the row marked when that fails."""
        try:
            if prov.inplace:  # its own copies of the buffers it overwrites
                sets = [(s[0].clone(),) + tuple(s[1:]) for s in sets]
            fn = prov.fn
            if prov.compiled:
                torch._dynamo.reset()
                fn = torch.compile(prov.fn, dynamic=False)
                t0 = time.perf_counter()
                fn(*sets[0])
                synchronize(self.device)
                row["compile_s"] = time.perf_counter() - t0
                self.compile_cost.add(row["compile_s"])
            rot = Rotation(sets)
            return lambda: fn(*rot())
        except Exception as e:  # noqa: BLE001 - a failing provider is a row, not a crash
            row["status"], row["note"] = classify(e)
            return None

    def time_provider(self, prov: Provider, sets: List[tuple]) -> dict:
        """One provider alone (tests, ad-hoc use)."""
        row = self._empty_row(prov, sets)
        fn = self.prepare(prov, sets, row)
        if fn is not None:
            timings, errors = self.timer.many({prov.name: fn})
            self._fill(row, timings.get(prov.name), errors.get(prov.name))
        return row

    @staticmethod
    def _fill(row: dict, t, err) -> None:
        if err is not None:
            row["status"], row["note"] = classify(err)
        elif t is not None:
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)

    def run_case(self, case, providers: List[Provider], sets: List[tuple]) -> List[dict]:
        rows, fns = [], {}
        for prov in providers:
            row = {**_base_row(case, self.device), **self._empty_row(prov, sets)}
            if prov.compiled and not self._allow_compile():
                row["status"] = "skipped"
                row["note"] = "--no-compile" if not self.compile else "time budget"
            else:
                fn = self.prepare(prov, sets, row)
                if fn is not None:
                    fns[prov.name] = fn
            rows.append(row)
        timings, errors = self.timer.many(fns)
        for row in rows:
            if row["provider"] in fns:
                self._fill(row, timings.get(row["provider"]), errors.get(row["provider"]))
        if any(p.compiled for p in providers):
            torch._dynamo.reset()
        _derive(rows, case, self.ceilings)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    def run(self, add_cases: Sequence[AddCase], conv_cases: Sequence[ConvCase]) -> List[dict]:
        all_rows: List[dict] = []
        want_add = [c for c in add_cases if "add_relu" in self.ops or "add_relu_" in self.ops]
        want_conv = [c for c in conv_cases if "fused_conv2d" in self.ops]
        total = len(want_add) + len(want_conv)
        i = 0
        for case in list(want_add) + list(want_conv):
            i += 1
            kind = "add_relu" if isinstance(case, AddCase) else f"conv {case.form}"
            head = f"[{i}/{total}] {kind} {case.label} {dtype_name(case.dtype)} {case.memory_format}"
            if self.budget.left() <= self.reserve and i > 1:
                self.log(f"{head}: skipped (time budget spent)")
                self.notes.append(f"skipped (time budget): {kind} {case.label} {dtype_name(case.dtype)}")
                continue
            try:
                if isinstance(case, AddCase):
                    provs = add_providers(self.backends, self.ops, self.compile)
                    sets = add_inputs(case, self.device, self._n_sets(case))
                else:
                    provs = conv_providers(case, self.backends, self.compile)
                    sets = conv_inputs(case, self.device, self._n_sets(case))
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # too large for this device
                self.log(f"{head}: skipped ({e})")
                self.notes.append(f"skipped (out of memory): {kind} {case.label}")
                continue
            t0 = time.perf_counter()
            rows = self.run_case(case, provs, sets)
            del sets
            all_rows += rows
            self.log(f"{head}: {progress_summary(rows)} [{time.perf_counter() - t0:.1f} s]")
        return all_rows


def progress_summary(rows: Sequence[dict]) -> str:
    parts = []
    for r in rows:
        if r.get("median_ms") is None:
            parts.append(f"{r['provider']} {r['status']}")
            continue
        s = f"{r['provider']} {r['median_ms']:.3g} ms"
        if r["kind"] == "ours" and r.get("speedup_vs_eager"):
            s += f" ({r['speedup_vs_eager']:.2f}x)"
        parts.append(s)
    return ", ".join(parts)
