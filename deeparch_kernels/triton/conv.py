"""Fused convolution in Triton: ``y = relu?(conv2d(x, w, stride, padding) + bias + residual)``.

Implicit GEMM over NHWC (groups=1, dilation=1, any kernel size and stride):

  * GEMM rows    m = (n, ho, wo)   M = N * Ho * Wo
  * GEMM columns k = out channel   K
  * reduction    (r, s, c)         KH * KW * C, c fastest (x and weight are channels_last)

Each program owns one [BLOCK_M, BLOCK_N] output tile (programs that share the same rows of x
are launched next to each other, so the gathered activations are reused from L2). Its single
reduction loop walks the filter taps (r, s) and, inside each tap, C in BLOCK_C slices: the A
tile [BLOCK_M, BLOCK_C] is gathered from x at (n, ho*sh - ph + r, wo*sw - pw + s, c) with a
mask for the image border / padding and c >= C (masked values are 0), the B tile
[BLOCK_C, BLOCK_N] is read from weight[k, r, s, c], and ``tl.dot`` accumulates in fp32.
One flat loop (not a loop per tap) lets Triton software-pipeline it across taps.

Two kernels share this loop and the epilogue:

  * ``conv_kernel`` gathers both tiles with pointer loads (any stride, any C, every dtype).
    Triton specialises an integer argument's divisibility only by 16, so C = 24 or 40 would
    lose every 16-byte access (2-byte loads, no async copies); the launcher passes C_VEC / K_VEC
    (the largest of 8, 4, 2, 1 dividing C / K and their strides) and the kernel rounds C, K and
    the strides down to those multiples (a no-op on the values), which tells the compiler.
  * ``conv_tma_kernel`` (Hopper, stride 1, fp16/bf16, C and K multiples of 8) feeds the tensor
    cores through tensor descriptors (TMA): x as a 4-D (N, H, W, C) descriptor whose
    [1, BLOCK_H, BLOCK_W, BLOCK_C] box at (n, ho0 + r - ph, wo0 + s - pw, c0) is the A tile of a
    BLOCK_H x BLOCK_W patch of output pixels (TMA zero-fills what lies outside the image: the
    padding), the weight as a 3-D (K, KH*KW, C) descriptor. No address arithmetic or masks in
    the loop; the output tile is that 2-D patch of one image.

Split-K (small M: the 14x14 and 7x7 layers at batch 1 give 8-16 output tiles for 132 SMs):
``split_k_for`` picks the slice count from the wave count, program_id(1) takes one of the
balanced contiguous slices of the reduction (never an empty one), and each writes its fp32
partial tile to a workspace; ``splitk_epilogue_kernel`` then sums the slices in a fixed order
(deterministic, no atomics) and applies the epilogue.

Epilogue (Triton tutorial 03 pattern), on the fp32 accumulator before the single down-cast:
``+ bias[k]``, ``+ residual`` (loaded, widened to fp32), then ReLU as ``where(v < 0, 0, v)``,
which lets NaN through exactly as torch.relu does. Base offsets are 64-bit.

Precision: fp16/bf16 tiles go to the tensor cores as they are; fp32 uses TF32 iff
torch's rule for convolutions allows it (``torch.backends.cudnn.allow_tf32`` or the newer
``torch.backends.cudnn.conv.fp32_precision``: deeparch_kernels._precision), else exact fp32.
Triton's CPU interpreter (TRITON_INTERPRET=1) keeps bf16 as raw uint16 bits and its ``tl.dot``
multiplies those bits as integers, so there (only) both tiles are widened to fp32 before the
dot (DOT_FP32) and the output is rounded to bf16 by hand (``cast_out``); on the GPU both
constexprs are False and compile away.

``fused_conv2d`` is the launcher; ``conv_configs()`` / ``tma_configs()`` the autotuning
candidates; ``conv_kernel`` / ``conv_tma_kernel`` the plain JIT kernels (``config=`` forces one
configuration) and ``conv_kernel_autotuned`` / ``conv_tma_kernel_autotuned`` the autotuned ones.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from .._conv_args import check_conv_args, expected_residual
from .._precision import conv_allows_tf32
from ._common import cast_out, exact_bf16, interpreting, wrap_triton

_OP = "fused_conv2d"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_C")
_TMA_CONFIG_KEYS = ("BLOCK_H", "BLOCK_W", "BLOCK_N", "BLOCK_C")


def conv_configs() -> list:
    """Autotuning candidates (the GPU tests run every one of them for correctness).

    All fit an H100/H200's 227 KB of shared memory in fp32 too (stages * (BM*BC + BC*BN) *
    4 bytes <= 192 KB). scripts/triton_aot_check.py compiles each for sm_90 without a GPU, as
    the runtime specialises them: on the benchmarked shapes (channels multiples of 64) none
    spills in fp16/bf16/TF32/fp32 with Triton 3.6 or 3.8 (128x256 and 256x128 tiles did, so
    they are not here); odd channel counts and the C = 3 stem take the masked path, where the
    large tiles spill (correct, slower). Large tiles for big M and K = 128..512, narrow ones for small M (e.g.
    512x7x7 at batch 1, M = 49) so that more programs run, and BLOCK_C = 16 for the C = 3 stem.
    """
    c = triton.Config
    return [
        # num_warps=8, large tiles
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_C": 32}, num_warps=8, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_C": 64}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_C": 32}, num_warps=8, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_C": 32}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_C": 64}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_C": 64}, num_warps=8, num_stages=3),
        # num_warps=4, medium tiles
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_C": 32}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_C": 32}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 64}, num_warps=4, num_stages=3),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 32}, num_warps=4, num_stages=4),
        # small M (late layers at batch 1)
        c({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_C": 64}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_C": 64}, num_warps=4, num_stages=3),
        c({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 64}, num_warps=4, num_stages=4),
        # small C (the 7x7 stem, C = 3)
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_C": 16}, num_warps=4, num_stages=4),
    ]


@triton.jit
def _multiple(v, VEC: tl.constexpr):
    """v rounded down to a multiple of VEC: the same value (the launcher chose VEC dividing v),
    now known to the compiler as a multiple of VEC (16-byte accesses for VEC = 8 and fp16)."""
    if VEC == 1:
        return v
    else:
        return (v // VEC) * VEC


@triton.jit
def _pixels(offs_m, HW, Wo):
    """GEMM rows m -> (n, ho, wo), 64-bit (offs_m is)."""
    n_img = offs_m // HW
    rem = offs_m - n_img * HW
    ho = rem // Wo
    return n_img, ho, rem - ho * Wo


@triton.jit
def _epilogue_store(acc, n_img, ho, wo, m_mask, offs_n, K, b_ptr, r_ptr, y_ptr,
                    srn, src, srh, srw, syn, syk, syh, syw,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                    EXACT_BF16: tl.constexpr):
    """The fused epilogue on an fp32 [BLOCK_M, BLOCK_N] tile (row i = output pixel
    (n_img[i], ho[i], wo[i]), valid where m_mask; columns = output channels): + bias,
    + residual, ReLU (NaN passes), one down-cast, store into y."""
    n_mask = offs_n < K
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r_row = n_img * srn + ho * srh + wo * srw
        res = tl.load(r_ptr + (r_row[:, None] + (offs_n.to(tl.int64) * src)[None, :]),
                      mask=out_mask, other=0.0).to(tl.float32)
        acc += res
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN < 0 is False: NaN passes, as in torch.relu

    y_row = n_img * syn + ho * syh + wo * syw
    y_ptrs = y_ptr + (y_row[:, None] + (offs_n.to(tl.int64) * syk)[None, :])
    tl.store(y_ptrs, cast_out(acc, y_ptr, EXACT_BF16), mask=out_mask)


@triton.jit
def _k_slice(total, SPLIT_K: tl.constexpr):
    """This program's slice [lo, hi) of the `total` reduction steps: SPLIT_K balanced
    contiguous slices (sizes differ by at most one), none empty when SPLIT_K <= total."""
    if SPLIT_K > 1:
        pid_k = tl.program_id(1)
        return pid_k * total // SPLIT_K, (pid_k + 1) * total // SPLIT_K
    else:
        return 0, total


@triton.jit
def conv_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, ws_ptr,
    N, H, W, C, K, Ho, Wo,
    M, HW,  # N*Ho*Wo and Ho*Wo from the host: 64-bit there past 2^31 (products here would wrap)
    SH, SW, PH, PW,
    sxn, sxc, sxh, sxw,  # x (N, C, H, W) strides
    swk, swc, swh, sww,  # weight (K, C, KH, KW) strides
    srn, src, srh, srw,  # residual (N, K, Ho, Wo) strides
    syn, syk, syh, syw,  # y (N, K, Ho, Wo) strides
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, EXACT_BF16: tl.constexpr,
    SPLIT_K: tl.constexpr, C_VEC: tl.constexpr, K_VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program -> output tile; the K tiles of one row block are neighbours (x reuse in L2).
    # With SPLIT_K > 1, program_id(1) takes one contiguous slice of the reduction and writes
    # its fp32 partial tile to ws[split, m, k]; splitk_epilogue_kernel sums them in order.
    C = _multiple(C, C_VEC)  # see the module docstring: 16-byte accesses for C = 24, 40, ...
    sxn = _multiple(sxn, C_VEC)
    sxh = _multiple(sxh, C_VEC)
    sxw = _multiple(sxw, C_VEC)
    swk = _multiple(swk, C_VEC)
    swh = _multiple(swh, C_VEC)
    sww = _multiple(sww, C_VEC)
    K = _multiple(K, K_VEC)
    srn = _multiple(srn, K_VEC)
    srh = _multiple(srh, K_VEC)
    srw = _multiple(srw, K_VEC)
    syn = _multiple(syn, K_VEC)
    syh = _multiple(syh, K_VEC)
    syw = _multiple(syw, K_VEC)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: M may pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    n_mask = offs_n < K

    # Row m -> (n, ho, wo), and the top-left input pixel of its receptive field.
    n_img = offs_m // HW
    rem = offs_m - n_img * HW
    ho = (rem // Wo).to(tl.int32)
    wo = (rem % Wo).to(tl.int32)
    hi0 = ho * SH - PH
    wi0 = wo * SW - PW
    # 64-bit base of each row's receptive field in x (may point before the row: masked).
    x_row = n_img * sxn + hi0.to(tl.int64) * sxh + wi0.to(tl.int64) * sxw
    w_col = offs_n.to(tl.int64) * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_cb = tl.cdiv(C, BLOCK_C)
    it_lo, it_hi = _k_slice(KH * KW * num_cb, SPLIT_K)
    for it in range(it_lo, it_hi):
        tap = it // num_cb
        c0 = (it - tap * num_cb) * BLOCK_C
        r = tap // KW
        s = tap - r * KW
        hi = hi0 + r
        wi = wi0 + s
        row_ok = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        cc = c0 + offs_c
        c_ok = cc < C

        # Offsets in 64 bits: (KH-1) * sxh can pass 2^31 while every stride is below it (issue 11).
        r64 = r.to(tl.int64)
        s64 = s.to(tl.int64)
        cc64 = cc.to(tl.int64)
        a_ptrs = x_ptr + (x_row[:, None] + (r64 * sxh + s64 * sxw + cc64 * sxc)[None, :])
        a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b_ptrs = w_ptr + (w_col[None, :] + (r64 * swh + s64 * sww + cc64 * swc)[:, None])
        b = tl.load(b_ptrs, mask=c_ok[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:  # interpreter only: its dot cannot multiply bf16 (raw uint16 there)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if SPLIT_K > 1:
        ws_ptrs = (ws_ptr + tl.program_id(1).to(tl.int64) * M * K
                   + (offs_m[:, None] * K + offs_n[None, :].to(tl.int64)))
        tl.store(ws_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        n_img, ho, wo = _pixels(offs_m, HW, Wo)
        _epilogue_store(acc, n_img, ho, wo, m_mask, offs_n, K, b_ptr, r_ptr, y_ptr,
                        srn, src, srh, srw, syn, syk, syh, syw,
                        HAS_BIAS, HAS_RES, RELU, EXACT_BF16)


@triton.jit
def conv_tma_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, ws_ptr,
    N, H, W, C, K, Ho, Wo, M,
    PH, PW,
    srn, src, srh, srw,  # residual (N, K, Ho, Wo) strides
    syn, syk, syh, syw,  # y (N, K, Ho, Wo) strides
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, EXACT_BF16: tl.constexpr,
    SPLIT_K: tl.constexpr, K_VEC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Stride-1 convolution with both operands loaded by TMA (see the module docstring). x and
    weight are packed channels_last with C % 8 == 0 and 16-byte aligned bases (the launcher
    checks), so the descriptors' strides are known here rather than passed."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    C = _multiple(C, 8)
    K = _multiple(K, K_VEC)
    srn = _multiple(srn, K_VEC)
    srh = _multiple(srh, K_VEC)
    srw = _multiple(srw, K_VEC)
    syn = _multiple(syn, K_VEC)
    syh = _multiple(syh, K_VEC)
    syw = _multiple(syw, K_VEC)
    # 64-bit strides. (An integer argument equal to 1 arrives as a Python int, so only products
    # with C, never 1 here, are cast.)
    x_row = (W * C).to(tl.int64)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C], strides=[x_row * H, x_row, C, 1],
                                       block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_C])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, KH * KW, C],
                                       strides=[C.to(tl.int64) * (KH * KW), C, 1],
                                       block_shape=[BLOCK_N, 1, BLOCK_C])

    # Program -> (image n, patch row th, patch column tw, channel tile): channel tiles fastest,
    # so the programs that read the same x patch run together (L2 reuse).
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    tiles_w = tl.cdiv(Wo, BLOCK_W)
    tiles_h = tl.cdiv(Ho, BLOCK_H)
    pid_n = pid % num_pid_n
    t = pid // num_pid_n
    tw = t % tiles_w
    t = t // tiles_w
    th = t % tiles_h
    n = t // tiles_h
    ho0 = th * BLOCK_H
    wo0 = tw * BLOCK_W
    k0 = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_cb = tl.cdiv(C, BLOCK_C)
    it_lo, it_hi = _k_slice(KH * KW * num_cb, SPLIT_K)
    for it in range(it_lo, it_hi):
        tap = it // num_cb
        c0 = (it - tap * num_cb) * BLOCK_C
        r = tap // KW
        s = tap - r * KW
        a = x_desc.load([n, ho0 + r - PH, wo0 + s - PW, c0]).reshape(BLOCK_M, BLOCK_C)
        b = w_desc.load([k0, tap, c0]).reshape(BLOCK_N, BLOCK_C)
        if DOT_FP32:  # interpreter only, as in conv_kernel
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)

    offs_p = tl.arange(0, BLOCK_M)
    ho = (ho0 + offs_p // BLOCK_W).to(tl.int64)
    wo = (wo0 + offs_p % BLOCK_W).to(tl.int64)
    m_mask = (ho < Ho) & (wo < Wo)
    n_img = tl.zeros([BLOCK_M], dtype=tl.int64) + n
    offs_n = k0 + tl.arange(0, BLOCK_N)
    if SPLIT_K > 1:
        offs_m = (n_img * Ho + ho) * Wo + wo
        ws_ptrs = (ws_ptr + tl.program_id(1).to(tl.int64) * M * K
                   + (offs_m[:, None] * K + offs_n[None, :].to(tl.int64)))
        tl.store(ws_ptrs, acc, mask=m_mask[:, None] & (offs_n < K)[None, :])
    else:
        _epilogue_store(acc, n_img, ho, wo, m_mask, offs_n, K, b_ptr, r_ptr, y_ptr,
                        srn, src, srh, srw, syn, syk, syh, syw,
                        HAS_BIAS, HAS_RES, RELU, EXACT_BF16)


@triton.jit
def splitk_epilogue_kernel(
    ws_ptr, b_ptr, r_ptr, y_ptr,
    M, K, MK, HW, Wo,
    srn, src, srh, srw,
    syn, syk, syh, syw,
    n_split,  # a runtime loop bound: a constexpr one is unrolled, its loads all kept live
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    EXACT_BF16: tl.constexpr, K_VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Second pass of split-K: y = epilogue(sum over splits of ws[split]), the splits summed
    in a fixed order (deterministic, no atomics)."""
    K = _multiple(K, K_VEC)
    srn = _multiple(srn, K_VEC)
    srh = _multiple(srh, K_VEC)
    srw = _multiple(srw, K_VEC)
    syn = _multiple(syn, K_VEC)
    syh = _multiple(syh, K_VEC)
    syw = _multiple(syw, K_VEC)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < K)[None, :]
    ptrs = ws_ptr + (offs_m[:, None] * K + offs_n[None, :].to(tl.int64))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    MK = _multiple(MK, K_VEC)
    for _ in range(0, n_split):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += MK  # M * K, from the host (64-bit there when it must be)
    n_img, ho, wo = _pixels(offs_m, HW, Wo)
    _epilogue_store(acc, n_img, ho, wo, offs_m < M, offs_n, K, b_ptr, r_ptr, y_ptr,
                    srn, src, srh, srw, syn, syk, syh, syw,
                    HAS_BIAS, HAS_RES, RELU, EXACT_BF16)


def prune_configs(configs, nargs, **kwargs) -> list:
    """The autotuner's early pruning: drop the configurations whose tiles are mostly padding for
    this shape, so that fewer are compiled and timed (minutes on first use otherwise).

      * BLOCK_C above max(16, C rounded up to a power of two): the C = 3 stem keeps BLOCK_C = 16;
      * BLOCK_M above max(32, M rounded up), BLOCK_N above max(32, K rounded up): e.g. the 7x7
        layers at batch 1 (M = 49) keep BLOCK_M <= 64, K = 64 layers keep BLOCK_N <= 64.
    When nothing is left (tiny shapes), heuristic_config's choice is kept.
    """
    M, K, C = nargs["M"], nargs["K"], nargs["C"]
    cap_c = max(16, triton.next_power_of_2(max(int(C), 1)))
    cap_m = max(32, triton.next_power_of_2(max(int(M), 1)))
    cap_n = max(32, triton.next_power_of_2(max(int(K), 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= cap_c and c.kwargs["BLOCK_M"] <= cap_m
            and c.kwargs["BLOCK_N"] <= cap_n]
    if kept:
        return kept
    want = heuristic_config(int(M), int(K), int(C))
    return [c for c in configs if dict(c.kwargs, num_warps=c.num_warps,
                                       num_stages=c.num_stages) == want] or list(configs)


def tma_configs() -> list:
    """Autotuning candidates of conv_tma_kernel (fp16/bf16): the output tile is a BLOCK_H x
    BLOCK_W patch of pixels x BLOCK_N channels. scripts/triton_aot_check.py --sass compiles each
    for sm_90 (Triton 3.6 and 3.8): every one fits at least two CTAs per SM (the 128x128 tiles:
    128 registers x 256 threads, 56-80 KB of shared memory). A 16x8 patch (179 registers in
    bf16) and a 256x64 tile (171) did not, and are not here."""
    c = triton.Config
    return [
        c({"BLOCK_H": 8, "BLOCK_W": 16, "BLOCK_N": 128, "BLOCK_C": 32}, num_warps=8, num_stages=4),
        c({"BLOCK_H": 8, "BLOCK_W": 16, "BLOCK_N": 128, "BLOCK_C": 64}, num_warps=8, num_stages=3),
        c({"BLOCK_H": 8, "BLOCK_W": 16, "BLOCK_N": 64, "BLOCK_C": 64}, num_warps=4, num_stages=4),
        c({"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 128, "BLOCK_C": 64}, num_warps=4, num_stages=4),
        c({"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 64, "BLOCK_C": 64}, num_warps=4, num_stages=4),
    ]


def prune_tma_configs(configs, nargs, **kwargs) -> list:
    """prune_configs for conv_tma_kernel: a patch side above the output's (rounded up to a power
    of two, at least 8), BLOCK_N above max(64, K rounded up), BLOCK_C above max(32, C rounded up)."""
    Ho, Wo, K, C = (int(nargs[k]) for k in ("Ho", "Wo", "K", "C"))
    cap_h = max(8, triton.next_power_of_2(max(Ho, 1)))
    cap_w = max(8, triton.next_power_of_2(max(Wo, 1)))
    cap_n = max(64, triton.next_power_of_2(max(K, 1)))
    cap_c = max(32, triton.next_power_of_2(max(C, 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_H"] <= cap_h and c.kwargs["BLOCK_W"] <= cap_w
            and c.kwargs["BLOCK_N"] <= cap_n and c.kwargs["BLOCK_C"] <= cap_c]
    return kept or list(configs)


_AUTOTUNE_KEY = ["N", "H", "W", "C", "K", "Ho", "Wo", "PH", "PW", "KH", "KW",
                 "HAS_BIAS", "HAS_RES", "INPUT_PRECISION", "SPLIT_K"]  # + tensor dtypes (Triton)

conv_kernel_autotuned = triton.autotune(
    configs=conv_configs(),
    prune_configs_by={"early_config_prune": prune_configs},
    key=_AUTOTUNE_KEY + ["SH", "SW"],
)(conv_kernel)

conv_tma_kernel_autotuned = triton.autotune(
    configs=tma_configs(),
    prune_configs_by={"early_config_prune": prune_tma_configs},
    key=_AUTOTUNE_KEY,
)(conv_tma_kernel)


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def interpreter_config(M: int, K: int, C: int) -> dict:
    """The one configuration used under TRITON_INTERPRET=1: few, large programs (the
    interpreter's time grows with the number of programs and loop trips, not tile size)."""
    return {"BLOCK_M": _pow2_clamp(M, 16, 128), "BLOCK_N": _pow2_clamp(K, 16, 128),
            "BLOCK_C": _pow2_clamp(C, 16, 64), "num_warps": 4, "num_stages": 1}


def tma_interpreter_config(Ho: int, Wo: int, K: int, C: int) -> dict:
    """interpreter_config for conv_tma_kernel: one patch as large as the image (up to 16x16)."""
    bw, bh = _pow2_clamp(Wo, 1, 16), _pow2_clamp(Ho, 1, 16)
    while bh * bw < 16:  # tl.dot needs 16 rows
        bh *= 2
    return {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_N": _pow2_clamp(K, 16, 128),
            "BLOCK_C": _pow2_clamp(C, 16, 64), "num_warps": 4, "num_stages": 1}


# The wave model behind every shape-based choice here (split-K slices, the heuristic tiles) and
# in csrc/cuda/fused_conv2d.cu. A wave is the tiles the GPU runs at once (SMs x CTAs per SM);
# CTAs sharing an SM share its tensor cores, so a launch takes about as long as its busiest SM:
# ceil(tiles / SMs) CTAs, each (reduction steps + FILL) steps long, + PARTIAL more with split-K
# (its fp32 partial tile written and read back). A partial last wave costs a full one. The two
# constants are estimates (H100: a 64x64x64 step ~0.1 us, a 16 KB partial ~0.6 us per SM), not
# measurements: no Hopper GPU has run this yet.
FILL_STEPS = 2
PARTIAL_STEPS = 6
MAX_SPLIT_K = 16


def wave_cost(tiles: int, sm_count: int, steps: int, split: int = 1) -> int:
    """The busiest SM's work, in reduction steps, for `tiles` output tiles of `steps` steps
    each, cut into `split` slices (see FILL_STEPS above)."""
    per_slice = triton.cdiv(steps, split) + FILL_STEPS + (PARTIAL_STEPS if split > 1 else 0)
    return triton.cdiv(tiles * split, max(1, sm_count)) * per_slice


def heuristic_config(M: int, K: int, C: int, sm_count: int = 132) -> dict:
    """One configuration from the shape, no timing: used when DEEPARCH_TRITON_AUTOTUNE=0 (e.g.
    correctness runs on a GPU, where autotuning every shape costs minutes of compilation).
    BLOCK_C = 16 for C <= 16 (the stem); else the tile with the least wave_cost, weighted by
    how much slower a smaller tile computes one output (unmeasured: 1, 0.9, 0.75, 0.5)."""
    if C <= 16:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_C": 16, "num_warps": 4, "num_stages": 4}
    candidates = [  # (config, relative throughput per output element)
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_C": 32, "num_warps": 8, "num_stages": 4}, 1.0),
        ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 4}, 0.9),
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3}, 0.75),
        ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 4}, 0.5),
    ]

    def cost(cfg, eff):
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
        return wave_cost(tiles, sm_count, 1) * cfg["BLOCK_M"] * cfg["BLOCK_N"] / eff

    return dict(min(candidates, key=lambda ce: cost(*ce))[0])


def tma_heuristic_config(N: int, Ho: int, Wo: int, K: int, sm_count: int = 132) -> dict:
    """heuristic_config for conv_tma_kernel: among the pruned tma_configs(), the least
    wave_cost per output, 64-wide tiles weighted 0.85 (unmeasured)."""
    nargs = {"Ho": Ho, "Wo": Wo, "K": K, "C": 64}
    best, best_cost = None, None
    for c in prune_tma_configs(tma_configs(), nargs):
        kw = c.kwargs
        tiles = (N * triton.cdiv(Ho, kw["BLOCK_H"]) * triton.cdiv(Wo, kw["BLOCK_W"])
                 * triton.cdiv(K, kw["BLOCK_N"]))
        rows = kw["BLOCK_H"] * kw["BLOCK_W"]
        eff = 1.0 if rows >= 128 and kw["BLOCK_N"] >= 128 else 0.85
        cost = wave_cost(tiles, sm_count, 1) * rows * kw["BLOCK_N"] / eff
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


def _config_keys(config) -> set:
    if isinstance(config, triton.Config):
        return set(config.kwargs)
    if isinstance(config, Mapping):
        return set(config)
    raise TypeError(f"{_OP}: config must be a dict or a triton.Config, got {type(config).__name__}")


def _config_kwargs(config: Union[Mapping, "triton.Config"], keys=_CONFIG_KEYS) -> dict:
    if isinstance(config, triton.Config):
        kw = dict(config.kwargs)
        kw["num_warps"], kw["num_stages"] = config.num_warps, config.num_stages
    elif isinstance(config, Mapping):
        kw = dict(config)
    else:
        raise TypeError(f"{_OP}: config must be a dict or a triton.Config, got {type(config).__name__}")
    missing = [k for k in keys if k not in kw]
    extra = sorted(set(kw) - set(keys) - {"num_warps", "num_stages"})
    if missing or extra:
        raise ValueError(f"{_OP}: config needs {list(keys)} (+ optional num_warps, "
                         f"num_stages); missing {missing}, unknown {extra}")
    for k in keys:
        v = kw[k]
        low = 1 if k in ("BLOCK_H", "BLOCK_W") else 16
        if not isinstance(v, int) or v < low or v & (v - 1):
            raise ValueError(f"{_OP}: config[{k!r}] must be a power of two >= {low}, got {v!r}")
    if "BLOCK_H" in kw and kw["BLOCK_H"] * kw["BLOCK_W"] < 16:
        raise ValueError(f"{_OP}: config's BLOCK_H * BLOCK_W must be >= 16, got "
                         f"{kw['BLOCK_H']} * {kw['BLOCK_W']}")
    kw.setdefault("num_warps", 4)
    kw.setdefault("num_stages", 3)
    return kw


def _pair(v, name: str) -> tuple:
    try:
        a, b = v
    except (TypeError, ValueError):
        raise TypeError(f"{_OP}: {name} must be a sequence of 2 ints, got {v!r}") from None
    for i in (a, b):
        if isinstance(i, bool) or not isinstance(i, (int, torch.SymInt)):
            raise TypeError(f"{_OP}: {name} must be a sequence of 2 ints, got {v!r}")
    return a, b


def _check(x, weight, bias, residual, stride, padding):
    """Validates the arguments (the kernel's dtypes and device, then fused_conv2d's shared rules,
    _conv_args.py); returns (sh, sw), (ph, pw) and the output shape."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{_OP}: x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.device.type != "cuda" and not interpreting():
            raise ValueError(f"{_OP}: x is on {x.device}; the Triton kernel needs a CUDA tensor "
                             "(or TRITON_INTERPRET=1 for CPU tensors)")
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    out_shape = check_conv_args(_OP, x, weight, bias, residual, (sh, sw), (ph, pw))
    expected_residual(_OP, residual, x, out_shape)
    return (sh, sw), (ph, pw), out_shape


def _input_precision(dtype: torch.dtype) -> str:
    if interpreting():
        return "ieee"
    if dtype == torch.float32 and not conv_allows_tf32():
        return "ieee"
    return "tf32"  # Triton's default; for fp16/bf16 operands it has no effect


def splitk_epilogue_blocks(M: int, K: int, interpret: bool) -> tuple:
    """(BLOCK_M, BLOCK_N) of splitk_epilogue_kernel: 32x64 on the GPU (56 registers on sm_90,
    no spills), one large tile in the interpreter."""
    if interpret:
        return _pow2_clamp(M, 16, 128), _pow2_clamp(K, 16, 128)
    return 32, _pow2_clamp(K, 16, 64)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple:
    return torch.cuda.get_device_capability(device_index)


def split_k_for(M: int, K: int, C: int, kh: int, kw: int, sm_count: int) -> int:
    """How many slices to cut the reduction into (1: none): the count with the least
    wave_cost, for nominal 64x64 tiles and steps of 64 channels. Split when the output tiles
    leave SMs idle, e.g. a 14x14 or 7x7 layer at batch 1 (M = 196 or 49: 16 or 8 tiles on 132
    SMs); never more slices than those 64-channel steps, so that with balanced slices (the
    kernels' _k_slice) none is empty whatever BLOCK_C (<= 64) the configuration has."""
    tiles = triton.cdiv(M, 64) * triton.cdiv(K, 64)
    steps = kh * kw * triton.cdiv(C, 64)
    best, best_cost = 1, wave_cost(tiles, sm_count, steps)
    for split in range(2, min(MAX_SPLIT_K, steps) + 1):
        cost = wave_cost(tiles, sm_count, steps, split)
        if cost < best_cost:
            best, best_cost = split, cost
    return best


def _vec(values, unit_strides=()) -> int:
    """The largest of 8, 4, 2, 1 dividing every value (1 unless every unit_strides is 1)."""
    if any(int(v) != 1 for v in unit_strides):
        return 1
    for v in (8, 4, 2):
        if all(int(x) % v == 0 for x in values):
            return v
    return 1


def _tma_env_enabled() -> bool:
    return os.environ.get("DEEPARCH_TRITON_TMA", "1") != "0"


def _data_ptr(t: torch.Tensor) -> int:
    """t's address; 0 (aligned) for the storage-less tensors torch.compile traces the launcher
    with (fake / functional tensors: Inductor allocates aligned buffers and copies misaligned
    graph inputs, as TensorDescriptor assumes too)."""
    if type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
        return 0
    try:
        return t.data_ptr()
    except RuntimeError:
        return 0


def tma_refusal(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> Optional[str]:
    """Why conv_tma_kernel can't take these (packed channels_last) arguments, or None."""
    if tuple(stride) != (1, 1):
        return f"the TMA kernel takes stride 1 only, got {tuple(stride)}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the TMA kernel takes float16 or bfloat16, got {x.dtype}"
    C, K = x.shape[1], weight.shape[0]
    if C % 8 or K % 8:
        return f"the TMA kernel needs C and K multiples of 8 (16-byte rows), got C={C}, K={K}"
    for name, t in (("x", x), ("weight", weight)):
        if _data_ptr(t) % 16:
            return f"the TMA kernel needs 16-byte aligned data; {name}'s is not"
    if x.device.type == "cuda" and _capability(x.device.index or 0)[0] < 9:
        return "the TMA kernel needs sm_90 or newer (tensor memory accelerator)"
    return None


def _torch_allocator(size: int, alignment: int, stream: Optional[int]):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_triton_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from Triton's runtime allocator
    (128 bytes per descriptor and program). Set one on the caching allocator unless the user
    (or Inductor, which sets its own when it launches) already has."""
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_allocator)


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                 relu: bool, *, config: Optional[Union[Mapping, "triton.Config"]] = None,
                 split_k: Optional[int] = None, tma: Optional[bool] = None) -> torch.Tensor:
    """``relu?(conv2d(x, weight, stride, padding) + bias + residual)``, returned channels_last.

    x (N, C, H, W), weight (K, C, kh, kw), bias (K,) or None, residual (N, K, Ho, Wo) or None,
    all of one dtype (float32, float16, bfloat16) and device; stride (sh, sw), padding (ph, pw).
    Inputs in any memory format are made channels_last here (a no-op when they already are).
    ``tma``: None takes conv_tma_kernel where it applies (tma_refusal) on an sm_90+ GPU, unless
    DEEPARCH_TRITON_TMA=0 (and never under the interpreter); True requires it (ValueError with
    the reason otherwise, the interpreter included); False never takes it. ``config`` forces
    one configuration instead of autotuning, and with it the kernel: a dict with BLOCK_M,
    BLOCK_N, BLOCK_C (conv_kernel) or BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_C (conv_tma_kernel),
    optional num_warps, num_stages, or a triton.Config; under
    TRITON_INTERPRET=1 a single large-block configuration is used unless config is given.
    ``split_k`` forces the number of reduction slices (None: ``split_k_for`` on the GPU, 1 under
    the interpreter); with more than one, each slice writes an fp32 partial and a second kernel
    sums them and applies the epilogue.
    """
    (sh, sw), (ph, pw), out_shape = _check(x, weight, bias, residual, stride, padding)
    N, C, H, W = x.shape
    K, _, kh, kw = weight.shape
    Ho, Wo = out_shape[2], out_shape[3]
    if not (tma is None or isinstance(tma, bool)):
        raise TypeError(f"{_OP}: tma must be None, True or False, got {tma!r}")

    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    weight = weight.contiguous(memory_format=cl)
    if bias is not None:
        bias = bias.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=cl)
    y = torch.empty(out_shape, device=x.device, dtype=x.dtype, memory_format=cl)
    M = N * Ho * Wo
    if M == 0 or K == 0:
        return y

    # A config names its kernel by its keys (BLOCK_H: conv_tma_kernel); tma=None then follows it.
    config_tma = None if config is None else "BLOCK_H" in _config_keys(config)
    if tma is not None and config_tma is not None and tma != config_tma:
        raise ValueError(f"{_OP}: tma={tma} but config is for "
                         f"{'conv_tma_kernel' if config_tma else 'conv_kernel'}")
    why_not_tma = tma_refusal(x, weight, (sh, sw))
    required = tma is True or config_tma is True
    if required and why_not_tma is not None:
        raise ValueError(f"{_OP}: the TMA kernel was asked for but {why_not_tma}")
    use_tma = why_not_tma is None and (
        required or (tma is None and config is None and not interpreting() and _tma_env_enabled()))

    if split_k is None:
        split_k = 1 if interpreting() else split_k_for(M, K, C, kh, kw, _sm_count(x.device.index or 0))
    elif isinstance(split_k, bool) or not isinstance(split_k, int) or not 1 <= split_k <= 65535:
        raise ValueError(f"{_OP}: split_k must be an int in [1, 65535] (grid y), got {split_k!r}")
    b_arg = bias if bias is not None else y
    r_arg = residual if residual is not None else y
    r_strides = residual.stride() if residual is not None else y.stride()
    # fp32 partial sums of the split-K slices (a dummy pointer without split-K).
    ws = torch.empty((split_k, M, K) if split_k > 1 else (1,), device=x.device, dtype=torch.float32)
    rs, ys = r_strides, y.stride()  # (N, K, Ho, Wo) order, channels_last: K's stride is 1
    k_vec = _vec((K, rs[0], rs[2], rs[3], ys[0], ys[2], ys[3]), (rs[1], ys[1]))
    meta = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                RELU=bool(relu), INPUT_PRECISION=_input_precision(x.dtype),
                DOT_FP32=interpreting(), EXACT_BF16=exact_bf16(x.dtype), SPLIT_K=split_k,
                K_VEC=k_vec)
    autotune = os.environ.get("DEEPARCH_TRITON_AUTOTUNE", "1") != "0"

    if use_tma:
        args = (x, weight, b_arg, r_arg, y, ws, N, H, W, C, K, Ho, Wo, M, ph, pw,
                *r_strides, *y.stride())

        def grid(META):
            tiles = (N * triton.cdiv(Ho, META["BLOCK_H"]) * triton.cdiv(Wo, META["BLOCK_W"])
                     * triton.cdiv(K, META["BLOCK_N"]))
            return (tiles, split_k)

        if config is None and interpreting():
            config = tma_interpreter_config(Ho, Wo, K, C)
        elif config is None and not autotune:
            config = tma_heuristic_config(N, Ho, Wo, K, _sm_count(x.device.index or 0))
        if not interpreting():
            _ensure_triton_allocator()
        if config is None:
            wrap_triton(conv_tma_kernel_autotuned)[grid](*args, **meta)
        else:
            wrap_triton(conv_tma_kernel)[grid](*args, **meta, **_config_kwargs(config, _TMA_CONFIG_KEYS))
    else:
        xs, wts = x.stride(), weight.stride()
        c_vec = _vec((C, xs[0], xs[2], xs[3], wts[0], wts[2], wts[3]), (xs[1], wts[1]))
        args = (
            x, weight, b_arg, r_arg, y, ws,
            N, H, W, C, K, Ho, Wo, M, Ho * Wo,
            sh, sw, ph, pw,
            *xs, *wts, *r_strides, *y.stride(),
        )

        def grid(META):
            return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_N"]), split_k)

        if config is None and interpreting():
            config = interpreter_config(M, K, C)
        elif config is None and not autotune:
            config = heuristic_config(M, K, C, _sm_count(x.device.index or 0))
        if config is None:
            wrap_triton(conv_kernel_autotuned)[grid](*args, **meta, C_VEC=c_vec)
        else:
            wrap_triton(conv_kernel)[grid](*args, **meta, C_VEC=c_vec, **_config_kwargs(config))
    if split_k > 1:
        bm, bn = splitk_epilogue_blocks(M, K, interpreting())
        wrap_triton(splitk_epilogue_kernel)[(triton.cdiv(M, bm), triton.cdiv(K, bn))](
            ws, b_arg, r_arg, y, M, K, M * K, Ho * Wo, Wo, *r_strides, *y.stride(), split_k,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            RELU=bool(relu), EXACT_BF16=exact_bf16(x.dtype), K_VEC=k_vec, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=4)
    return y
