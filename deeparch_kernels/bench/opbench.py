"""Timing of the ops: each case's providers (specs.py) side by side on fresh random inputs,
rotated among several sets when one fits in the last-level cache; torch.compile once per case,
its compile time recorded, not timed; in-place providers on their own copies (Provider.timed).

Per row (schema.OpRow): median/p20/p80 ms; GB/s or TFLOP/s and % of the measured ceiling
(roofline.py); speedups vs eager (in-place rows: vs torchvision's in-place pattern) and vs
torch.compile, baseline ms / ms (> 1: faster).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..testing import classify
from ..timing import Budget, Timer, last_level_cache_bytes, rotation_count
from .cases import ConvCase, dtype_name
from .roofline import form_bytes
from .schema import OpRow, Row
from .specs import SPECS, Provider

log = logging.getLogger("deeparch_kernels.bench")


def derive(rows: Sequence[Row], ceilings: dict, cache_bytes: int = 0) -> None:
    """Rates, % of the ceiling and speedups, once every provider of a case is timed. A row whose
    input sets fit in ``cache_bytes`` (the last-level cache) gets no % of the streaming ceiling:
    its data never leaves the cache, so it is not measured against memory bandwidth."""
    by = {r.provider: r for r in rows if r.median_ms}
    for r in rows:
        if not r.median_ms:
            continue
        s = r.median_ms * 1e-3
        if r.bytes is not None:
            r.gbps = r.bytes / s / 1e9
            if r.bytes * getattr(r, "input_sets", 1) > cache_bytes:
                r.roofline_pct = _pct(r.gbps, (ceilings.get("copy") or {}).get("gbps"))
        if r.flops is not None:
            r.tflops = r.flops / s / 1e12
            r.roofline_pct = _pct(r.tflops, ((ceilings.get("matmul") or {}).get(r.dtype) or {}).get("tflops"))
        base = by.get(r.eager_provider)
        r.speedup_vs_eager = base.median_ms / r.median_ms if base else None
        r.speedup_vs_compile = by["compile"].median_ms / r.median_ms if "compile" in by else None


def time_rows(timer: Timer, rows: Sequence[Row], fns: Dict[str, Callable[[], object]]) -> None:
    """Time ``fns`` side by side (Timer.many) and fill each row: its timing, or what it raised."""
    timings, errors = timer.many(fns)
    for r in rows:
        if r.provider in errors:
            r.status, r.note = classify(errors[r.provider])
        elif r.provider in timings:
            r.timed(timings[r.provider])


def _pct(rate: Optional[float], ceiling: Optional[float]) -> Optional[float]:
    return 100.0 * rate / ceiling if ceiling else None


class OpBench:
    def __init__(self, device: torch.device, timer: Timer, ceilings: dict, budget: Budget, *,
                 backends: Sequence[str], ops: Sequence[str], compile_: bool, compile_reserve_s: float = 0.0):
        self.device, self.timer, self.ceilings, self.budget = device, timer, ceilings, budget
        self.backends, self.ops, self.compile, self.reserve = list(backends), list(ops), compile_, compile_reserve_s
        self.compile_guess, self.compile_s = (20.0 if device.type == "cpu" else 8.0), []  # seconds
        self.notes: List[str] = []
        self.cache_bytes = last_level_cache_bytes(device)

    def _allow_compile(self) -> bool:
        recent = self.compile_s[-3:]  # one more torch.compile's cost: the mean of the last three
        ok = self.budget.allows((sum(recent) / len(recent) if recent else self.compile_guess) + self.reserve)
        if not ok and not any("budget" in n for n in self.notes):
            self.notes.append("torch.compile skipped for later cases: the time budget (--budget) "
                              "would not cover another compile")
        return ok

    def _row(self, case, prov: Provider, n_sets: int) -> OpRow:
        conv = dict(weight_shape=[case.K, case.C, case.k, case.k], stride=case.stride, padding=case.pad,
                    form=case.form, net=case.net, flops=case.flops) if isinstance(case, ConvCase) else {}
        return OpRow("op", prov.op, case.label, list(case.shape), dtype_name(case.dtype),
                     case.memory_format if conv else case.fmt, str(self.device), prov.name, prov.kind, prov.backend,
                     prov.eager_provider, bytes=form_bytes(case, prov.op, self.device), input_sets=n_sets, **conv)

    def run_case(self, case, providers: List[Provider], sets: List[tuple]) -> List[OpRow]:
        rows, fns = [], {}
        for prov in providers:
            row = self._row(case, prov, len(sets))
            if prov.compiled and not (self.compile and self._allow_compile()):
                row.status, row.note = "skipped", "--no-compile" if not self.compile else "time budget"
            else:
                try:
                    fns[prov.name], row.compile_s = prov.timed(sets, self.device)
                except Exception as e:  # noqa: BLE001 - a failing provider is a row, not a crash
                    row.status, row.note = classify(e)
                if row.compile_s is not None:
                    self.compile_s.append(row.compile_s)
            rows.append(row)
        time_rows(self.timer, rows, fns)
        if any(p.compiled for p in providers):
            torch._dynamo.reset()
        derive(rows, self.ceilings, cache_bytes=self.cache_bytes)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    def run(self, cases: Sequence) -> List[dict]:
        """Every case whose op was asked for, each spec's in turn; the rows as dicts."""
        todo = [(spec, c) for spec in SPECS.values() if set(spec.ops) & set(self.ops)
                for c in cases if isinstance(c, spec.case_type)]
        out: List[dict] = []
        for i, (spec, case) in enumerate(todo, 1):
            kind = spec.name + (f" {case.form}" if isinstance(case, ConvCase) else "")
            head = f"[{i}/{len(todo)}] {kind} {case.label} {dtype_name(case.dtype)} {case.memory_format}"
            if self.budget.left() <= self.reserve and i > 1:
                log.info(f"{head}: skipped (time budget spent)")
                self.notes.append(f"skipped (time budget): {kind} {case.label} {dtype_name(case.dtype)}")
                continue
            try:
                provs = spec.providers(case, self.backends, self.ops, self.compile)
                sets = spec.inputs(case, self.device, rotation_count(case.bytes, self.cache_bytes))
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # too large for this device
                log.info(f"{head}: skipped ({e})")
                self.notes.append(f"skipped (out of memory): {kind} {case.label}")
                continue
            t0 = time.perf_counter()
            rows = self.run_case(case, provs, sets)
            del sets
            out += [asdict(r) for r in rows]
            log.info(f"{head}: " + ", ".join(
                f"{r.provider} {r.status}" if r.median_ms is None else f"{r.provider} {r.median_ms:.3g} ms"
                + (f" ({r.speedup_vs_eager:.2f}x)" if r.kind == "ours" and r.speedup_vs_eager else "")
                for r in rows) + f" [{time.perf_counter() - t0:.1f} s]")
        return out
