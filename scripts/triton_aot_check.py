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


def captured_launches(shape, dtype, tma=False):
    """The launches fused_conv2d makes for `shape` (meta tensors: nothing is allocated), with
    conv_kernel, or conv_tma_kernel when tma (stride 1, C and K multiples of 8)."""
    N, C, H, W, K, k, s, split = shape
    cl, meta = torch.channels_last, "meta"
    x = torch.empty(N, C, H, W, dtype=dtype, device=meta).contiguous(memory_format=cl)
    w = torch.empty(K, C, k, k, dtype=dtype, device=meta).contiguous(memory_format=cl)
    b = torch.empty(K, dtype=dtype, device=meta)
    Ho = (H + 2 * (k // 2) - k) // s + 1
    Wo = (W + 2 * (k // 2) - k) // s + 1
    r = (torch.empty(N, K, Ho, Wo, dtype=dtype, device=meta).contiguous(memory_format=cl)
         if s == 1 else None)
    config = ({"BLOCK_H": 4, "BLOCK_W": 4, "BLOCK_N": 16, "BLOCK_C": 16} if tma
              else {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16})
    orig, env = tconv.wrap_triton, os.environ.get("TRITON_INTERPRET")
    _Capture.calls = []
    tconv.wrap_triton = _Capture
    os.environ["TRITON_INTERPRET"] = "1"  # lets the launcher take non-CUDA tensors
    try:
        tconv.fused_conv2d(x, w, b, r, (s, s), (k // 2, k // 2), True, split_k=split,
                           config=config, tma=tma)
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


def _gpu_constexprs(kw, config, keys, **extra):
    const = {n: kw[n] for n in kw if n not in ("num_warps", "num_stages") + tuple(keys)}
    const.update({k: config[k] for k in keys}, DOT_FP32=False, EXACT_BF16=False, **extra)
    return const


def conv_kernel_for(shape, dtype, config, arch=90, split_k=1, tma=False):
    """conv_kernel (or conv_tma_kernel) compiled for `shape` (as SHAPES) with one config."""
    kernel = tconv.conv_tma_kernel if tma else tconv.conv_kernel
    keys = tconv._TMA_CONFIG_KEYS if tma else tconv._CONFIG_KEYS
    fn, args, kw = next(c for c in captured_launches(shape[:7] + (split_k,), dtype, tma)
                        if c[0] is kernel)
    sig, const, attrs = specialise(fn, args, _gpu_constexprs(kw, config, keys))
    return compile_kernel(fn, sig, const, attrs, config.get("num_warps", 4),
                          config.get("num_stages", 3), arch)


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_counts(cubin: bytes) -> dict:
    """Instruction counts (by opcode with its modifiers) of a cubin's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    counts: dict = {}
    for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[\w]+)*)", sass):
        counts[op] = counts.get(op, 0) + 1
    return counts


def _family(counts: dict, prefix: str) -> int:
    return sum(n for op, n in counts.items() if op == prefix or op.startswith(prefix + "."))


# Issue 15: C = 24 and 40 (not multiples of 16) used to lose every 16-byte async copy.
VEC_SHAPES = [(32, 24, 56, 56, 64, 3, 1), (32, 40, 28, 28, 40, 3, 2), (32, 64, 56, 56, 64, 3, 1)]
SM90_REGS, SM90_SMEM = 65536, 228 * 1024


def check_sass(dtypes=("fp16",)) -> int:
    """SASS of the conv kernels for sm_90: conv_kernel's loop for C = 24 / 40 uses 16-byte
    async copies (LDGSTS...128) and no 2-byte loads; conv_tma_kernel loads by TMA (UTMALDG) into
    WGMMA (HGMMA), and its 128x128 tiles fit two CTAs per SM (registers and shared memory)."""
    bad = 0
    cfgs = [{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_C": 32, "num_warps": 8, "num_stages": 4},
            {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 4}]
    for dname in dtypes:
        dtype = DTYPES[dname]
        for shape in VEC_SHAPES:
            for cfg in cfgs:
                k = conv_kernel_for(shape, dtype, cfg)
                c = sass_counts(k.asm["cubin"])
                res = _resource_usage(k.asm["cubin"])
                ldgsts128 = sum(n for op, n in c.items() if op.startswith("LDGSTS") and op.endswith(".128"))
                u16 = c.get("LDG.E.U16", 0) + c.get("LDG.E.U16.CONSTANT", 0)
                ok = ldgsts128 > 0 and u16 == 0
                bad += not ok
                print(f"{'ok  ' if ok else 'BAD '} conv_kernel {dname} C{shape[1]} K{shape[4]} "
                      f"s{shape[6]} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_C']}: "
                      f"{ldgsts128} LDGSTS.128, {u16} LDG.U16, {_family(c, 'HGMMA')} HGMMA, "
                      f"regs {res['n_regs']}, stack {res['stack']} B")
        for cfg in tconv.tma_configs():
            conf = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            k = conv_kernel_for((32, 64, 56, 56, 128, 3, 1), dtype, conf, tma=True)
            c = sass_counts(k.asm["cubin"])
            res = _resource_usage(k.asm["cubin"])
            threads = 32 * cfg.num_warps
            ctas = min(SM90_REGS // max(1, res["n_regs"] * threads), SM90_SMEM // (k.metadata.shared + 1024))
            rows = cfg.kwargs["BLOCK_H"] * cfg.kwargs["BLOCK_W"]
            ok = (_family(c, "UTMALDG") > 0 and _family(c, "HGMMA") > 0 and res["stack"] == 0
                  and ctas >= 2)
            bad += not ok
            print(f"{'ok  ' if ok else 'BAD '} conv_tma_kernel {dname} {cfg.kwargs['BLOCK_H']}x"
                  f"{cfg.kwargs['BLOCK_W']}(={rows})x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_C']} "
                  f"w{cfg.num_warps} s{cfg.num_stages}: {_family(c, 'UTMALDG')} UTMALDG, "
                  f"{_family(c, 'HGMMA')} HGMMA, {_family(c, 'LDGSTS')} LDGSTS, regs {res['n_regs']}, "
                  f"stack {res['stack']} B, shared {k.metadata.shared / 1024:.1f} KB, {ctas} CTAs/SM")
        # Degenerate images (an integer argument equal to 1 is compiled in as a constant).
        for shape in [(1, 64, 1, 9, 64, 3, 1), (2, 64, 7, 1, 64, 1, 1), (1, 64, 1, 1, 64, 1, 1)]:
            for tma in (False, True):
                cfg = ({"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 64, "BLOCK_C": 64} if tma
                       else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 64})
                try:
                    conv_kernel_for(shape, dtype, cfg, tma=tma)
                    print(f"ok   {'conv_tma_kernel' if tma else 'conv_kernel'} {dname} compiles for "
                          f"H={shape[2]}, W={shape[3]}")
                except Exception as e:  # noqa: BLE001 - report it
                    bad += 1
                    print(f"BAD  {'conv_tma_kernel' if tma else 'conv_kernel'} {dname} H={shape[2]}, "
                          f"W={shape[3]}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
    print(f"sass: {bad} problem(s)")
    return 1 if bad else 0


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
    cfgs, tma_cfgs = tconv.conv_configs(), tconv.tma_configs()
    if quick:
        cfgs = [tconv.conv_configs()[0], next(c for c in cfgs if c.kwargs["BLOCK_M"] == 32)]
        tma_cfgs = tma_cfgs[:1]
    shapes = SHAPES[:2] if quick else SHAPES
    for dname in dtypes:
        dtype = DTYPES[dname]
        for prec in (["tf32", "ieee"] if dtype == torch.float32 else ["tf32"]):
            for si, shape in enumerate(shapes):
                strict = si < STRICT_SHAPES
                tma = (dtype != torch.float32 and shape[6] == 1 and shape[1] % 8 == 0
                       and shape[4] % 8 == 0)
                launches = captured_launches(shape, dtype) + (
                    captured_launches(shape, dtype, tma=True) if tma else [])
                for fn, args, kw in launches:
                    tag = f"{dname} {prec} N{shape[0]} C{shape[1]} {shape[5]}x{shape[5]}s{shape[6]}"
                    if fn is tconv.conv_kernel:
                        for c in cfgs:
                            const = _gpu_constexprs(kw, c.kwargs, tconv._CONFIG_KEYS,
                                                    INPUT_PRECISION=prec)
                            name = (f"conv {tag} split{const['SPLIT_K']} "
                                    f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_C']}"
                                    f" w{c.num_warps} s{c.num_stages}")
                            yield name, strict, fn, args, const, c.num_warps, c.num_stages
                    elif fn is tconv.conv_tma_kernel:
                        for c in tma_cfgs:
                            const = _gpu_constexprs(kw, c.kwargs, tconv._TMA_CONFIG_KEYS,
                                                    INPUT_PRECISION=prec)
                            kk = c.kwargs
                            name = (f"conv_tma {tag} split{const['SPLIT_K']} {kk['BLOCK_H']}x"
                                    f"{kk['BLOCK_W']}x{kk['BLOCK_N']}x{kk['BLOCK_C']} "
                                    f"w{c.num_warps} s{c.num_stages}")
                            yield name, strict, fn, args, const, c.num_warps, c.num_stages
                    else:  # the split-K epilogue, with the GPU's tiles (not the interpreter's)
                        const = {n: kw[n] for n in kw if n not in ("num_warps", "num_stages", "BLOCK_M", "BLOCK_N")}
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
    ap.add_argument("--sass", action="store_true",
                    help="only check the SASS: 16-byte async copies for C = 24/40, TMA + WGMMA "
                         "and 2 CTAs/SM for the TMA kernel")
    a = ap.parse_args(argv)
    if a.offsets:
        return check_offsets_64bit()
    if a.sass:
        return check_sass(tuple(d for d in a.dtypes.split(",") if d != "fp32"))
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
