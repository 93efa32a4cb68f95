"""Backend choice: one rule, in one place, that can say why a backend is not used.

Backends (the same names for every op):

  ``cutlass``    our CUTLASS 3.x sm_90a kernels (TMA + WGMMA; CUDA tensors on Hopper; needs the
                 extension built with them)
  ``cuda``       our C++/CUDA kernels (CUDA tensors; needs the compiled extension with CUDA)
  ``triton``     our Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)
  ``cpu``        our C++ CPU kernels (CPU tensors; needs the compiled extension)
  ``aten``       stock PyTorch (ATen/cuDNN/oneDNN), written for speed (in-place epilogues)
  ``reference``  stock PyTorch, written as the definition: the semantics every backend is tested
                 against

Registered by an op for itself (``register``, like a plug-in, but placed in the op's order):
``winograd`` (fused_conv2d on the CPU: Winograd F(4x4, 3x3) and F(2x2, 3x3) for fp32 3x3 layers,
ops/conv_winograd.py and csrc/cpu/winograd.cpp) and ``gemm`` (fused_conv2d on the CPU: fp32 1x1
stride-1 layers as one GEMM, the epilogue before its store; ops/conv_gemm.py and
csrc/cpu/gemm_conv.cpp).

An explicit name forces that backend, and raises ``BackendUnavailable`` listing why it can't run.

``backend="auto"`` (the default) never trusts a kernel it has not checked. For each key (op,
shapes, dtype, layout, flags, device, precision settings) it takes the candidates that can run
the inputs, in the op's order for the device (``AUTO_ORDER``, ``set_auto_order``; backends
plugged in with ``register`` come first unless the op's order places them), and:

  1. verifies each of ours on the first call: its output must match stock PyTorch on the same
     inputs within the op's bound (NaN and Inf exactly, the output's dtype and memory format
     torch's). A mismatch, or an exception, excludes that backend for that key, with one
     ``warnings.warn`` naming the op, the shape, the backend and what was found; ``exclusions()``
     lists them (the main job reports them). ``aten`` and ``reference`` are stock PyTorch and
     need no check; only when every candidate fails does the error reach the caller, with
     every reason;
  2. times the verified candidates when there are several (deeparch_kernels.timing: on a GPU
     back-to-back calls with L2 flushed, compilation and autotuning in the warm-up; on a CPU
     interleaved calls; the median) and takes ours only when it is faster than ``aten`` by
     ``MARGIN`` (3%): ties go to stock PyTorch; among ours, one later in the order replaces an
     earlier one only when faster by ``MARGIN`` too (ties go to the earlier: on the CPU the
     general ``cpu`` before the specialised ``winograd`` and ``gemm``; profiled in ResNet-50
     at batch 1, where the weights come from memory, ``gemm`` was slower than ``cpu`` on 10 of
     the 12 1x1 shapes it had won alone with the caches warm, by 2-41%).
     ``DEEPARCH_AUTOTUNE=0`` times nothing (the first verified candidate in the order is taken,
     after its check);
  3. remembers the choice (and the exclusions) in memory (bounded) and on disk, per machine and
     software versions (``choice_cache``), so a model's first forward on a known machine neither
     verifies nor times again.

While torch.compile/export traces, or a CUDA graph is captured, nothing is run or timed: a
remembered choice is used, else stock PyTorch (``aten``). The ops themselves keep ``auto``'s
choice out of traced graphs where they can (see ops/conv.py).

Ops describe themselves with ``define_op`` (how to check an output) and ``register`` (their
implementations); ``register(op, name, impl)`` is also the documented way to plug in another
implementation: a new name is tried first by ``auto`` on the device types given, and is held to
the same verification and timing.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _ext, _precision

BACKENDS: Tuple[str, ...] = ("cutlass", "cuda", "triton", "cpu", "aten", "reference")
STOCK: Tuple[str, ...] = ("aten", "reference")  # stock PyTorch: the truth, never verified

# Candidates for "auto", in order of preference, per device type. The Triton interpreter is for
# tests and learning: it is never chosen automatically.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("cutlass", "cuda", "triton", "aten"),
    "cpu": ("cpu", "aten"),
}
MARGIN = 0.03  # ours must beat aten (and a later of ours the earlier) by this fraction to be chosen

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


# --------------------------------------------------------------------------- ops and backends

@dataclasses.dataclass
class _Op:
    check: Optional[Callable[..., Optional[str]]] = None  # check(out, *args) -> why wrong, or None
    mutates: Tuple[int, ...] = ()  # argument positions an implementation writes (in-place ops)
    impls: Dict[str, Callable] = dataclasses.field(default_factory=dict)
    supports: Dict[str, Callable[..., Optional[str]]] = dataclasses.field(default_factory=dict)
    plugins: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)  # name -> devices


_OPS: Dict[str, _Op] = {}


def define_op(op: str, *, check: Callable[..., Optional[str]], mutates: Sequence[int] = ()) -> None:
    """Declare ``op`` to the dispatch rule. ``check(out, *args)`` says how an output of one of
    our backends differs from stock PyTorch on ``args`` beyond the op's error bound (None when
    it does not); ``mutates``: the positions of arguments the op writes in place (their
    implementations return the written tensor; verification runs them on clones)."""
    spec = _OPS.setdefault(op, _Op())
    spec.check, spec.mutates = check, tuple(mutates)


def register(op: str, backend: str, impl: Callable,
             supports: Optional[Callable[..., Optional[str]]] = None, *,
             devices: Sequence[str] = ("cpu", "cuda")) -> None:
    """Register ``impl`` as ``op``'s implementation named ``backend``. ``supports(*args)`` returns
    why these inputs can't run there (dtype, shape...), or None.

    A built-in backend name replaces that backend's implementation. Any other name plugs in a new
    backend: ``backend=name`` forces it, and ``auto`` tries it first on the device types in
    ``devices`` -- after verifying its output against stock PyTorch, and on a GPU timing it, like
    every backend of ours."""
    if not backend or backend == "auto":
        raise ValueError(f"register: {backend!r} is not a backend name")
    spec = _OPS.setdefault(op, _Op())
    spec.impls[backend] = impl
    if supports is not None:
        spec.supports[backend] = supports
    else:
        spec.supports.pop(backend, None)
    if backend not in BACKENDS:
        spec.plugins[backend] = tuple(devices)
    _forget(op)


def unregister(op: str, backend: str) -> None:
    """Remove a backend plugged in with ``register`` (built-in ones can only be replaced)."""
    if backend in BACKENDS:
        raise ValueError(f"unregister: {backend!r} is built in; register another implementation instead")
    spec = _OPS.get(op)
    if spec is not None:
        spec.impls.pop(backend, None)
        spec.supports.pop(backend, None)
        spec.plugins.pop(backend, None)
    _forget(op)


def names(op: Optional[str] = None) -> Tuple[str, ...]:
    """Every backend name: the built-in ones, then those plugged in (for ``op``, or any op)."""
    specs = [_OPS[op]] if op is not None and op in _OPS else list(_OPS.values())
    extra = [n for s in specs for n in s.plugins if n not in BACKENDS]
    return BACKENDS + tuple(dict.fromkeys(extra))


def check_name(backend: str) -> str:
    """``backend`` if it is "auto" or a known backend name, else ValueError."""
    if backend != "auto" and backend not in names():
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {names()}")
    return backend


def impl(op: str, backend: str) -> Callable:
    """The implementation of ``op`` registered as ``backend``."""
    return _OPS[op].impls[backend]


def device_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` can't run on ``device`` (None when it can). Op-independent."""
    if name not in BACKENDS:
        if name in names():
            return None  # plugged in: its supports() decides
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {names()}")
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
    """Each built-in backend name -> (whether it can run here, why not). ``device`` defaults to
    the GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        reason = device_reason(name, device)
        out[name] = Availability(reason is None, reason or "")
    return out


def reasons(op: str, device: torch.device, *args) -> Dict[str, Optional[str]]:
    """For each backend: why it can't run op on these inputs, or None."""
    spec = _OPS.get(op, _Op())
    out: Dict[str, Optional[str]] = {}
    for name in names(op):
        if name not in spec.impls:
            out[name] = f"{op} has no {name!r} implementation"
            continue
        why = device_reason(name, device)
        if why is None and name in spec.supports:
            why = spec.supports[name](*args)
        out[name] = why
    return out


# --------------------------------------------------------------------------- the rule

class Exclusion(NamedTuple):
    op: str
    device: str
    key: tuple
    backend: str
    reason: str


_CHOICES_MAX = 4096  # remembered choices (least recently used dropped past this)
_CHOICES: "collections.OrderedDict[tuple, str]" = collections.OrderedDict()
_EXCLUDED: "collections.OrderedDict[tuple, Dict[str, str]]" = collections.OrderedDict()


def is_tracing() -> bool:
    """torch.compile or torch.export (strict or not) is tracing the caller."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (is_exporting is not None and is_exporting())


def _busy_tracing() -> bool:
    """Nothing can be run or timed now: tracing, or a CUDA graph is being captured."""
    return is_tracing() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _timing_enabled() -> bool:
    return os.environ.get("DEEPARCH_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def _order(op: str, device: torch.device) -> List[str]:
    spec = _OPS.get(op, _Op())
    base = _OP_ORDER.get((op, device.type)) or AUTO_ORDER.get(device.type, ("aten",))
    plugged = [n for n, devs in spec.plugins.items() if device.type in devs and n not in base]
    order = plugged + list(base)
    return order + ([] if "aten" in order else ["aten"])  # stock PyTorch is always a candidate


def _remember(table: "collections.OrderedDict", key: tuple, value) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > _CHOICES_MAX:
        table.popitem(last=False)


def _exclude(op: str, device: torch.device, full_key: tuple, backend: str, reason: str,
             persist: bool = True) -> None:
    """Exclude ``backend`` for this key: remembered, warned once, written to disk."""
    entry = _EXCLUDED.get(full_key, {})
    if backend in entry:
        return
    entry[backend] = reason
    _remember(_EXCLUDED, full_key, entry)
    warnings.warn(f"deeparch_kernels: backend {backend!r} is not used for {op} on {device} with "
                  f"{_describe(full_key[2])}: {reason}", RuntimeWarning, stacklevel=4)
    if persist:
        choice_cache.record(device, full_key, exclusions={backend: reason}, write_now=True)


def _describe(key: tuple) -> str:
    return "inputs " + ", ".join(str(k) for k in key)


def _clone_mutated(spec: _Op, args: Sequence) -> list:
    return [a.clone() if i in spec.mutates and isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)]


def _try(spec: _Op, name: str, args: Sequence) -> Tuple[Optional[object], Optional[str]]:
    """Run one candidate on (clones of the written) args: (output, None) or (None, why not)."""
    try:
        return spec.impls[name](*_clone_mutated(spec, args)), None
    except Exception as e:  # noqa: BLE001 - any failure excludes the candidate, with its reason
        return None, f"raised {type(e).__name__}: {e}"


def _verify(spec: _Op, name: str, args: Sequence) -> Optional[str]:
    """Why ``name``'s output on args is not to be trusted, or None."""
    with torch.no_grad():
        out, why = _try(spec, name, args)
        if why is not None:
            return why
        if spec.check is None:
            return None
        try:
            return spec.check(out, *args)
        except Exception as e:  # noqa: BLE001 - stock PyTorch itself failed: nothing to compare with
            return f"could not be checked: stock PyTorch raised {type(e).__name__}: {e}"


def _time(device: torch.device, spec: _Op, trusted: Sequence[str], args: Sequence) -> Dict[str, float]:
    """Median milliseconds per call of each trusted candidate (deeparch_kernels.timing: on a GPU
    back-to-back calls with L2 flushed, on a CPU interleaved calls), without autograd."""
    from .timing import Timer

    timer = Timer(device, warmup=2, reps=100, min_reps=10, max_time_s=0.05)
    calls = {}
    for name in trusted:
        fn, a = spec.impls[name], _clone_mutated(spec, args)
        calls[name] = (lambda fn=fn, a=a: fn(*a))
    with torch.no_grad():
        timed, _errors = timer.many(calls)  # one that raises now is not timed, hence not chosen
    return {n: t.median_ms for n, t in timed.items()}


def choose(op: str, backend: str, device: torch.device, key: tuple, args: Sequence) -> str:
    """The one rule: the backend that runs ``op`` on ``args`` (see the module docstring).
    ``key`` describes the inputs (shapes, dtype, layout, flags) without the device."""
    if backend != "auto":
        check_name(backend)
        why = reasons(op, device, *args)[backend]
        if why is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} can't run these inputs: {why}")
        return backend
    full_key = (op, str(device), key, _precision.key(device.type))
    hit = _CHOICES.get(full_key)
    if hit is not None:
        _CHOICES.move_to_end(full_key)
        return hit
    stored = choice_cache.lookup(device, full_key)
    if stored is not None:
        choice, excluded = stored
        for b, why in excluded.items():
            _remember(_EXCLUDED, full_key, {**_EXCLUDED.get(full_key, {}), b: why})
        if choice is not None and reasons(op, device, *args).get(choice, "gone") is None:
            _remember(_CHOICES, full_key, choice)
            return choice
    if _busy_tracing():
        return "aten"  # nothing can be run now; stock PyTorch is never wrong
    spec = _OPS[op]
    why = reasons(op, device, *args)
    excluded = _EXCLUDED.get(full_key, {})
    failures: Dict[str, str] = {b: w for b, w in why.items() if w is not None}
    failures.update(excluded)
    candidates = [b for b in _order(op, device) if why.get(b) is None and b not in excluded]
    timing = _timing_enabled()
    trusted: List[str] = []
    for name in candidates:
        if trusted and not timing:
            break  # no timing: the first trusted candidate is the choice
        if name in STOCK:
            trusted.append(name)
            continue
        wrong = _verify(spec, name, args)
        if wrong is None:
            trusted.append(name)
        else:
            failures[name] = wrong
            _exclude(op, device, full_key, name, wrong)
    if not trusted:
        raise RuntimeError(f"{op}: no backend could run these inputs ({_describe(key)}):\n"
                           + "\n".join(f"  {b}: {w}" for b, w in failures.items()))
    choice = trusted[0]
    if timing and len(trusted) > 1:
        ms = _time(device, spec, trusted, args)
        base = ms.get("aten", float("inf"))
        best = None  # of ours, in the order: a later one must beat the one it replaces by MARGIN
        for n in trusted:
            if n in ms and n not in STOCK and (best is None or ms[n] < ms[best] * (1.0 - MARGIN)):
                best = n
        if best is not None and ms[best] < base * (1.0 - MARGIN):
            choice = best
        elif "aten" in ms:
            choice = "aten"
        elif ms:
            choice = min(ms, key=ms.get)
    _remember(_CHOICES, full_key, choice)
    choice_cache.record(device, full_key, choice=choice, write_now=timing)
    return choice


def cached_choices() -> Mapping[tuple, str]:
    """What ``auto`` has picked so far in this process: (op, device, key, precision) -> backend."""
    return dict(_CHOICES)


def snapshot() -> dict:
    """This process's choices and exclusions, JSON-ready (a result file's ``auto`` block)."""
    return {"choices": [{"op": k[0], "device": k[1], "key": [str(v) for v in k[2]], "precision": list(k[3]),
                         "backend": b} for k, b in _CHOICES.items()],
            "exclusions": [{"op": e.op, "device": e.device, "key": [str(v) for v in e.key], "backend": e.backend,
                            "reason": e.reason} for e in exclusions()]}


def exclusions() -> List[Exclusion]:
    """Every backend ``auto`` has refused for a key in this process, with the reason."""
    return [Exclusion(k[0], k[1], k[2], b, why) for k, entry in _EXCLUDED.items()
            for b, why in entry.items()]


_GENERATION = 0  # bumped whenever choices are forgotten (see generation())


def generation() -> int:
    """A number that changes whenever the choices are forgotten (``clear_cache``, ``register``,
    ``unregister``): what a caller that keeps a fast-path entry beyond the call (ops/conv.py
    BoundConv) compares to know the entry still stands."""
    return _GENERATION


def _forget(op: Optional[str] = None) -> None:
    """Drop the in-memory choices (of one op, or all) and the fast path."""
    global _GENERATION
    for table in (_CHOICES, _EXCLUDED):
        for k in [k for k in table if op is None or k[0] == op]:
            del table[k]
    _FAST.clear()
    _GENERATION += 1


def clear_cache(disk: bool = False) -> None:
    """Forget every choice and exclusion in memory (and on disk with ``disk=True``)."""
    _forget()
    choice_cache.reset(delete_files=disk)


# --------------------------------------------------------------------------- the choices on disk

class ChoiceCache:
    """``auto``'s choices and exclusions on disk, one JSON file per machine and software identity
    (device name and compute capability, torch, Triton, CUDA, this package's version and its
    built code), under ``$DEEPARCH_CACHE_DIR`` (default ``~/.cache/deeparch_kernels``), as
    Triton's and Inductor's caches. ``DEEPARCH_CACHE_DIR=off`` keeps choices in memory only.
    A file that can't be read, is corrupt, or belongs to another identity is ignored with a
    warning, never trusted; writes are atomic (a temporary file renamed into place)."""

    SCHEMA = 1

    def __init__(self) -> None:
        self._loaded: Dict[str, dict] = {}  # file path -> {"choices", "exclusions"}
        self._paths: Dict[str, Optional[Path]] = {}  # str(device) -> its file
        self._dirty: Dict[str, torch.device] = {}  # files with entries not written yet
        self._stamp: Optional[str] = None
        atexit.register(self.flush)

    @staticmethod
    def directory() -> Optional[Path]:
        d = os.environ.get("DEEPARCH_CACHE_DIR")
        if d is not None and d.strip().lower() in ("", "0", "off", "none"):
            return None
        return Path(d).expanduser() if d else Path.home() / ".cache" / "deeparch_kernels"

    def code_stamp(self) -> str:
        """A hash of this package's built and kernel code (the extension's file, the Triton
        kernels, the op files) and of how choices are made (this file, the timer): a rebuild or
        an edit makes a new identity."""
        if self._stamp is None:
            h = hashlib.sha256()
            root = Path(__file__).resolve().parent
            files = sorted(list(root.glob("_C*.so")) + list(root.glob("_C*.pyd"))
                           + list((root / "triton").glob("*.py")) + list((root / "ops").glob("*.py"))
                           + [root / "backends.py", root / "timing.py"])
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    continue
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
            self._stamp = h.hexdigest()[:16]
        return self._stamp

    def identity(self, device: torch.device) -> Dict[str, object]:
        from . import __version__

        ident: Dict[str, object] = {"device_type": device.type, "torch": torch.__version__,
                                    "package": __version__, "code": self.code_stamp()}
        if device.type == "cuda":
            ident["device"] = torch.cuda.get_device_name(device)
            ident["capability"] = list(torch.cuda.get_device_capability(device))
            ident["cuda"] = torch.version.cuda
            ident["triton"] = None if _triton_import_error else triton.__version__
        else:
            import platform

            ident["device"] = platform.processor() or platform.machine()
        return ident

    def path(self, device: torch.device) -> Optional[Path]:
        d = self.directory()
        if d is None:
            return None
        k = f"{d}|{device}"
        if k not in self._paths:
            ident = json.dumps(self.identity(device), sort_keys=True).encode()
            self._paths[k] = d / f"auto-{device.type}-{hashlib.sha256(ident).hexdigest()[:16]}.json"
        return self._paths[k]

    @staticmethod
    def _key(full_key: tuple) -> str:
        op, _device, key, precision = full_key  # the device index is not part of the identity
        return repr((op, key, precision))

    def _read(self, path: Path, device: torch.device) -> dict:
        empty = {"choices": {}, "exclusions": {}}
        if not path.exists():
            return empty
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("schema") != self.SCHEMA:
                raise ValueError(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                                 f"expected {self.SCHEMA}")
            if data.get("identity") != json.loads(json.dumps(self.identity(device))):
                raise ValueError("it was written for another machine or software version")
            choices, excl = data.get("choices"), data.get("exclusions")
            if not isinstance(choices, dict) or not isinstance(excl, dict) or \
                    not all(isinstance(v, str) for v in choices.values()) or \
                    not all(isinstance(v, dict) for v in excl.values()):
                raise ValueError("its entries are malformed")
            return {"choices": choices, "exclusions": excl}
        except (OSError, ValueError) as e:
            warnings.warn(f"deeparch_kernels: ignoring the choice cache {path}: {e}", RuntimeWarning,
                          stacklevel=4)
            return empty

    def _table(self, device: torch.device) -> Optional[Tuple[Path, dict]]:
        path = self.path(device)
        if path is None:
            return None
        if str(path) not in self._loaded:
            self._loaded[str(path)] = self._read(path, device)
        return path, self._loaded[str(path)]

    def lookup(self, device: torch.device, full_key: tuple) -> Optional[Tuple[Optional[str], Dict[str, str]]]:
        """(choice or None, exclusions) stored for this key, or None when nothing is."""
        t = self._table(device)
        if t is None:
            return None
        k = self._key(full_key)
        choice, excl = t[1]["choices"].get(k), t[1]["exclusions"].get(k, {})
        return None if choice is None and not excl else (choice, dict(excl))

    def record(self, device: torch.device, full_key: tuple, *, choice: Optional[str] = None,
               exclusions: Optional[Dict[str, str]] = None, write_now: bool = False) -> None:
        """Store a choice and/or exclusions for the key; on disk now with ``write_now`` (after
        a timing, whose cost dwarfs the write), else at ``flush()`` (at the latest, at exit)."""
        t = self._table(device)
        if t is None:
            return
        path, table = t
        k = self._key(full_key)
        if choice is not None:
            table["choices"][k] = choice
        if exclusions:
            table["exclusions"].setdefault(k, {}).update(exclusions)
        self._dirty[str(path)] = device
        if write_now:
            self._write(path, device)

    def flush(self) -> None:
        """Write every file with entries not on disk yet."""
        for path, device in list(self._dirty.items()):
            self._write(Path(path), device)

    def _write(self, path: Path, device: torch.device) -> None:
        table = self._loaded.get(str(path))
        self._dirty.pop(str(path), None)
        if table is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            on_disk = self._read(path, device) if path.exists() else {"choices": {}, "exclusions": {}}
            on_disk["choices"].update(table["choices"])  # keep what other processes wrote
            for kk, v in table["exclusions"].items():
                on_disk["exclusions"].setdefault(kk, {}).update(v)
            for name in ("choices", "exclusions"):
                while len(on_disk[name]) > 4 * _CHOICES_MAX:  # bounded, oldest first
                    on_disk[name].pop(next(iter(on_disk[name])))
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"schema": self.SCHEMA, "identity": self.identity(device),
                                       **on_disk}, indent=0, sort_keys=True))
            os.replace(tmp, path)
            self._loaded[str(path)] = on_disk
        except OSError as e:
            warnings.warn(f"deeparch_kernels: could not write the choice cache {path}: {e}",
                          RuntimeWarning, stacklevel=4)

    def files(self) -> List[Path]:
        d = self.directory()
        return sorted(d.glob("auto-*.json")) if d is not None and d.is_dir() else []

    def describe(self) -> str:
        """The files, their identities and counts, and every refused backend, as text."""
        d = self.directory()
        if d is None:
            return "the choice cache is off (DEEPARCH_CACHE_DIR=off)\n"
        out = [f"{d}: {len(self.files())} file(s)"]
        for f in self.files():
            try:
                data = json.loads(f.read_text())
                ident = ", ".join(f"{k} {v}" for k, v in data.get("identity", {}).items())
                excl = data.get("exclusions", {})
                out += [f"\n{f.name}: {ident}\n  {len(data.get('choices', {}))} choices, "
                        f"{sum(len(v) for v in excl.values())} exclusions"]
                out += [f"  refused {b} for {k}: {why}" for k, v in excl.items() for b, why in v.items()]
            except (OSError, ValueError) as e:
                out.append(f"\n{f.name}: unreadable ({e}); it is ignored")
        return "\n".join(out) + "\n"

    def reset(self, delete_files: bool = False) -> None:
        """Forget what was read (files are read again on next use); ``delete_files``: also
        delete them (entries not written yet are dropped)."""
        if delete_files:
            self._dirty.clear()
            for f in self.files():
                f.unlink(missing_ok=True)
        else:
            self.flush()
        self._loaded.clear()
        self._paths.clear()
        self._stamp = None


choice_cache = ChoiceCache()


# --------------------------------------------------------------------------- the hot path

# (op, backend, every argument's device/dtype/shape/strides, flags) -> what the op resolved for
# them (the implementation chosen, and whatever else the op needs to call it). A hit means these
# exact inputs were validated and dispatched before, so a repeat call costs one tuple and one dict
# lookup on top of the kernel. Every op's public function does:
#
#     try:
#         key = (OP, backend, tensor_sig(x), tensor_sig(identity), <other arguments>)
#     except (AttributeError, RuntimeError):  # not (dense) tensors: the full path says so
#         key = None
#     fn = fast_lookup(key)
#     if fn is None:
#         <check the arguments>; fn = impl(OP, choose(OP, backend, ...)); fast_store(key, fn)
#     return fn(x, identity)
#
# (the key is built in the op, inline: a helper call per op call costs more than the lookup.)
_FAST: Dict[tuple, object] = {}
_FAST_MAX = 8192


def tensor_sig(t: Optional[torch.Tensor]):
    return None if t is None else (t.device, t.dtype, t.shape, t.stride())


def fast_lookup(key: Optional[tuple]):
    """What ``fast_store`` remembered for ``key``; None (take the full path) also for no key, an
    unhashable one (arguments the full path checks) and while tracing (traced code takes the full
    path: shapes may be symbolic)."""
    if key is None or torch.compiler.is_compiling():
        return None
    try:
        return _FAST.get(key)
    except TypeError:  # unhashable arguments
        return None


def fast_store(key: Optional[tuple], value) -> None:
    """Remember ``value`` for the fast-path ``key`` (not for no key or an unhashable one, not
    while tracing or capturing; bounded)."""
    if key is not None and not _busy_tracing():
        if len(_FAST) >= _FAST_MAX:
            _FAST.clear()
        try:
            _FAST[key] = value
        except TypeError:  # unhashable arguments
            pass
