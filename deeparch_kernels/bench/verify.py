"""Verification: every selected backend of every op against a float64 reference, on fresh random
data, before anything is timed.

  add_relu, add_relu_   odd 4-D shapes, a 1-D odd length, both memory formats; NaN, +Inf, -Inf
                        and Inf + -Inf planted in every case; inputs must come back unchanged
                        (out of place) or x must be the result (in place)
  fused_conv2d          C=3, odd sizes, strides 1 and 2, 1x1 and 3x3, with/without bias, residual
                        and ReLU, both memory formats; a NaN/Inf case per layout
  models                VGG16 / ResNet-18 / ResNet-50 built by deeparch_kernels.models from
                        torchvision's weights vs torchvision, through deeparch_kernels.verify
                        (eval logits, train logits and gradients; its tolerances)

Outputs of out-of-place ops are poisoned: on CUDA the caching allocator is handed a block of the
output's size filled with NaN bytes just before the call, so the op's output lands on NaN and any
element it forgets to write shows up (on the CPU the error check on relu=False cases does that job).

Error: max |out - ref| / max |ref| over the elements where the reference is finite (stricter
than the norm-wise error for a single wrong element). Tolerances: fp32 1e-5 (5e-3 for fp32
convolutions on CUDA while torch.backends.cudnn.allow_tf32 is on: TF32, as torch's own), fp16
and bf16 1e-2. Non-finite values must sit exactly where the reference has them (stock
ATen/cuDNN convolutions may smear a NaN over a Winograd/FFT tile: for the "aten" and
"reference" backends extra non-finite outputs are noted, not failed).

Statuses: pass, fail (wrong numbers), error (raised), skip (BackendUnavailable: the backend
refuses these inputs, with the reason), missing (the implementation is not there yet: no kernel
registered for the device, or its module is not written).
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._precision import conv_allows_tf32
from .cases import dtype_name

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOL = 5e-3

# add_relu shapes; the quick set is the first two.
ADD_SHAPES = [(2, 3, 5, 7), (4, 64, 13, 13), (2, 256, 7, 7), (3, 1, 1, 1), (0, 4, 3, 3), (1_000_003,)]
# (N, C, H, W, K, k, stride, padding)
CONV_CONFIGS = [(2, 3, 17, 15, 16, 3, 1, 1), (2, 16, 13, 11, 24, 3, 2, 1), (1, 32, 9, 9, 32, 1, 1, 0),
                (2, 64, 14, 14, 64, 3, 1, 1)]
INTERPRET_CONV = [(1, 3, 7, 9, 8, 3, 1, 1), (1, 5, 9, 7, 7, 3, 2, 1)]  # Triton interpreter: tiny
# (bias, residual, relu)
EPILOGUES = [(True, False, True), (False, False, True), (True, True, True), (False, True, True),
             (True, True, False), (False, False, False)]
QUICK_EPILOGUES = [(True, False, True), (True, True, True), (False, False, False)]


@dataclass
class Check:
    op: str
    backend: str
    dtype: str
    case: str
    memory_format: str
    status: str  # pass | fail | error | skip | missing
    rel_err: Optional[float] = None
    tol: Optional[float] = None
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| over the elements where ref is finite (0 when none are)."""
    ref = ref.detach().double().cpu()
    out = out.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    diff = (out - ref)[finite].abs().max().item()
    if diff != diff:  # NaN in out where ref is finite
        return float("inf")
    return diff / max(ref[finite].abs().max().item(), 1e-30)


def nonfinite_mismatch(out: torch.Tensor, ref: torch.Tensor, allow_spread: bool = False) -> Optional[str]:
    """Why out's NaN/+Inf/-Inf positions differ from ref's, or None."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        o, r = f(out), f(ref)
        if name != "NaN" or not allow_spread:
            if not torch.equal(o, r):
                lost, extra = int((r & ~o).sum()), int((o & ~r).sum())
                return f"{name} positions differ from the reference ({lost} missing, {extra} extra)"
    if allow_spread:
        lost = int((~torch.isfinite(ref) & torch.isfinite(out)).sum())
        if lost:
            return f"{lost} non-finite reference values came out finite"
    return None


def same_layout(shape, strides, expected) -> bool:
    """Strides equal where they mean something: dims of size > 1 of a non-empty tensor."""
    if any(d == 0 for d in shape):
        return True
    return all(a == b for d, a, b in zip(shape, strides, expected) if d > 1)


def tolerance(op: str, dtype: torch.dtype, device: torch.device) -> float:
    if (op == "fused_conv2d" and dtype == torch.float32 and device.type == "cuda"
            and conv_allows_tf32()):
        return TF32_TOL
    return TOL[dtype]


def poison_allocator(nbytes: int, device: torch.device) -> None:
    """Leave a NaN-filled block of ``nbytes`` in the CUDA caching allocator (0xFF bytes are NaN in
    fp32, fp16 and bf16), so the next allocation of that size starts out as NaN."""
    if device.type == "cuda" and nbytes > 0:
        t = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0xFF)
        del t


def classify(e: BaseException) -> Tuple[str, str]:
    """(status, message) for an exception a backend raised."""
    from ..backends import BackendUnavailable

    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if isinstance(e, BackendUnavailable):
        return "skip", str(e)
    if isinstance(e, ImportError):
        return "missing", msg
    if isinstance(e, NotImplementedError):
        return "missing", msg
    if isinstance(e, RuntimeError) and ("Could not run" in str(e) or "no kernel" in str(e).lower()):
        return "missing", msg
    return "error", msg


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def _randn(shape, dtype, device, gen, fmt="contiguous", scale=1.0) -> torch.Tensor:
    t = (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)
    if fmt == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _unravel(k: int, shape) -> tuple:
    idx = []
    for d in reversed(shape):
        idx.append(k % d)
        k //= d
    return tuple(reversed(idx))


def _plant_add_specials(x: torch.Tensor, y: torch.Tensor) -> None:
    """NaN, +Inf, -Inf and Inf + -Inf at fixed positions (any layout), when there is room."""
    n = x.numel()
    if n < 8:
        return
    at = [_unravel(k, x.shape) for k in (0, 1, 2, 3, 4, n - 1)]
    nan, inf = float("nan"), float("inf")
    x[at[0]] = nan  # NaN + y -> NaN
    x[at[1]] = inf  # +Inf -> +Inf
    y[at[2]] = -inf  # -Inf -> 0 after the ReLU
    x[at[3]], y[at[3]] = inf, -inf  # Inf + -Inf -> NaN
    y[at[4]] = nan  # NaN in the identity
    x[at[5]] = inf  # the last element


class Verifier:
    def __init__(self, device: torch.device, backends: Sequence[str], dtypes: Sequence[torch.dtype],
                 ops: Sequence[str], *, seed: int, quick: bool = False,
                 progress: Optional[Callable[[str], None]] = None):
        self.device = device
        self.backends = list(backends)
        self.dtypes = list(dtypes)
        self.ops = list(ops)
        self.gen = torch.Generator().manual_seed(seed)
        self.quick = quick
        self.progress = progress or (lambda s: None)
        self.results: List[Check] = []

    # -- helpers -------------------------------------------------------------------------------
    def _interp(self, backend: str) -> bool:
        return backend == "triton" and self.device.type == "cpu"

    def _record(self, check: Check) -> None:
        self.results.append(check)

    def run(self) -> List[Check]:
        with warnings.catch_warnings():
            # NaN/Inf inputs make numpy (the Triton interpreter) warn about invalid values
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._run()

    def _run(self) -> List[Check]:
        for backend in self.backends:
            for dt in self.dtypes:
                n0 = len(self.results)
                if "add_relu" in self.ops or "add_relu_" in self.ops:
                    self._verify_add(backend, dt)
                if "fused_conv2d" in self.ops:
                    self._verify_conv(backend, dt)
                new = self.results[n0:]
                counts = {s: sum(c.status == s for c in new) for s in ("pass", "fail", "error", "skip", "missing")}
                worst = max((c.rel_err for c in new if c.rel_err is not None and c.rel_err != float("inf")),
                            default=None)
                summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                self.progress(f"verify {backend:9s} {dtype_name(dt)}: {summary or 'nothing to check'}"
                              + (f" (max rel err {worst:.1e})" if worst is not None else ""))
        return self.results

    # -- add_relu --------------------------------------------------------------------------------
    def _verify_add(self, backend: str, dt: torch.dtype) -> None:
        import deeparch_kernels as dk

        shapes = ADD_SHAPES[:1] if self._interp(backend) else (ADD_SHAPES[:2] if self.quick else ADD_SHAPES)
        tol = tolerance("add_relu", dt, self.device)
        for shape in shapes:
            fmts = ["contiguous", "channels_last"] if len(shape) == 4 and shape[1] > 1 else ["contiguous"]
            for fmt in fmts:
                for op in ("add_relu", "add_relu_"):
                    if op not in self.ops:
                        continue
                    case = "x".join(map(str, shape))
                    chk = Check(op, backend, dtype_name(dt), case, fmt, "pass", tol=tol)
                    try:
                        x = _randn(shape, dt, self.device, self.gen, fmt)
                        y = _randn(shape, dt, self.device, self.gen, fmt)
                        _plant_add_specials(x, y)
                        ref = torch.relu(x.double().cpu() + y.double().cpu())
                        xb, yb = _bits(x), _bits(y)
                        if op == "add_relu":
                            poison_allocator(x.numel() * x.element_size(), self.device)
                            out = dk.add_relu(x, y, backend=backend)
                            if not torch.equal(_bits(x), xb) or not torch.equal(_bits(y), yb):
                                raise AssertionError("an input was modified by the out-of-place op")
                        else:
                            out = dk.add_relu_(x, y, backend=backend)
                            if out is not x:
                                raise AssertionError("add_relu_ must return x")
                            if not torch.equal(_bits(y), yb):
                                raise AssertionError("identity was modified")
                        if out.dtype != dt:
                            raise AssertionError(f"dtype {out.dtype}, expected {dt}")
                        self._check_out(chk, out, ref, x.stride(), allow_spread=False)
                    except AssertionError as e:
                        chk.status, chk.message = "fail", str(e)
                    except Exception as e:  # noqa: BLE001 - every failure is a result
                        chk.status, chk.message = classify(e)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self._record(chk)

    def _check_out(self, chk: Check, out: torch.Tensor, ref: torch.Tensor,
                   strides: Optional[tuple], allow_spread: bool) -> None:
        """Shape, layout, non-finite positions, then the relative error; AssertionError on a miss."""
        if tuple(out.shape) != tuple(ref.shape):
            raise AssertionError(f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        if strides is not None and not same_layout(out.shape, out.stride(), strides):
            raise AssertionError(f"output strides {out.stride()}, expected {tuple(strides)} (memory format)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        why = nonfinite_mismatch(out, ref, allow_spread)
        if why is not None:
            raise AssertionError(why)
        chk.rel_err = rel_err(out, ref)
        spread = int((~torch.isfinite(out.cpu()) & torch.isfinite(ref)).sum()) if allow_spread else 0
        if spread:
            chk.message = f"{spread} extra non-finite outputs (the stock conv algorithm spreads NaN/Inf)"
        if not chk.rel_err <= chk.tol:
            raise AssertionError(f"relative error {chk.rel_err:.3g} > tolerance {chk.tol:g}")

    # -- fused_conv2d ----------------------------------------------------------------------------
    def _verify_conv(self, backend: str, dt: torch.dtype) -> None:
        import deeparch_kernels as dk
        from deeparch_kernels.ops.conv import output_memory_format

        if self._interp(backend):
            configs, epilogues = INTERPRET_CONV, QUICK_EPILOGUES[1:]
        elif self.quick:
            configs, epilogues = CONV_CONFIGS[:2], QUICK_EPILOGUES
        elif self.device.type == "cuda":
            # Lean on a GPU: every new (shape, epilogue, dtype) makes an autotuned Triton kernel
            # compile all of its configurations; the GPU tests cover the rest.
            configs, epilogues = CONV_CONFIGS[:2], QUICK_EPILOGUES
        else:
            configs, epilogues = CONV_CONFIGS, EPILOGUES
        tol = tolerance("fused_conv2d", dt, self.device)
        allow_spread = backend in ("aten", "reference")
        cases = [(cfg, epi, fmt, False) for cfg, epi, fmt in
                 itertools.product(configs, epilogues, ("contiguous", "channels_last"))]
        # NaN/Inf: one config, both layouts, with ReLU (and without, on the CPU)
        nan_cfg = configs[-1] if self._interp(backend) else configs[1]
        relus = (True,) if self.device.type == "cuda" or self._interp(backend) else (True, False)
        cases += [(nan_cfg, (True, True, relu), fmt, True)
                  for relu in relus for fmt in ("contiguous", "channels_last")]
        for (N, C, H, W, K, k, s, p), (bias, residual, relu), fmt, specials in cases:
            label = (f"{N}x{C}x{H}x{W}->{K} k{k} s{s} p{p}" + (" +bias" if bias else "")
                     + (" +residual" if residual else "") + (" relu" if relu else "")
                     + (" nan/inf" if specials else ""))
            chk = Check("fused_conv2d", backend, dtype_name(dt), label, fmt, "pass", tol=tol)
            try:
                x = _randn((N, C, H, W), dt, self.device, self.gen, fmt)
                w = _randn((K, C, k, k), dt, self.device, self.gen, fmt, scale=(C * k * k) ** -0.5)
                b = _randn((K,), dt, self.device, self.gen) if bias else None
                Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
                r = _randn((N, K, Ho, Wo), dt, self.device, self.gen, fmt) if residual else None
                if specials:
                    x[0, 0, min(3, H - 1), min(3, W - 1)] = float("nan")
                    r[0, 1 % K, min(2, Ho - 1), min(2, Wo - 1)] = float("inf")
                    r[N - 1, 2 % K, Ho - 1, 0] = float("-inf")
                # torch's conv2d rule for the output layout: channels_last if x or weight is
                like = torch.empty((N, K, Ho, Wo), dtype=dt).contiguous(
                    memory_format=output_memory_format(x, w))
                ref = F.conv2d(x.double().cpu(), w.double().cpu(),
                               None if b is None else b.double().cpu(), s, p)
                if r is not None:
                    ref = ref + r.double().cpu()
                if relu:
                    ref = torch.relu(ref)
                poison_allocator(like.numel() * like.element_size(), self.device)
                out = dk.fused_conv2d(x, w, b, stride=s, padding=p, residual=r, relu=relu, backend=backend)
                if out.dtype != dt:
                    raise AssertionError(f"dtype {out.dtype}, expected {dt}")
                self._check_out(chk, out, ref, like.stride(), allow_spread)
            except AssertionError as e:
                chk.status, chk.message = "fail", str(e)
            except Exception as e:  # noqa: BLE001
                chk.status, chk.message = classify(e)
            self._record(chk)


def verify_models(device: torch.device, names: Sequence[str], backends: Sequence[str],
                  dtypes: Sequence[torch.dtype], *, seed: int, image_size: int = 64, batch: int = 2,
                  progress: Optional[Callable[[str], None]] = None) -> List[Check]:
    """Whole models, ours vs torchvision with the same weights, through deeparch_kernels.verify
    (eval logits; train logits and every parameter's gradient after one backward pass; its
    tolerances: 1e-4 fp32, 1e-2 or twice torchvision's own error for fp16/bf16), channels_last."""
    log = progress or (lambda s: None)
    try:
        from ..verify import verify_model
    except Exception as e:  # noqa: BLE001 - not written yet: say so, run the rest
        return [Check("model", b, dtype_name(dt), n, "channels_last", "missing",
                      message=f"deeparch_kernels.verify is not available yet ({type(e).__name__}: {e})")
                for n in names for b in backends for dt in dtypes]
    out: List[Check] = []
    for name in names:
        for b in backends:
            for dt in dtypes:
                r = verify_model(name, device=device, dtype=dt, batch=batch, backend=b,
                                 image_size=image_size, channels_last=True, seed=seed)
                case = f"{name} batch {batch} {image_size}x{image_size} " + "+".join(r.modes or ["eval", "train"])
                chk = Check("model", b, dtype_name(dt), case, "channels_last", "pass",
                            tol=max((m.tol for m in r.modes.values()), default=None))
                if r.error:
                    chk.status, chk.message = classify_message(r.error)
                else:
                    err = r.max_rel_err
                    chk.rel_err = None if err != err else err
                    if not r.passed:
                        chk.status, chk.message = "fail", str(r)
                out.append(chk)
                log(f"verify model {name} [{b}, {dtype_name(dt)}]: {chk.status}"
                    + (f" (max rel err {chk.rel_err:.1e})" if chk.rel_err is not None else "")
                    + (f" {chk.message}" if chk.status != "pass" else ""))
    return out


def classify_message(msg: str) -> Tuple[str, str]:
    """(status, message) for an exception already turned into 'Type: text'."""
    head = msg.split(":", 1)[0]
    if head == "BackendUnavailable":
        return "skip", msg
    if head in ("ImportError", "ModuleNotFoundError", "NotImplementedError") or "Could not run" in msg:
        return "missing", msg
    return "error", msg


def summarize(results: Sequence[Check]) -> dict:
    out = {s: 0 for s in ("pass", "fail", "error", "skip", "missing")}
    for c in results:
        out[c.status] = out.get(c.status, 0) + 1
    return out
