"""Small cases that exercise every CUDA kernel path, for compute-sanitizer (memcheck, racecheck):
aligned and unaligned add+ReLU, the tensor-core conv path (C, K multiples of 8) with and without
split-K, the generic path (C=3, odd K), strides 1 and 2, 1x1/3x3/7x7, every epilogue."""
import itertools

import torch

import deeparch_kernels as dk

dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for n in (1, 7, 4096 + 3):
        a = torch.randn(n + 1, device=dev, dtype=dtype, generator=g)
        b = torch.randn(n + 1, device=dev, dtype=dtype, generator=g)
        dk.add_relu(a[1:], b[1:], backend="cuda")  # unaligned: scalar path
        dk.add_relu(a[:n], b[:n], backend="cuda")
    for (C, K, k, s), (bias, res, relu) in itertools.product(
        [(3, 16, 7, 2), (16, 24, 3, 1), (32, 64, 3, 2), (64, 64, 1, 1), (5, 7, 3, 1),
         (264, 64, 3, 1)],  # the last: split-K (9 slices of 9 k-tiles)
        itertools.product([False, True], repeat=3),
    ):
        x = torch.randn(2, C, 13, 11, device=dev, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(K, C, k, k, device=dev, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
        bb = torch.randn(K, device=dev, dtype=dtype, generator=g) if bias else None
        p = k // 2
        Ho, Wo = (13 + 2 * p - k) // s + 1, (11 + 2 * p - k) // s + 1
        r = torch.randn(2, K, Ho, Wo, device=dev, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last) if res else None
        dk.fused_conv2d(x, w, bb, stride=s, residual=r, relu=relu, backend="cuda")
torch.cuda.synchronize()
print("sanitize cases done")
