"""What ``backend="auto"`` costs on a model's first forward (README, "What `auto` guarantees").

    python scripts/auto_first_call.py [--model resnet50] [--batch 1] [--device cpu]

Runs the same script in two new processes sharing an empty ``DEEPARCH_CACHE_DIR``: the first
process finds no choices (every key's candidates are checked against stock PyTorch, and timed
on a GPU), the second finds them on disk. Each process times its first forward and the median
of 15 later ones (``fuse()`` of torchvision's model, BatchNorm statistics randomised, eval mode,
inference_mode, float32 channels_last) and prints one JSON line; this prints both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def measure(model: str, batch: int, device: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import torchvision  # noqa: F401 - its import is part of a user's first-call cost

    import deeparch_kernels as dk
    from deeparch_kernels.testing import reference_model
    import_s = time.perf_counter() - t0

    m = dk.fuse(reference_model(model).eval()).to(device=device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)

    def forward() -> float:
        t = time.perf_counter()
        m(x)
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        first = forward()
        later = [forward() for _ in range(15)]
    return {"import_s": round(import_s, 2), "first_forward_ms": round(first * 1e3, 1),
            "later_forward_ms": round(statistics.median(later) * 1e3, 2),
            "keys": len(dk.backends.cached_choices()), "threads": torch.get_num_threads(),
            "exclusions": [str(e) for e in dk.backends.exclusions()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.model, a.batch, a.device)))
        return
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, DEEPARCH_CACHE_DIR=cache)
        for what in ("empty cache", "choices on disk"):
            out = subprocess.run([sys.executable, __file__, "--child", "--model", a.model, "--batch",
                                  str(a.batch), "--device", a.device], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(f"{what:>16}: {out}")


if __name__ == "__main__":
    main()
