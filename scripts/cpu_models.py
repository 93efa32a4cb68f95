"""Whole models on the CPU against torch.compile with inductor's freezing (issue 13's table).

    python scripts/cpu_models.py [--models resnet18,resnet50,vgg16] [--batches 1,8]

For each model and batch: torchvision eager, ``fuse()`` of it (ours, eager), torch.compile of
each with ``torch._inductor.config.freezing = True`` (what a CPU user deploys), float32
channels_last, eval, inference_mode, BatchNorm statistics randomised; the four timed
interleaved (``deeparch_kernels.timing.Timer.many``, medians). Per provider: the relative error
against torchvision eager, and whether a NaN pixel in the input comes out where torch eager
puts it. One JSON line per model and batch; the first line names the CPU's instruction set.
Until the main job's model table has these columns, this is where the numbers come from.
``auto``'s choices are made afresh in this run (an empty ``DEEPARCH_CACHE_DIR`` unless one is
set): choices timed earlier under another load would be measured instead of this run's.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import torch
import torchvision
from torch._inductor import config as inductor_config

import deeparch_kernels as dk
from deeparch_kernels.timing import Timer
from deeparch_kernels.verify import randomize_batchnorm


os.environ.setdefault("DEEPARCH_CACHE_DIR", tempfile.mkdtemp(prefix="deeparch-cpu-models-"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,vgg16")
    p.add_argument("--batches", default="1,8")
    a = p.parse_args()
    inductor_config.freezing = True
    cl = torch.channels_last
    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads(),
                      "onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                      "torch": torch.__version__}), flush=True)
    for name in a.models.split(","):
        tv = getattr(torchvision.models, name)().eval()
        randomize_batchnorm(tv, torch.Generator().manual_seed(1))
        tv = tv.to(memory_format=cl)
        ours = dk.fuse(tv, inplace=False).to(memory_format=cl)
        for b in (int(s) for s in a.batches.split(",")):
            torch._dynamo.reset()  # each batch compiled static, as a deployment would
            torch.manual_seed(0)
            x = torch.randn(b, 3, 224, 224).contiguous(memory_format=cl)
            x_nan = x.clone()
            x_nan[0, :, 100, 100] = float("nan")
            with torch.inference_mode():
                ref, ref_nan = tv(x), tv(x_nan)
                providers, compile_s = {"torchvision": tv, "fused": ours}, {}
                for k, m in (("compile_torchvision", tv), ("compile_fused", ours)):
                    t = time.perf_counter()
                    providers[k] = torch.compile(m)
                    providers[k](x)
                    compile_s[k] = round(time.perf_counter() - t, 1)
                err = {k: float((m(x).double() - ref.double()).abs().max() / ref.double().abs().max())
                       for k, m in providers.items()}
                nan_kept = {k: bool(torch.equal(m(x_nan).isnan(), ref_nan.isnan())) for k, m in providers.items()}
                timer = Timer(torch.device("cpu"), warmup=2, reps=15 if b == 1 else 8, min_reps=5, max_time_s=4.0)
                timings, errors = timer.many({k: (lambda m=m: m(x)) for k, m in providers.items()})
            ms = {k: t.median_ms for k, t in timings.items()}
            base = ms.get("compile_torchvision")
            print(json.dumps({
                "model": name, "batch": b, "median_ms": {k: round(v, 2) for k, v in ms.items()},
                "vs_compile_torchvision": {k: round(base / v, 3) for k, v in ms.items()} if base else None,
                "compile_s": compile_s, "rel_err": {k: f"{v:.1e}" for k, v in err.items()},
                "nan_where_eager": nan_kept, "errors": {k: repr(e) for k, e in errors.items()},
                "auto_choices": collections.Counter(dk.backends.cached_choices().values())}), flush=True)


if __name__ == "__main__":
    main()
