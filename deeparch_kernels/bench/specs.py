"""One spec per op: what verification, timing, the report and the plots loop over. A new op is
one more ``OpSpec`` here: its title, the ops it covers, its case type (cases.py: shape, bytes,
FLOPs), the providers timed side by side (ours, and the baselines: eager PyTorch, torchvision's
in-place pattern, conv2d alone, torch.compile), the inputs of a timed case, and its verification
cases with their float64 references (odd shapes, both memory formats, NaN/+Inf/-Inf planted).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..timing import Rotation, synchronize
from .cases import AddCase, ConvCase


@dataclass
class Provider:
    name: str
    kind: str  # "ours" | "baseline"
    op: str
    fn: Callable
    backend: Optional[str] = None
    inplace: bool = False  # overwrites its first input
    compiled: bool = False  # torch.compile(fn) once per case
    eager_provider: Optional[str] = "eager"  # the row its "vs eager" speedup is taken against
    keeps: bool = False  # its first call on a weight does work it keeps (a prepacked weight)

    def timed(self, sets: List[tuple], device: torch.device) -> Tuple[Callable[[], object], Optional[float]]:
        """(the callable to time, torch.compile's seconds or None): its own copies of the inputs it
        overwrites, compiled once (dynamic=False, after a dynamo reset), called once on each set
        first when it ``keeps`` what a first call derives (not timed, as a compile), rotating
        among ``sets``."""
        if self.inplace:
            sets = [(s[0].clone(),) + tuple(s[1:]) for s in sets]
        fn, compile_s = self.fn, None
        if self.keeps:
            for s in sets:
                fn(*s)
        if self.compiled:
            torch._dynamo.reset()
            fn = torch.compile(self.fn, dynamic=False)
            t0 = time.perf_counter()
            fn(*sets[0])
            synchronize(device)
            compile_s = time.perf_counter() - t0
        rot = Rotation(sets)
        return (lambda: fn(*rot())), compile_s


# A verification case: (op, label, memory format, run). run() makes the inputs, calls the op and
# returns (output, float64 reference, expected output strides, extra NaN allowed); it raises
# AssertionError for a wrong result (a modified input, say), anything else for an error.
VerifyCase = Tuple[str, str, str, Callable[[], Tuple[torch.Tensor, torch.Tensor, tuple, bool]]]


@dataclass(frozen=True)
class OpSpec:
    name: str  # the family: the ops' rows are grouped, tabulated and plotted under it
    ops: Tuple[str, ...]
    title: str
    case_type: type
    rate: Tuple[str, str]  # the report's rate column and its row key: GB/s, or TFLOP/s of the matmul ceiling
    providers: Callable[..., List[Provider]]  # (case, backends, ops, compile_)
    inputs: Callable[..., List[tuple]]  # (case, device, n_sets): the timed input sets
    verify_cases: Callable[..., Iterator[VerifyCase]]  # (verifier, backend, dtype)


def _randn(shape, dtype, device, fmt="contiguous", scale=1.0, gen=None) -> torch.Tensor:
    """Random normal values (never zeros), 4-D ones in ``fmt``: drawn on the device for timing,
    from ``gen`` on the CPU in float32 (reproducible for a seed) for verification."""
    if gen is None:
        mf = torch.channels_last if fmt == "channels_last" and len(shape) == 4 else torch.contiguous_format
        return torch.empty(shape, dtype=dtype, device=device, memory_format=mf).normal_(0.0, scale)
    t = (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" and t.dim() == 4 else t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def poison_allocator(nbytes: int, device: torch.device) -> None:
    """Leave a NaN-filled block of ``nbytes`` in the CUDA caching allocator (0xFF bytes are NaN in
    fp32, fp16 and bf16), so the next allocation of that size starts out as NaN."""
    if device.type == "cuda" and nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0xFF)


# -- add+ReLU ----------------------------------------------------------------------------------
ADD_SHAPES = [(2, 3, 5, 7), (4, 64, 13, 13), (2, 256, 7, 7), (3, 1, 1, 1), (0, 4, 3, 3), (1_000_003,)]


def _eager_add(a, b):
    return torch.relu(a + b)


def _torchvision_add(a, b):
    a += b  # BasicBlock/Bottleneck: out += identity; out = self.relu(out)  (ReLU(inplace=True))
    return torch.relu_(a)


def add_providers(case: AddCase, backends: Sequence[str], ops: Sequence[str], compile_: bool) -> List[Provider]:
    import deeparch_kernels as dk

    provs = [Provider("eager", "baseline", "add_relu", _eager_add),
             Provider("torchvision", "baseline", "add_relu_", _torchvision_add, inplace=True)]
    provs += [Provider("compile", "baseline", "add_relu", _eager_add, compiled=True)] if compile_ else []
    for b in backends:
        provs += [Provider(b, "ours", "add_relu", lambda x, y, b=b: dk.add_relu(x, y, backend=b), backend=b),
                  Provider(f"{b}:inplace", "ours", "add_relu_",
                           lambda x, y, b=b: dk.add_relu_(x, y, backend=b), backend=b, inplace=True,
                           eager_provider="torchvision")]
    return [p for p in provs if p.op in ops or p.compiled]  # (compile: whichever of the two ops is timed)


def add_inputs(case: AddCase, device: torch.device, n_sets: int) -> List[tuple]:
    return [(_randn(case.shape, case.dtype, device, case.fmt), _randn(case.shape, case.dtype, device, case.fmt))
            for _ in range(n_sets)]


def _plant_add_specials(x: torch.Tensor, y: torch.Tensor) -> None:
    """NaN, +Inf, -Inf and Inf + -Inf at fixed positions (any layout), when there is room."""
    n = x.numel()
    if n < 8:
        return
    at = [tuple(int(i) for i in torch.unravel_index(torch.tensor(k), x.shape)) for k in (0, 1, 2, 3, 4, n - 1)]
    nan, inf = float("nan"), float("inf")
    x[at[0]] = nan  # NaN + y -> NaN
    x[at[1]] = inf  # +Inf -> +Inf
    y[at[2]] = -inf  # -Inf -> 0 after the ReLU
    x[at[3]], y[at[3]] = inf, -inf  # Inf + -Inf -> NaN
    y[at[4]] = nan  # NaN in the identity
    x[at[5]] = inf  # the last element


def add_verify_cases(v, backend: str, dt: torch.dtype) -> Iterator[VerifyCase]:
    import deeparch_kernels as dk

    shapes = ADD_SHAPES[:1] if v.interp(backend) else (ADD_SHAPES[:2] if v.quick else ADD_SHAPES)
    for shape in shapes:
        fmts = ["contiguous", "channels_last"] if len(shape) == 4 and shape[1] > 1 else ["contiguous"]
        for fmt, op in itertools.product(fmts, ("add_relu", "add_relu_")):
            if op not in v.ops:
                continue

            def run(shape=shape, fmt=fmt, op=op):
                x = _randn(shape, dt, v.device, fmt, gen=v.gen)
                y = _randn(shape, dt, v.device, fmt, gen=v.gen)
                _plant_add_specials(x, y)
                ref = torch.relu(x.double().cpu() + y.double().cpu())
                xb, yb, strides = _bits(x), _bits(y), x.stride()
                if op == "add_relu":
                    poison_allocator(x.numel() * x.element_size(), v.device)
                    out = dk.add_relu(x, y, backend=backend)
                    if not torch.equal(_bits(x), xb) or not torch.equal(_bits(y), yb):
                        raise AssertionError("an input was modified by the out-of-place op")
                else:
                    out = dk.add_relu_(x, y, backend=backend)
                    if out is not x:
                        raise AssertionError("add_relu_ must return x")
                    if not torch.equal(_bits(y), yb):
                        raise AssertionError("identity was modified")
                return out, ref, strides, False

            yield op, "x".join(map(str, shape)), fmt, run


# -- fused conv --------------------------------------------------------------------------------
# (N, C, H, W, K, k, stride, padding)
CONV_CONFIGS = [(2, 3, 17, 15, 16, 3, 1, 1), (2, 16, 13, 11, 24, 3, 2, 1), (1, 32, 9, 9, 32, 1, 1, 0),
                (2, 64, 14, 14, 64, 3, 1, 1)]
INTERPRET_CONV = [(1, 3, 7, 9, 8, 3, 1, 1), (1, 5, 9, 7, 7, 3, 2, 1)]  # Triton interpreter: tiny
# (bias, residual, relu)
EPILOGUES = [(True, False, True), (False, False, True), (True, True, True), (False, True, True),
             (True, True, False), (False, False, False)]
QUICK_EPILOGUES = [(True, False, True), (True, True, True), (False, False, False)]


def conv_providers(case: ConvCase, backends: Sequence[str], ops: Sequence[str],
                   compile_: bool) -> List[Provider]:
    import deeparch_kernels as dk

    s, p = case.stride, case.pad
    if case.form == "residual":
        def eager(x, w, b, r):
            return F.conv2d(x, w, b, s, p).add_(r).relu_()

        def compilable(x, w, b, r):
            return torch.relu(F.conv2d(x, w, b, s, p) + r)
    else:
        def eager(x, w, b, r=None):
            return torch.relu(F.conv2d(x, w, b, s, p))

        compilable = eager

    def conv_only(x, w, b, r=None):
        return F.conv2d(x, w, b, s, p)

    def ours(x, w, b, r=None, *, backend):
        return dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, backend=backend)

    provs = [Provider("eager", "baseline", "fused_conv2d", eager),
             Provider("conv-only", "baseline", "fused_conv2d", conv_only)]
    if compile_:
        provs.append(Provider("compile", "baseline", "fused_conv2d", compilable, compiled=True))
    for b in backends:
        provs.append(Provider(b, "ours", "fused_conv2d", lambda *a, b=b: ours(*a, backend=b), backend=b))
    if "cpu" in backends and case.dtype == torch.float32 and case.memory_format == "channels_last":
        # What the fused modules run in inference: weights registered with prepack (as their
        # folded ones are), so that oneDNN's prepacked copy, Winograd's transform and the GEMM's
        # packed weight are kept.
        from ..ops import conv as conv_op

        def kept(x, w, b, r=None, *, backend):
            conv_op.prepack(w)
            return ours(x, w, b, r, backend=backend)

        provs.append(Provider("cpu:prepacked", "ours", "fused_conv2d",
                              lambda *a: kept(*a, backend="cpu"), backend="cpu", keeps=True))
        probe = (torch.empty(0), torch.empty(case.K, case.C, case.k, case.k), None, None, [s, s], [p, p], True)
        for name, supports in (("winograd", conv_op._winograd_supports), ("gemm", conv_op._gemm_supports)):
            if supports(*probe) is None:
                provs.append(Provider(name, "ours", "fused_conv2d",
                                      lambda *a, name=name: kept(*a, backend=name), backend=name,
                                      keeps=True))
    return provs


def conv_inputs(case: ConvCase, device: torch.device, n_sets: int) -> List[tuple]:
    fmt = case.memory_format
    return [(_randn(case.shape, case.dtype, device, fmt),
             _randn((case.K, case.C, case.k, case.k), case.dtype, device, fmt, scale=(case.C * case.k ** 2) ** -0.5),
             _randn((case.K,), case.dtype, device),
             _randn(case.out_shape, case.dtype, device, fmt) if case.form == "residual" else None)
            for _ in range(n_sets)]


def conv_verify_cases(v, backend: str, dt: torch.dtype) -> Iterator[VerifyCase]:
    import deeparch_kernels as dk
    from deeparch_kernels.ops.conv import output_memory_format

    if v.interp(backend):
        configs, epilogues = INTERPRET_CONV, QUICK_EPILOGUES[1:]
    elif v.quick or v.device.type == "cuda":
        # Lean on a GPU: every new (shape, epilogue, dtype) makes an autotuned Triton kernel
        # compile all of its configurations; the GPU tests cover the rest.
        configs, epilogues = CONV_CONFIGS[:2], QUICK_EPILOGUES
    else:
        configs, epilogues = CONV_CONFIGS, EPILOGUES
    allow_spread = backend in ("aten", "reference")  # stock convolutions may smear a NaN over a tile
    cases = [(cfg, epi, fmt, False) for cfg, epi, fmt in
             itertools.product(configs, epilogues, ("contiguous", "channels_last"))]
    # NaN/Inf: one config, both layouts, with ReLU (and without, on the CPU)
    nan_cfg = configs[-1] if v.interp(backend) else configs[1]
    relus = (True,) if v.device.type == "cuda" or v.interp(backend) else (True, False)
    cases += [(nan_cfg, (True, True, relu), fmt, True) for relu in relus for fmt in ("contiguous", "channels_last")]
    for (N, C, H, W, K, k, s, p), (bias, residual, relu), fmt, specials in cases:
        label = (f"{N}x{C}x{H}x{W}->{K} k{k} s{s} p{p}" + (" +bias" if bias else "")
                 + (" +residual" if residual else "") + (" relu" if relu else "") + (" nan/inf" if specials else ""))

        def run(N=N, C=C, H=H, W=W, K=K, k=k, s=s, p=p, bias=bias, residual=residual, relu=relu, fmt=fmt,
                specials=specials):
            x = _randn((N, C, H, W), dt, v.device, fmt, gen=v.gen)
            w = _randn((K, C, k, k), dt, v.device, fmt, scale=(C * k * k) ** -0.5, gen=v.gen)
            b = _randn((K,), dt, v.device, gen=v.gen) if bias else None
            Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
            r = _randn((N, K, Ho, Wo), dt, v.device, fmt, gen=v.gen) if residual else None
            if specials:
                x[0, 0, min(3, H - 1), min(3, W - 1)] = float("nan")
                r[0, 1 % K, min(2, Ho - 1), min(2, Wo - 1)] = float("inf")
                r[N - 1, 2 % K, Ho - 1, 0] = float("-inf")
            # torch's conv2d rule for the output layout: channels_last if x or weight is
            like = torch.empty((N, K, Ho, Wo), dtype=dt).contiguous(memory_format=output_memory_format(x, w))
            ref = F.conv2d(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu(), s, p)
            ref = ref if r is None else ref + r.double().cpu()
            ref = torch.relu(ref) if relu else ref
            poison_allocator(like.numel() * like.element_size(), v.device)
            out = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend=backend)
            return out, ref, like.stride(), allow_spread

        yield "fused_conv2d", label, fmt, run


SPECS: Dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("add_relu", ("add_relu", "add_relu_"), "residual add + ReLU", AddCase, ("GB/s", "gbps"),
           add_providers, add_inputs, add_verify_cases),
    OpSpec("fused_conv2d", ("fused_conv2d",), "conv3x3 + bias (+ residual) + ReLU", ConvCase, ("TFLOP/s", "tflops"),
           conv_providers, conv_inputs, conv_verify_cases),
)}
OPS: Tuple[str, ...] = tuple(op for s in SPECS.values() for op in s.ops)


FAMILY: Dict[str, OpSpec] = {op: s for s in SPECS.values() for op in s.ops}  # op -> its spec
