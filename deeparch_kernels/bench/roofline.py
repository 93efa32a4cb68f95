"""The device's two ceilings, measured once per run (METHOD.md: "datasheet rates are leads"):
the streaming bandwidth (the better of ``dst.copy_(src)`` and the in-place ``dst.add_(src)``,
stored as ``ceilings.copy``) for add+ReLU's GB/s, and the matmul rate in the dtype (TF32 where
fp32 convolutions use it; on a CPU the better of BLAS and oneDNN) for convolutions' TFLOP/s.

Bytes (``form_bytes``) are counted as the ceiling counts them: inputs read once, the output
written once, and on a CPU the write-allocate read of an out-of-place output (an in-place form
writes back lines it has just read), so that no form exceeds 100% by moving uncounted bytes.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .._precision import conv_allows_tf32
from ..timing import Timer
from .cases import AddCase, dtype_name


def form_bytes(case, op: str, device: torch.device) -> int:
    """The bytes a row's form moves, as the streaming ceiling counts them (see above)."""
    if isinstance(case, AddCase) and op == "add_relu" and device.type == "cpu":
        return case.bytes // 3 * 4  # a, b, out; plus out's write-allocate read
    return case.bytes


def streaming_patterns(src: torch.Tensor, dst: torch.Tensor) -> Dict[str, Tuple[int, Callable]]:
    """The ceiling's two patterns on ``src`` and ``dst``: {name: (bytes counted, call)}."""
    nbytes = src.numel() * src.element_size()
    return {"copy": ((3 if src.device.type == "cpu" else 2) * nbytes, lambda: dst.copy_(src)),
            "update": (3 * nbytes, lambda: dst.add_(src))}


def measure_copy(device: torch.device, timer: Timer, nbytes: Optional[int] = None) -> Dict:
    """The streaming ceiling: the faster of copy_ and add_ over ``nbytes`` buffers, in GB/s."""
    n = (nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))) // 4
    patterns = streaming_patterns(torch.rand(n, device=device), torch.rand(n, device=device))
    moved, ms = max(((b, timer(fn).median_ms) for b, fn in patterns.values()), key=lambda m: m[0] / m[1])
    return {"bytes": moved, "median_ms": ms, "gbps": moved / (ms * 1e-3) / 1e9}


def measure_matmul(device: torch.device, dtype: torch.dtype, timer: Timer, n: Optional[int] = None) -> Dict:
    n = n or (8192 if device.type == "cuda" else 2048)
    tf32 = device.type == "cuda" and dtype == torch.float32 and conv_allows_tf32()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32 or old
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        t = timer(lambda: torch.mm(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return {"n": n, "dtype": dtype_name(dtype), "tf32": tf32, "median_ms": t.median_ms,
            "tflops": 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12}


def gemm_as_conv_tflops(device: torch.device, dtype: torch.dtype, timer: Timer, n: int) -> float:
    """The TFLOP/s of an n x n x n GEMM run as a 1x1 channels_last convolution: on a CPU that goes
    through oneDNN, which can beat torch.mm's BLAS (so convolutions would otherwise exceed "100%")."""
    x = torch.randn(1, n, n // 32, 32, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    t = timer(lambda: torch.nn.functional.conv2d(x, w))
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device, dtypes, timer: Timer, *, quick: bool = False) -> Dict:
    """{"copy": {...}, "matmul": {dtype name: {...}}}."""
    small = quick and device.type != "cuda"
    out = {"copy": measure_copy(device, timer, (64 << 20) if small else None), "matmul": {}}
    for dt in dtypes:
        try:
            m = measure_matmul(device, dt, timer, 1024 if small else None)
            if device.type == "cpu":  # the best GEMM the libraries here have: BLAS or oneDNN
                conv = gemm_as_conv_tflops(device, dt, timer, m["n"])
                m["mm_tflops"], m["conv1x1_tflops"], m["tflops"] = m["tflops"], conv, max(m["tflops"], conv)
            out["matmul"][dtype_name(dt)] = m
        except Exception as e:  # e.g. a dtype the CPU's BLAS does not do
            out["matmul"][dtype_name(dt)] = {"error": f"{type(e).__name__}: {e}"}
    return out
