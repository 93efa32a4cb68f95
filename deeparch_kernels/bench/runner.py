"""One run of the main job: backends -> verification -> ceilings -> op timing -> models ->
a result dict (schema.py) -> console table, JSON, markdown, plots (report.py, plots.py)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from ..timing import Budget, Timer
from . import env as _env
from .cases import build_cases, dtype_name
from .schema import SCHEMA_VERSION
from .specs import OPS

log = logging.getLogger("deeparch_kernels.bench")


@dataclass
class Config:
    device: torch.device
    ops: List[str] = field(default_factory=lambda: list(OPS))
    models: List[str] = field(default_factory=list)
    shapes: List[str] = field(default_factory=list)
    dtypes: Optional[List[torch.dtype]] = None  # None: the device's defaults
    batch: Optional[List[int]] = None
    memory_format: Optional[str] = None
    verify_backends: List[str] = field(default_factory=list)
    bench_backends: List[str] = field(default_factory=list)
    model_backends: List[str] = field(default_factory=list)
    quick: bool = False
    verify: bool = True
    bench: bool = True
    compile: bool = True
    compile_models: bool = True
    out: Optional[Path] = None
    plots: bool = True
    reps: int = 50
    warmup: int = 3
    max_time_s: float = 1.0
    budget_s: float = 0.0
    seed: int = 0
    image_size: int = 224
    model_batch: int = 64
    latency: bool = True
    keep_freed_memory: bool = False  # on the CPU: deeparch_kernels.keep_freed_memory() first
    progress: bool = True  # progress lines (logging, INFO) on stderr: the CLI's -q turns them off
    argv: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def as_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "notes"}  # (the notes go to the result's notes)
        return {**d, "device": str(self.device), "out": None if self.out is None else str(self.out),
                "dtypes": None if self.dtypes is None else [dtype_name(t) for t in self.dtypes]}

    @property
    def verify_dtypes(self) -> List[torch.dtype]:
        gpu = self.device.type == "cuda"
        return list(self.dtypes or ([torch.float32, torch.float16, torch.bfloat16] if gpu else [torch.float32]))

    @property
    def model_dtypes(self) -> List[torch.dtype]:
        """The models' dtypes: those asked for (--dtypes), else fp16 on a GPU; on a CPU fp32, and
        bf16 too where the CPU multiplies bf16 natively (AVX512-BF16 or AMX; env.cpu_bf16_isa)."""
        if self.dtypes:
            return list(self.dtypes)
        if self.device.type == "cuda":
            return [torch.float16]
        return [torch.float32] + ([torch.bfloat16] if _env.cpu_runs_bf16_natively() else [])


def model_reserve_s(cfg: Config) -> float:
    """Seconds the op timing leaves for the model section: per model and dtype its eager rows
    and, on a CPU, four freezing compiles (two batches, theirs and ours)."""
    if not cfg.models:
        return 0.0
    cpu = cfg.device.type == "cpu"
    per = 8.0 if cfg.quick else 12.0 if cpu else 10.0
    if cpu and cfg.compile and cfg.compile_models and not cfg.quick:
        per += 60.0
    return per * len(cfg.models) * len(cfg.model_dtypes)


def run(cfg: Config) -> dict:
    """Run everything ``cfg`` asks for; returns the result dict (see schema.py). Progress goes
    to the "deeparch_kernels.bench" logger."""
    import deeparch_kernels as dk

    t_start = time.perf_counter()
    budget = Budget(cfg.budget_s)  # one budget for the whole run: timing adapts to verification's time
    created = _env.now().isoformat(timespec="seconds")
    notes = list(cfg.notes)
    dev = cfg.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # as the anchor table was measured
        notes.append("torch.backends.cudnn.benchmark = True (as the anchor table)")
    if dev.type == "cpu" and cfg.keep_freed_memory:
        if dk.keep_freed_memory():
            notes.append(f"glibc malloc keeps up to {dk.cpu_memory.DEFAULT_LIMIT >> 20} MiB of freed memory for "
                         "reuse, for every provider (deeparch_kernels.keep_freed_memory: eager models "
                         "then take no page faults; --system-malloc measures without)")
        else:
            notes.append("keep_freed_memory: the C library is not glibc; its malloc runs as it is")
    avail = {n: {"available": a.available, "reason": a.reason} for n, a in dk.available_backends(dev).items()}
    load_start = _loadavg()

    verification = None
    failed = False
    if cfg.verify:
        from .verify import Verifier, summarize, verify_models

        log.info(f"verifying {', '.join(cfg.verify_backends)} on {dev} "
                 f"({', '.join(dtype_name(d) for d in cfg.verify_dtypes)}), seed {cfg.seed}")
        t0 = time.perf_counter()
        checks = Verifier(dev, cfg.verify_backends, cfg.verify_dtypes, cfg.ops, seed=cfg.seed, quick=cfg.quick).run()
        if cfg.models:
            checks += verify_models(dev, cfg.models, cfg.model_backends, cfg.verify_dtypes,
                                    seed=cfg.seed, image_size=32 if cfg.quick else 64)
        log.info(f"verification took {time.perf_counter() - t0:.1f} s")
        summary = summarize(checks)
        verification = {"seed": cfg.seed, "summary": summary, "results": [asdict(c) for c in checks]}
        failed = bool(summary["fail"] or summary["error"])

    ceilings = None
    timings: List[dict] = []
    if cfg.bench:
        from .modelbench import ModelBench
        from .opbench import OpBench
        from .report import ceilings_text
        from .roofline import measure_ceilings

        torch.manual_seed(cfg.seed)
        timer = Timer(dev, warmup=cfg.warmup, reps=cfg.reps, min_reps=min(5, cfg.reps),
                      max_time_s=cfg.max_time_s)
        cases = build_cases(cfg.shapes, dev.type, dtypes=cfg.dtypes, batches=cfg.batch,
                            memory_format=cfg.memory_format)
        conv_dtypes = list(dict.fromkeys([c.dtype for c in cases.conv] +
                                         (cfg.model_dtypes if cfg.models else [])))
        log.info("measuring the ceilings (streaming bandwidth, matmul rate)")
        ceilings = measure_ceilings(dev, conv_dtypes, timer, quick=cfg.quick)
        log.info(ceilings_text({"ceilings": ceilings}))
        # what the op timing leaves for the models' eager and fused timings (compiling whole
        # models is not reserved for: it is the first thing the budget drops)
        reserve = model_reserve_s(cfg)
        ob = OpBench(dev, timer, ceilings, budget, backends=cfg.bench_backends, ops=cfg.ops,
                     compile_=cfg.compile, compile_reserve_s=reserve)
        timings += ob.run(cases.add + cases.conv)
        notes += ob.notes
        if cfg.models:
            mtimer = Timer(dev, warmup=1 if dev.type == "cpu" else cfg.warmup,
                           reps=min(cfg.reps, 20), min_reps=3, max_time_s=max(cfg.max_time_s, 1.0))
            for dtype in cfg.model_dtypes:
                mb = ModelBench(dev, mtimer, budget, names=cfg.models, backends=cfg.model_backends,
                                dtype=dtype, batch=cfg.model_batch, image=cfg.image_size,
                                latency=cfg.latency, compile_=cfg.compile and cfg.compile_models,
                                seed=cfg.seed)
                timings += mb.run()
                notes += [n for n in mb.notes if n not in notes]
        if any(r["status"] == "error" for r in timings):
            failed = True
            notes.append("some timings raised errors (status 'error' rows)")

    load_end, cores = _loadavg(), os.cpu_count() or 1
    # Other processes competing for the CPU make CPU timings (and GPU launch overhead) noisy. Before
    # the run the load is others'; at its end it includes this run's own threads.
    if cfg.bench and ((load_start or 0) > 0.5 * cores + 0.5 or (load_end or 0) > cores + 0.5):
        notes.append(busy := (f"the machine was busy (1-minute load average {load_start} at the start, "
                              f"{load_end} at the end, {cores} cores): other processes competed for the "
                              "CPU; rerun when it is idle before trusting CPU times"))
        log.warning(f"warning: {busy}")
    environment = _env.environment(dev)
    environment["loadavg_1min"] = {"start": load_start, "end": load_end}
    auto = dk.backends.snapshot()
    if auto["exclusions"]:
        notes.append(f"backend='auto' refused {len(auto['exclusions'])} backend(s) for some inputs "
                     "(its check found them wrong, or they raised): see 'auto refused'")
    return dict(schema_version=SCHEMA_VERSION, tool="deeparch-bench", created=created, argv=list(cfg.argv),
                config=cfg.as_json(), env=environment, backends=avail, ceilings=ceilings, verification=verification,
                timings=timings, notes=notes, auto=auto, wall_s=time.perf_counter() - t_start,
                exit_code=1 if failed else 0)


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
