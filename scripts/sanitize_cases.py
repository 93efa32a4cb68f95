"""Small cases that exercise every CUDA kernel path, for compute-sanitizer (memcheck, racecheck):
aligned and unaligned add+ReLU, the tensor-core conv path (C, K multiples of 8) with and without
split-K, the generic path (C=3, odd K) and the same stem zero-padded onto the tensor cores
(DEEPARCH_CUDA_PAD_CHANNELS=1), strides 1 and 2, 1x1/3x3/7x7, every epilogue; and the CUTLASS
sm_90a kernels (each tile, every epilogue, a misaligned view) where they are built and the GPU
is a Hopper.

    python scripts/sanitize_cases.py [--backends cuda,cutlass]   (default: those available)
"""
import argparse
import itertools
import os

import torch

import deeparch_kernels as dk

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--backends", default="cuda,cutlass")
wanted = [b for b in ap.parse_args().backends.split(",") if b]
avail = dk.available_backends("cuda")
run = [b for b in wanted if avail[b].available]
print("sanitize cases on", run, "; not available:",
      {b: avail[b].reason for b in wanted if not avail[b].available})

dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
cl = torch.channels_last


def conv_case(backend, dtype, C, K, k, s, bias, res, relu, N=2, H=13, W=11):
    x = torch.randn(N, C, H, W, device=dev, dtype=dtype, generator=g).contiguous(memory_format=cl)
    w = torch.randn(K, C, k, k, device=dev, dtype=dtype, generator=g).contiguous(memory_format=cl)
    bb = torch.randn(K, device=dev, dtype=dtype, generator=g) if bias else None
    p = k // 2
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    r = (torch.randn(N, K, Ho, Wo, device=dev, dtype=dtype, generator=g).contiguous(memory_format=cl)
         if res else None)
    dk.fused_conv2d(x, w, bb, stride=s, residual=r, relu=relu, backend=backend)


if "cuda" in run:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in (1, 7, 4096 + 3):
            a = torch.randn(n + 1, device=dev, dtype=dtype, generator=g)
            b = torch.randn(n + 1, device=dev, dtype=dtype, generator=g)
            dk.add_relu(a[1:], b[1:], backend="cuda")  # unaligned: scalar path
            dk.add_relu(a[:n], b[:n], backend="cuda")
        for (C, K, k, s), epi in itertools.product(
            [(3, 16, 7, 2), (16, 24, 3, 1), (32, 64, 3, 2), (64, 64, 1, 1), (5, 7, 3, 1),
             (264, 64, 3, 1)],  # the last: split-K
            itertools.product([False, True], repeat=3),
        ):
            conv_case("cuda", dtype, C, K, k, s, *epi)
        if dtype != torch.float32:  # the stem zero-padded onto the tensor-core kernel
            os.environ["DEEPARCH_CUDA_PAD_CHANNELS"] = "1"
            conv_case("cuda", dtype, 3, 16, 7, 2, True, False, True)
            conv_case("cuda", dtype, 5, 16, 3, 1, True, True, True)
            os.environ.pop("DEEPARCH_CUDA_PAD_CHANNELS")

if "cutlass" in run:
    for dtype in (torch.float16, torch.bfloat16):
        # The 128x64 (K = 64), 64x128 (few pixels) and 128x128 tiles, strides 1/2, 1x1 and 7x7.
        for (N, C, H, K, k, s) in [(2, 64, 30, 64, 3, 1), (1, 128, 9, 128, 3, 1), (8, 128, 40, 256, 3, 1),
                                   (2, 16, 21, 64, 1, 2), (1, 8, 33, 64, 7, 2)]:
            for epi in itertools.product([False, True], repeat=3):
                conv_case("cutlass", dtype, C, K, k, s, *epi, N=N, H=H, W=H + 3)
        x = torch.randn(1 * 9 * 9 * 16 + 1, device=dev, dtype=dtype, generator=g)[1:]
        x = x.view(1, 9, 9, 16).permute(0, 3, 1, 2)  # misaligned: copied by the op
        w = torch.randn(16, 16, 3, 3, device=dev, dtype=dtype, generator=g)
        dk.fused_conv2d(x, w, None, backend="cutlass")
torch.cuda.synchronize()
print("sanitize cases done")
