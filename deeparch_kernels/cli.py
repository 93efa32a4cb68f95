"""``deeparch-bench`` / ``python -m deeparch_kernels``: the main job (benchmarks/README.md).

With no arguments, on the device present (the GPU when CUDA is available, else the CPU): which
backends are available and why not; every backend of every op verified against a float64
reference and our models against torchvision's; each backend timed against eager PyTorch and
torch.compile, and whole models; the table printed and <date>-<device>.json, .md and PNG plots
written under --out. The device's defaults are in ``--help``; on a GPU a soft 225 s budget fits
the slot of scripts/gpu_check.sh (past it compile baselines, then cases, are dropped, noted).

Exit status: 0 when everything verified and ran, 1 when a check failed or a backend raised, 2 for
bad arguments. Subcommands: compare, plot, cache, lesson (``deeparch-bench lesson --help``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .backends import BACKENDS
from .bench.cases import parse_dtype, parse_shape_spec
from .bench.specs import OPS, SPECS
from .testing import BENCH_MODELS

# --ops: each op, a family ("add": add_relu and add_relu_; "conv"), "all", "none"
OP_ALIASES = {**{op: [op] for op in OPS}, "conv": list(SPECS["fused_conv2d"].ops),
              "add": list(SPECS["add_relu"].ops), "all": list(OPS), "none": []}


def _listed(parse: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse type: a comma list, each item through ``parse`` (ValueError: the message)."""
    def convert(value: str) -> list:
        try:
            return [parse(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _one_of(allowed: Sequence[str], what: str) -> Callable[[str], list]:
    def parse(v: str) -> str:
        if v not in allowed:
            raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")
        return v
    return _listed(parse)


def _positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{v!r}: expected comma-separated positive integers")
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeparch-bench",
        description="Verify every available deeparch-kernels backend against a float64 reference, "
                    "then time it against eager PyTorch and torch.compile (ops and whole models).",
        epilog="Shapes: anchors, vgg, resnet, conv, add, cpu, tiny, conv:CxHxSTRIDE[xK[xKSIZE]], "
               "add:AxBxCxD. Speedup = baseline ms / ms (> 1: faster).")
    arg = p.add_argument
    arg("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    arg("--ops", default="all", type=_one_of(list(OP_ALIASES), "op"),
        help="comma list of add_relu, add_relu_, fused_conv2d (aliases: add, conv, all, none)")
    arg("--models", type=_one_of(list(BENCH_MODELS) + ["all", "none"], "model"),
        help="comma list of vgg16, resnet18, resnet50, all or none (default: all; --quick: resnet18)")
    arg("--dtypes", type=_listed(parse_dtype), help="comma list of fp32, fp16, bf16, for verification and "
        "timing (default: CPU fp32, and models in bf16 too on a CPU with native bf16, AVX512-BF16 or "
        "AMX; GPU: verify fp32, fp16, bf16, time the anchor table's dtypes, models in fp16)")
    arg("--shapes", type=_listed(parse_shape_spec), help="comma list of shape sets or explicit shapes "
        "(default: anchors on a GPU, cpu on a CPU, tiny with --quick)")
    arg("--batch", type=_listed(_positive), help="conv batch sizes, comma list (default: 32 on a GPU, 1 on a "
        "CPU); the largest is also the model batch unless --model-batch")
    arg("--model-batch", type=int, help="model throughput batch (default 64 GPU, 8 CPU; the latency rows are batch 1)")
    arg("--image-size", type=int, help="model input size (default 224; --quick 64)")
    arg("--backends", type=_one_of(list(BACKENDS) + ["auto"], "backend"), help="comma list of our backends "
        "to verify and time (cuda, triton, cpu, aten, reference, auto; default: the available ones)")
    arg("--memory-format", choices=("channels_last", "contiguous"),
        help="layout for every timed case (default: the anchor table's, channels_last)")
    arg("--quick", action="store_true", help="tiny shapes, few repetitions, ResNet-18 only: seconds")
    arg("--no-verify", action="store_true", help="skip verification")
    arg("--no-bench", action="store_true", help="skip timing (verification only)")
    arg("--no-compile", action="store_true", help="skip the torch.compile baselines")
    arg("--no-compile-models", action="store_true",
        help="skip torch.compile of whole models (on a CPU it runs with inductor's freezing; seconds each)")
    arg("--compile-models", action="store_true", help=argparse.SUPPRESS)  # the default now; old scripts pass it
    arg("--system-malloc", action="store_true",
        help="on a CPU, leave malloc as it is (default: deeparch_kernels.keep_freed_memory() first, "
             "for every provider: freed blocks are reused, not page-faulted in again)")
    arg("--no-latency", action="store_true", help="skip the batch-1 model latency rows")
    arg("--out", default="deeparch-results", help="directory for the JSON, markdown and plots "
        "(default ./deeparch-results)")
    arg("--no-save", action="store_true", help="print only; write no files")
    arg("--no-plots", action="store_true", help="write no PNG plots")
    arg("--reps", type=int, help="at most this many timed calls per provider (default 50 GPU, 30 CPU)")
    arg("--warmup", type=int, help="untimed calls before timing (default 5 GPU, 2 CPU)")
    arg("--max-time", type=float, help="stop adding repetitions after this many seconds per provider")
    arg("--budget", type=float, help="soft time budget in seconds for the whole run: past it, "
        "torch.compile baselines and then later cases are dropped, with a note (default 225 GPU, "
        "370 CPU with compiled models, +216 with the bf16 ones, else 150; 60 --quick; 0: none)")
    arg("--seed", type=int, help="random seed (default: fresh each run; printed and stored)")
    arg("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    sub = p.add_subparsers(dest="command", title="subcommands (the main job when none is given)")
    c = sub.add_parser("compare", help="two result files side by side",
                       description="Two result files side by side: same cases, ratio B/A of median "
                                   "times (< 1: B is faster).")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--markdown", action="store_true", help="markdown tables")
    c.set_defaults(main=_compare, parser=c)
    c = sub.add_parser("plot", help="draw a result file's PNG plots", description="Draw a result file's PNG plots.")
    c.add_argument("result", type=Path)
    c.add_argument("--out", dest="plot_out", type=Path, help="directory (default: beside the result)")
    c.set_defaults(main=_plot, parser=c)
    c = sub.add_parser("cache", help="show (or --clear) backend='auto''s on-disk choices",
                       description="backend='auto' remembers its choices (and the backends its check "
                                   "refused) on disk, one file per machine and software versions, under "
                                   "$DEEPARCH_CACHE_DIR (default ~/.cache/deeparch_kernels). Shows them.")
    c.add_argument("--clear", action="store_true", help="delete the files (the next run checks and times again)")
    c.set_defaults(main=_cache, parser=c)
    # the lesson parses its own arguments (lesson.py): 'lesson --help'
    sub.add_parser("lesson", add_help=False, help="the lesson behind the library reproduced (see 'lesson --help')")
    return p


def _given_or(v, default):
    return default if v is None else v


def parse_config(argv: Optional[Sequence[str]] = None):
    """Parse the main job's arguments into a runner.Config (argparse exits with status 2 on bad
    values)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    return _config(parser, parser.parse_args(argv), argv)


def _config(parser: argparse.ArgumentParser, a: argparse.Namespace, argv: List[str]):
    from .backends import available_backends
    from .bench.env import device_from_arg
    from .bench.runner import Config, model_reserve_s

    try:
        device = device_from_arg(a.device)
    except ValueError as e:
        parser.error(str(e))
    gpu = device.type == "cuda"
    for flag, v, least in (("--reps", a.reps, 1), ("--warmup", a.warmup, 0), ("--model-batch", a.model_batch, 1),
                           ("--image-size", a.image_size, 32)):
        if v is not None and v < least:
            parser.error(f"{flag} {v}: at least {least}" + (" (VGG16 pools five times)" if least == 32 else ""))
    ops = list(dict.fromkeys(o for v in a.ops for o in OP_ALIASES[v]))
    models = (["resnet18"] if a.quick else list(BENCH_MODELS)) if a.models is None else (
        list(BENCH_MODELS) if "all" in a.models else [m for m in a.models if m != "none"])

    notes: List[str] = []
    avail = available_backends(device)
    if a.backends:
        verify_b = a.backends
        notes += [f"backend {n!r} is not available on {device}: {avail[n].reason}"
                  for n in a.backends if n != "auto" and not avail[n].available]
        bench_b = [n for n in a.backends if n == "auto" or avail[n].available]
    else:
        verify_b = [n for n, v in avail.items() if v.available] + ["auto"]
        bench_b = [n for n, v in avail.items() if v.available and n != "reference"]
    if not gpu and "triton" in bench_b:
        bench_b.remove("triton")
        notes.append("triton is not timed on a CPU: the interpreter (TRITON_INTERPRET=1) is far too "
                     "slow; it is verified on tiny shapes only")
    # Whole models: "auto", what users get (on a GPU every explicit backend would autotune its
    # Triton kernels for each layer shape again: minutes); on a CPU also "cpu" (per layer the
    # fastest of cpu, winograd and aten, against oneDNN's direct convolution everywhere).
    if a.backends:
        model_b = [n for n in bench_b if n != "reference"]
    else:
        model_b = ["auto"] if gpu else [n for n in bench_b if n not in ("reference", "aten")] + ["auto"]
    compile_ = not a.no_compile
    compile_models = compile_ and not a.no_compile_models

    reps, warmup, max_time, budget = ((10, 1, 0.2, 60.0) if a.quick else (50, 5, 1.0, 225.0) if gpu
                                      else (30, 2, 1.0, 370.0 if compile_models and models else 150.0))
    model_batch = a.model_batch or (max(a.batch) if a.batch else (8 if gpu else 2) if a.quick else (64 if gpu else 8))
    cfg = Config(
        device=device, ops=ops, models=models, dtypes=list(dict.fromkeys(a.dtypes)) if a.dtypes else None,
        shapes=a.shapes or (["tiny"] if a.quick else ["anchors"] if gpu else ["cpu"]), batch=a.batch or None,
        memory_format=a.memory_format, verify_backends=verify_b, bench_backends=bench_b,
        model_backends=model_b, quick=a.quick, verify=not a.no_verify, bench=not a.no_bench,
        compile=compile_, compile_models=compile_models, out=None if a.no_save else Path(a.out),
        plots=not a.no_plots, reps=_given_or(a.reps, reps), warmup=_given_or(a.warmup, warmup),
        max_time_s=_given_or(a.max_time, max_time), budget_s=_given_or(a.budget, budget),
        seed=_given_or(a.seed, int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF),
        image_size=a.image_size or (64 if a.quick else 224), model_batch=model_batch,
        latency=not a.no_latency, keep_freed_memory=not gpu and not a.system_malloc, progress=not a.quiet, argv=argv, notes=notes)
    if a.budget is None and not gpu and not a.quick and compile_models and models:
        n = len(cfg.model_dtypes)  # each model dtype past the first: its reserve on top
        cfg.budget_s += model_reserve_s(cfg) * (n - 1) / n
    return cfg


def _compare(a: argparse.Namespace) -> int:
    from .bench.compare import compare, load

    try:
        ra, rb = load(a.a), load(a.b)
    except ValueError as e:
        a.parser.error(str(e))
    sys.stdout.write(compare(ra, rb, markdown=a.markdown))
    return 0


def _plot(a: argparse.Namespace) -> int:
    from .bench.compare import load
    from .bench.plots import draw

    try:
        r = load(a.result)
    except ValueError as e:
        a.parser.error(str(e))
    stem = (a.plot_out / a.result.stem) if a.plot_out else a.result.with_suffix("")
    if a.plot_out:
        a.plot_out.mkdir(parents=True, exist_ok=True)
    paths, why = draw(r, stem)
    if why:
        print(f"plots skipped: {why}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _cache(a: argparse.Namespace) -> int:
    from .backends import choice_cache

    if a.clear and choice_cache.directory() is not None:
        n = len(choice_cache.files())
        choice_cache.reset(delete_files=True)
        print(f"deleted {n} file(s) under {choice_cache.directory()}")
    else:
        sys.stdout.write(choice_cache.describe())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        a, rest = parser.parse_known_args(argv)
        if a.command == "lesson":
            from .lesson import main as lesson_main

            return lesson_main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if a.command is not None:
            return a.main(a)
        cfg = _config(parser, a, argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)

    from .bench import report
    from .bench.runner import run

    t0 = time.perf_counter()
    log = logging.getLogger("deeparch_kernels.bench")
    handler = logging.StreamHandler(sys.stderr)  # progress lines, for this run (-q: none)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if cfg.progress else logging.ERROR)
    try:
        compile_ = ("on" if cfg.compile_models else "on (not for models)") if cfg.compile else "off"
        log.info(f"deeparch-bench: device {cfg.device}, seed {cfg.seed}; ops {','.join(cfg.ops) or 'none'}; models "
                 f"{','.join(cfg.models) or 'none'}; shapes {','.join(cfg.shapes)}; compile {compile_}; "
                 f"budget {cfg.budget_s:.0f} s")
        for n in cfg.notes:
            log.info(f"note: {n}")
        result = run(cfg)
        sys.stdout.write(report.render(result))
        sys.stdout.flush()
        if cfg.out is not None:
            written = report.write(result, cfg.out, plots=cfg.plots)
            log.info(f"wrote {written['json']} and {written['markdown']}"
                     + (f" and {len(written['plots'])} plots" if written["plots"] else ""))
            if written["plots_skipped"]:
                log.info(f"plots skipped: {written['plots_skipped']}")
        log.info(f"done in {time.perf_counter() - t0:.1f} s, exit code {result['exit_code']}")
    finally:
        log.removeHandler(handler)
    return int(result["exit_code"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
