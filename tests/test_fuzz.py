"""Random cases against a float64 reference, on every CPU backend: odd shapes, strides and
paddings, views, channels_last, special values (NaN, +/-Inf), every epilogue, each dtype.

A case passes when NaN and +/-Inf come out exactly where torch puts them in that dtype (or
where the float64 reference does: torch's oneDNN bfloat16 path turns some +/-Inf into NaN), and
the relative error (max |out - ref| / max |ref| over finite values) is within the dtype's bound
or at most twice stock PyTorch's own error in that dtype (flash-attention's rule: a low
precision is judged against what torch achieves in it). Where torch itself is wrong in that
dtype (its error over 10x the bound: oneDNN's bfloat16 convolutions with one output column and
a column stride > 1), our backends are held to the bound alone, and the ``reference`` backend
-- which is torch -- is not judged. Every failing case is named.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import deeparch_kernels as dk

from helpers import TOL, backends_for, rel_err

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASES = int(os.environ.get("DEEPARCH_FUZZ_CASES", "500"))
INTERPRETER_CASES = 12  # Triton's interpreter is slow: a handful per dtype


def _plant_specials(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is None or t.numel() < 4:
        return t
    for v in (float("nan"), float("inf"), float("-inf")):
        if torch.rand((), generator=g) < 0.5:
            flat[int(torch.randint(t.numel(), (), generator=g))] = v
    return t


def _as_view(t: torch.Tensor, kind: int) -> torch.Tensor:
    """The same values as t, laid out as kind says: 0 contiguous, 1 channels_last, 2 a strided
    slice of a larger tensor, 3 a permuted (transposed) copy."""
    if kind == 1 and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == 2:
        big = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == 3 and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _conv_case(g: torch.Generator, dtype: torch.dtype):
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    N, C, K = r(1, 3), r(1, 17), r(1, 17)
    kh, kw = (r(1, 3) * 2 - 1, r(1, 3) * 2 - 1) if r(0, 3) else (r(1, 4), r(1, 4))
    sh, sw, ph, pw = r(1, 3), r(1, 3), r(0, 3), r(0, 3)
    H, W = r(max(1, kh - 2 * ph), 13), r(max(1, kw - 2 * pw), 13)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C, kh, kw, generator=g) / (C * kh * kw) ** 0.5
    b = torch.randn(K, generator=g) if r(0, 1) else None
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    res = torch.randn(N, K, Ho, Wo, generator=g) if r(0, 1) else None
    if r(0, 4) == 0:
        _plant_specials(x, g)
    if res is not None and r(0, 4) == 0:
        _plant_specials(res, g)
    relu = bool(r(0, 3))
    layout = r(0, 3)
    x, w = _as_view(x.to(dtype), layout), _as_view(w.to(dtype), layout if layout < 2 else 0)
    b = None if b is None else b.to(dtype)
    res = None if res is None else _as_view(res.to(dtype), layout)
    desc = (f"x{tuple(x.shape)} stride{x.stride()} w{tuple(w.shape)} s=({sh},{sw}) p=({ph},{pw}) "
            f"bias={b is not None} residual={res is not None} relu={relu} {dtype}")
    return (x, w, b, res, (sh, sw), (ph, pw), relu), desc


def _conv_ref(x, w, b, res, stride, padding, relu, dtype):
    y = F.conv2d(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), stride, padding)
    if res is not None:
        y = y + res.to(dtype)
    return torch.relu(y) if relu else y


def _nonfinite(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(_nonfinite(a), _nonfinite(b)))


def _finite_err(out, ref64):
    """rel_err over the elements finite in both: where ``out`` is not finite, _same has already
    held it to torch's or the float64 reference's NaN/Inf (a value beyond the dtype's range
    overflows to Inf in both, while float64 keeps it finite)."""
    both = out.isfinite() & ref64.isfinite()
    return rel_err(out.double().where(both, 0.0), ref64.where(both, 0.0))


def _judge(out, ref64, torch_out, dtype, backend):
    """Why ``out`` fails (None when it passes), or "torch-wrong" for the reference backend
    where torch itself is wrong."""
    if out.shape != ref64.shape or out.dtype != dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype}"
    torch_err = _finite_err(torch_out, ref64)
    torch_wrong = torch_err > 10 * TOL[dtype]
    if backend == "reference" and torch_wrong:
        return "torch-wrong"
    if not (_same(out, torch_out) or _same(out, ref64.to(dtype))):
        return "NaN/Inf positions differ from torch's and from the float64 reference's"
    err = _finite_err(out, ref64)
    bound = TOL[dtype] if torch_wrong else max(TOL[dtype], 2 * torch_err)
    if err > bound:
        return f"rel. error {err:.3g} > {bound:.3g} (tol {TOL[dtype]}, torch's error {torch_err:.3g})"
    return None


def _run(backend, dtype, n, make, call, ref):
    g = torch.Generator().manual_seed(20261201 + DTYPES.index(dtype))
    failures, torch_wrong = [], 0
    for i in range(n):
        args, desc = make(g, dtype)
        try:
            out = call(backend, args)
        except dk.BackendUnavailable:
            continue
        except Exception as e:  # noqa: BLE001 - a crash is a failure, with its case
            failures.append(f"case {i}: {desc}: raised {type(e).__name__}: {e}")
            continue
        why = _judge(out, ref(*args, torch.float64), ref(*args, dtype), dtype, backend)
        if why == "torch-wrong":
            torch_wrong += 1
        elif why:
            failures.append(f"case {i}: {desc}: {why}")
    assert not failures, f"{len(failures)} of {n} cases failed:\n" + "\n".join(failures[:20])
    assert torch_wrong <= n // 10, f"torch itself was wrong in {torch_wrong} of {n} cases"


def _n(backend):
    return INTERPRETER_CASES if backend == "triton" else CASES


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in ("cpu", "aten", "reference", "triton")
                                     if b in backends_for("cpu")] + ["auto"])
def test_fuzz_fused_conv2d(backend, dtype):
    _run(backend, dtype, _n(backend), _conv_case,
         lambda be, a: dk.fused_conv2d(a[0], a[1], a[2], residual=a[3], stride=a[4], padding=a[5],
                                       relu=a[6], backend=be),
         _conv_ref)


def _add_case(g: torch.Generator, dtype: torch.dtype):
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    shape = tuple(r(1, 9) for _ in range(r(1, 4)))
    x, y = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    if r(0, 3) == 0:
        _plant_specials(x, g)
        _plant_specials(y, g)
    x, y = _as_view(x.to(dtype), r(0, 3)), _as_view(y.to(dtype), r(0, 3))
    inplace = bool(r(0, 1))
    return (x, y, inplace), f"x{tuple(x.shape)} stride{x.stride()} y stride{y.stride()} inplace={inplace} {dtype}"


def _add_ref(x, y, inplace, dtype):
    return torch.relu(x.to(dtype) + y.to(dtype))


def _add_call(backend, a):
    x, y, inplace = a
    if not inplace:
        return dk.add_relu(x, y, backend=backend)
    x2 = x.clone() if x.is_contiguous() else x.transpose(-1, -2).clone().transpose(-1, -2) if x.dim() > 1 else x.clone()
    return dk.add_relu_(x2, y, backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in ("cpu", "aten", "reference", "triton")
                                     if b in backends_for("cpu")] + ["auto"])
def test_fuzz_add_relu(backend, dtype):
    _run(backend, dtype, 4 * _n(backend), _add_case, _add_call, _add_ref)
