"""Backend choice: one rule, in one place, that can say why a backend is not used.

Backends (the same names for every op):

  ``cutlass``    our CUTLASS 3.x sm_90a kernels (TMA + WGMMA; CUDA tensors on Hopper; needs the
                 extension built with them)
  ``cuda``       our C++/CUDA kernels (CUDA tensors; needs the compiled extension with CUDA)
  ``triton``     our Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)
  ``cpu``        our C++ CPU kernels (CPU tensors; needs the compiled extension)
  ``aten``       ATen/cuDNN/oneDNN for the heavy part, followed by our fused epilogue kernel
  ``reference``  plain PyTorch ops, the semantics every backend is tested against

``backend="auto"`` takes, among the backends that can run the given inputs, the fastest: on a
CUDA device it times the candidates once per op, shape, dtype and layout (``aten``, stock
PyTorch, is always a candidate, so auto is never slower than PyTorch) and caches the winner; on
the CPU it takes the first of ``cpu``, ``aten`` (or the op's own measured order, set_auto_order). While torch.compile traces or a CUDA graph is
captured nothing is timed: a cached choice is used, else ``aten`` on CUDA. ``DEEPARCH_AUTOTUNE=0``
turns timing off (the first candidate of the order below is then taken).

An explicit name forces that backend, and raises ``BackendUnavailable`` listing why it can't run.
"""
from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _ext

BACKENDS: Tuple[str, ...] = ("cutlass", "cuda", "triton", "cpu", "aten", "reference")

# Candidates for "auto", in order of preference, per device type. The Triton interpreter is for
# tests and learning: it is never chosen automatically.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("cutlass", "cuda", "triton", "aten"),
    "cpu": ("cpu", "aten"),
}


# Per-op overrides of AUTO_ORDER, set by the op files from measurements (see set_auto_order).
_OP_ORDER: Dict[Tuple[str, str], Tuple[str, ...]] = {}


def set_auto_order(op: str, device_type: str, order: Sequence[str]) -> None:
    """Override the auto candidates' order for one op on one device type."""
    _OP_ORDER[(op, device_type)] = tuple(order)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these inputs; the message says why."""


class Availability(NamedTuple):
    available: bool
    reason: str  # empty when available


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_import_error: Optional[str] = None
try:  # noqa: SIM105 - keep the reason
    import triton  # noqa: F401
except Exception as e:  # pragma: no cover - triton ships with CUDA builds of torch
    _triton_import_error = f"triton is not importable ({e})"


def device_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` can't run on ``device`` (None when it can). Op-independent."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    dev = device.type
    if name in ("cuda", "cutlass"):
        if dev != "cuda":
            return f"the {name!r} backend runs CUDA tensors, got {dev} tensors"
        return _ext.cuda_reason() if name == "cuda" else _ext.cutlass_reason(device)
    if name == "cpu":
        if dev != "cpu":
            return f"the 'cpu' backend runs CPU tensors, got {dev} tensors"
        return _ext.cpu_reason()
    if name == "triton":
        if _triton_import_error:
            return _triton_import_error
        if dev == "cpu":
            return None if _interpret() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if dev == "cuda":
            return "TRITON_INTERPRET=1 is set: Triton runs on the CPU only" if _interpret() else None
        return f"Triton does not run {dev} tensors here"
    return None  # aten, reference: wherever PyTorch runs


def available_backends(device: "torch.device | str | None" = None) -> Dict[str, Availability]:
    """Each backend name -> (whether it can run here, why not). ``device`` defaults to the GPU
    when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        reason = device_reason(name, device)
        out[name] = Availability(reason is None, reason or "")
    return out


# op name -> {backend name -> implementation}; op name -> {backend -> input check}
_IMPLS: Dict[str, Dict[str, Callable]] = {}
_SUPPORTS: Dict[str, Dict[str, Callable[..., Optional[str]]]] = {}
_CHOICE: Dict[tuple, str] = {}


def register(op: str, backend: str, impl: Callable,
             supports: Optional[Callable[..., Optional[str]]] = None) -> None:
    """Register ``impl`` as op's implementation on ``backend``. ``supports(*args)`` returns why
    these inputs can't run there (dtype, shape...), or None."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = impl
    if supports is not None:
        _SUPPORTS.setdefault(op, {})[backend] = supports


def reasons(op: str, device: torch.device, *args) -> Dict[str, Optional[str]]:
    """For each backend: why it can't run op on these inputs, or None."""
    out = {}
    for name in BACKENDS:
        if name not in _IMPLS.get(op, {}):
            out[name] = f"{op} has no {name!r} implementation"
            continue
        why = device_reason(name, device)
        if why is None and name in _SUPPORTS.get(op, {}):
            why = _SUPPORTS[op][name](*args)
        out[name] = why
    return out


def _busy_tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _time_cuda(fn: Callable[[], object], reps: int = 5) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _autotune_enabled() -> bool:
    return os.environ.get("DEEPARCH_AUTOTUNE", "1") != "0"


def choose(op: str, backend: str, device: torch.device, key: tuple, args: Sequence) -> str:
    """The one rule: the backend that runs ``op`` on ``args`` (see the module docstring)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
        why = reasons(op, device, *args)[backend]
        if why is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} can't run these inputs: {why}")
        return backend
    full_key = (op, device, key)
    hit = _CHOICE.get(full_key)
    if hit is not None:
        return hit
    why = reasons(op, device, *args)
    order = _OP_ORDER.get((op, device.type)) or AUTO_ORDER.get(device.type, ("aten",))
    candidates = [b for b in order if why.get(b) is None]
    if not candidates:
        return "aten"
    if device.type != "cuda" or len(candidates) == 1 or not _autotune_enabled():
        choice = candidates[0]
    elif _busy_tracing():
        return "aten"  # nothing can be timed now; stock PyTorch is never slower than itself
    else:
        impls = _IMPLS[op]
        timed = {b: _time_cuda(lambda b=b: impls[b](*args)) for b in candidates}
        choice = min(timed, key=timed.get)
    _CHOICE[full_key] = choice
    return choice


def call(op: str, backend: str, device: torch.device, key: tuple, args: Sequence):
    """Run ``op`` on the backend the rule picks for ``args``."""
    name = choose(op, backend, device, key, args)
    return _IMPLS[op][name](*args)


# The hot path: (op, backend, every argument's device/dtype/shape/strides, flags) -> the
# implementation chosen for it. A hit means these exact inputs were validated and dispatched
# before, so a repeat call costs one tuple and one dict lookup on top of the kernel.
_FAST: Dict[tuple, Callable] = {}
_FAST_MAX = 8192


def tensor_sig(t: Optional[torch.Tensor]):
    return None if t is None else (t.device, t.dtype, t.shape, t.stride())


def fast_lookup(key: tuple) -> Optional[Callable]:
    if torch.compiler.is_compiling():
        return None  # traced code takes the full path (shapes may be symbolic)
    return _FAST.get(key)


def fast_store(key: tuple, op: str, name: str) -> Callable:
    impl = _IMPLS[op][name]
    fast_remember(key, impl)
    return impl


def fast_remember(key: tuple, value) -> None:
    """Remember any value (e.g. a backend name) for a fast-path key."""
    if not torch.compiler.is_compiling():
        if len(_FAST) >= _FAST_MAX:
            _FAST.clear()
        _FAST[key] = value


def cached_choices() -> Mapping[tuple, str]:
    """What ``auto`` has picked so far: (op, device, shape key) -> backend."""
    return dict(_CHOICE)


def clear_cache() -> None:
    _CHOICE.clear()
    _FAST.clear()
