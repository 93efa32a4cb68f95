"""Compile the Triton kernels for a GPU that is not here (no driver needed) and report what
the compiler says of each configuration: shared memory, registers, spill stack.

    python scripts/triton_aot_check.py [--arch 90] [--dtypes fp16,bf16,fp32] [--quick]

Catches, on a CPU-only machine, what the interpreter cannot: a kernel that does not compile
for the GPU, a configuration that needs more shared memory than the card has (227 KB on
sm_90, 163 KB on sm_80), or one that spills registers on the benchmarked shapes. Exit status 1
on any of those.

The arguments are the launcher's own: fused_conv2d runs once per shape with the kernel launch
captured, and each captured launch is compiled as Triton's runtime would specialise it (an
int equal to 1 becomes a constant, a multiple of 16 and every pointer are marked 16-divisible),
once per autotuning configuration.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# This checkout's package, not whichever one pip installed (python puts scripts/ on the path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deeparch_kernels.triton import add_relu as tadd  # noqa: E402
from deeparch_kernels.triton import conv as tconv  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (N, C, H, W, K, k, stride, split_k): VGG/ResNet 3x3 at batch 32 and batch 1 with split-K
# (the benchmarked shapes: channels multiples of 64), then the C = 3 stem and odd channel
# counts, which take the masked, unvectorised path and may spill (reported, not failed).
SHAPES = [
    (32, 64, 56, 56, 64, 3, 1, 1),
    (1, 256, 14, 14, 256, 3, 1, 8),
    (1, 3, 64, 64, 64, 7, 2, 1),
    (2, 37, 9, 11, 40, 3, 2, 1),
]
STRICT_SHAPES = 2  # the first two: any compile failure, shared-memory overflow or spill fails
SPILL_SLACK = 64  # bytes of spill stack tolerated there (a few registers around a call)


class _Capture:
    """Stands in for torch.library.wrap_triton: records (kernel, args, kwargs), runs nothing."""
    calls: list = []

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Capture.calls.append((self.fn, args, kwargs))


def captured_launches(shape, dtype):
    N, C, H, W, K, k, s, split = shape
    cl = torch.channels_last
    x = torch.empty(N, C, H, W, dtype=dtype).contiguous(memory_format=cl)
    w = torch.empty(K, C, k, k, dtype=dtype).contiguous(memory_format=cl)
    b = torch.empty(K, dtype=dtype)
    Ho = (H + 2 * (k // 2) - k) // s + 1
    Wo = (W + 2 * (k // 2) - k) // s + 1
    r = torch.empty(N, K, Ho, Wo, dtype=dtype).contiguous(memory_format=cl) if s == 1 else None
    orig, env = tconv.wrap_triton, os.environ.get("TRITON_INTERPRET")
    _Capture.calls = []
    tconv.wrap_triton = _Capture
    os.environ["TRITON_INTERPRET"] = "1"  # lets the launcher take CPU tensors; kernels untouched
    try:
        tconv.fused_conv2d(x, w, b, r, (s, s), (k // 2, k // 2), True, split_k=split,
                           config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16})
    finally:
        tconv.wrap_triton = orig
        if env is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = env
    return _Capture.calls


def specialise(fn, args, constexprs):
    """signature, constants and attrs as Triton's runtime derives them from the values."""
    sig, const, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        v = args[i]
        if isinstance(v, torch.Tensor):
            sig[p.name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, int) and v == 1:
            sig[p.name] = "constexpr"
            const[p.name] = 1
        else:
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def compile_kernel(fn, sig, const, attrs, num_warps, num_stages, arch):
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_one(fn, sig, const, attrs, num_warps, num_stages, arch):
    t = time.perf_counter()
    k = compile_kernel(fn, sig, const, attrs, num_warps, num_stages, arch)
    seconds = time.perf_counter() - t
    return {"shared": k.metadata.shared, **_resource_usage(k.asm["cubin"]), "seconds": seconds}


def conv_kernel_for(shape, dtype, config, arch=90, split_k=1):
    """The conv kernel compiled for `shape` (as SHAPES) with one configuration."""
    fn, args, kw = next(c for c in captured_launches(shape[:7] + (split_k,), dtype)
                        if c[0] is tconv.conv_kernel)
    const = {n: kw[n] for n in kw if n not in ("num_warps", "num_stages")}
    const.update({k: config[k] for k in tconv._CONFIG_KEYS}, DOT_FP32=False, EXACT_BF16=False)
    sig, const, attrs = specialise(fn, args, const)
    return compile_kernel(fn, sig, const, attrs, config.get("num_warps", 4),
                          config.get("num_stages", 3), arch)


# Issue 11: x of 1x512x3x2,100,000 fp16 with a 3x3 kernel. Every stride is below 2^31 (so the
# launcher passes them as i32), but (KH-1) * sxh is not: an i32 product of a stride wraps.
BIG_SHAPE = (1, 512, 3, 2_100_000, 64, 3, 1)
_STRIDES = ("sxn", "sxc", "sxh", "sxw", "swk", "swc", "swh", "sww",
            "srn", "src", "srh", "srw", "syn", "syk", "syh", "syw")


def check_offsets_64bit() -> int:
    """Fails when the conv kernel's TTIR multiplies a stride argument in 32 bits."""
    k = conv_kernel_for(BIG_SHAPE, torch.float16, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 32})
    ttir = k.asm["ttir"]
    names = "|".join(_STRIDES)
    bad = [ln.strip() for ln in ttir.splitlines()
           if re.search(rf"arith\.muli .*%({names})\b.*: i32\b", ln)]
    muls64 = [ln for ln in ttir.splitlines() if re.search(r"arith\.muli .*: i64\b", ln)]
    print(f"offsets: {len(bad)} i32 multiplies of a stride argument, {len(muls64)} i64 multiplies "
          f"(x {BIG_SHAPE[:4]}, 3x3, fp16)")
    for ln in bad:
        print(f"BAD  {ln}")
    return 1 if bad or not muls64 else 0


def _resource_usage(cubin: bytes) -> dict:
    """Registers and spill stack of the one kernel in a cubin, from the cuobjdump that ships
    inside Triton's package (n_regs/n_spills are only filled in when a driver loads it)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return {"n_regs": None, "stack": None}
    return {"n_regs": int(m.group(1)), "stack": int(m.group(2)) + int(m.group(4))}


def jobs(dtypes, quick):
    cfgs = tconv.conv_configs()
    if quick:
        cfgs = [tconv.conv_configs()[0], next(c for c in cfgs if c.kwargs["BLOCK_M"] == 32)]
    shapes = SHAPES[:2] if quick else SHAPES
    for dname in dtypes:
        dtype = DTYPES[dname]
        for prec in (["tf32", "ieee"] if dtype == torch.float32 else ["tf32"]):
            for si, shape in enumerate(shapes):
                strict = si < STRICT_SHAPES
                for fn, args, kw in captured_launches(shape, dtype):
                    tag = f"{dname} {prec} N{shape[0]} C{shape[1]} {shape[5]}x{shape[5]}s{shape[6]}"
                    if fn is tconv.conv_kernel:
                        for c in cfgs:
                            const = {n: kw[n] for n in kw if n not in ("num_warps", "num_stages")}
                            const.update(c.kwargs, DOT_FP32=False, EXACT_BF16=False,
                                         INPUT_PRECISION=prec)
                            name = (f"conv {tag} split{const['SPLIT_K']} "
                                    f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_C']}"
                                    f" w{c.num_warps} s{c.num_stages}")
                            yield name, strict, fn, args, const, c.num_warps, c.num_stages
                    else:  # the split-K epilogue, with the GPU's tiles (not the interpreter's)
                        const = {n: kw[n] for n in kw if n not in ("num_warps", "num_stages")}
                        bm, bn = tconv.splitk_epilogue_blocks(shape[0] * shape[2] * shape[3]
                                                              // shape[6] ** 2, shape[4], False)
                        const.update(EXACT_BF16=False, BLOCK_M=bm, BLOCK_N=bn)
                        yield f"{fn.__name__} {tag}", strict, fn, args, const, \
                            kw.get("num_warps", 4), 1
        n = 1 << 20
        a = torch.empty(n, dtype=dtype)
        yield f"add_relu {dname}", True, tadd.add_relu_kernel, (a, a, a, n), \
            {"BLOCK": 4096, "EXACT_BF16": False}, 4, 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--quick", action="store_true", help="two configs and two shapes")
    ap.add_argument("--offsets", action="store_true",
                    help="only check that no stride is multiplied in 32 bits (TTIR)")
    a = ap.parse_args(argv)
    if a.offsets:
        return check_offsets_64bit()
    limit = SMEM_LIMIT.get(a.arch, 99 * 1024)
    bad = notes = 0
    print(f"triton {triton.__version__}, target sm_{a.arch}, shared memory limit {limit // 1024} KB")
    for name, strict, fn, args, const, nw, ns in jobs(a.dtypes.split(","), a.quick):
        try:
            sig, const, attrs = specialise(fn, args, const)
            r = compile_one(fn, sig, const, attrs, nw, ns, a.arch)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            bad += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[:1]}")
            continue
        issues, spill = [], r["stack"] or 0
        if r["shared"] > limit:
            issues.append(f"shared {r['shared']} > {limit}")
        if spill > (SPILL_SLACK if strict else 0):
            issues.append(f"{spill} bytes of spill stack")
        failed = bool(issues) and (strict or r["shared"] > limit)
        bad += failed
        notes += bool(issues) and not failed
        tag = "BAD " if failed else ("note" if issues else "ok  ")
        print(f"{tag} {name}: shared {r['shared'] / 1024:.1f} KB, regs "
              f"{r['n_regs']}, stack {r['stack']} B, {r['seconds']:.1f} s"
              + (f"  <- {'; '.join(issues)}" if issues else ""), flush=True)
    print(f"{bad} problem(s), {notes} note(s) (spills on the stem / odd-channel shapes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
