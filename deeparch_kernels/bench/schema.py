"""The result file's schema (``schema_version`` 1), and a validator (no jsonschema needed).

Top level (all required)::

  schema_version  1
  tool            "deeparch-bench"
  created         ISO 8601 date-time with offset, e.g. "2026-11-27T01:30:00+00:00"
  argv            the command-line arguments (list of str)
  config          the resolved options (dict: device, ops, backends, dtypes, shapes, ...)
  env             what it was measured on (env.environment): device, device_name, versions,
                  git {commit, dirty}, last_level_cache_bytes, on CUDA gpu {...}; loadavg_1min
  backends        {name: {available: bool, reason: str}} for cuda, triton, cpu, aten, reference
  ceilings        null (--no-bench) or {copy: {bytes, median_ms, gbps},
                  matmul: {dtype: {n, dtype, tf32, median_ms, tflops} or {error}}}
  verification    null (--no-verify) or {seed, summary: {status: count}, results: [verify.Check]}
                  (op "add_relu", "add_relu_", "fused_conv2d", or "model": a model vs torchvision)
  timings         list of rows (below); empty with --no-bench
  notes           list of str: what was skipped and why
  auto            (optional: files before it lack it) what backend="auto" chose in the run,
                  {choices: [{op, device, key, precision, backend}], exclusions: [{op, device,
                  key, backend, reason}]}: the backends its check refused, and why
  wall_s          seconds the run took
  exit_code       0 all good, 1 a verification failure or an error

A timing row: ``Row`` below, with ``input_sets`` (op rows: OpRow) or ``images_per_s`` and
``max_rel_err`` (model rows: ModelRow); every key present, null where it does not apply.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Optional

from ..testing import STATUSES as TESTING_STATUSES
from .verify import Check

SCHEMA_VERSION = 1


@dataclass
class Row:
    """A timing row; the file holds ``dataclasses.asdict`` of an OpRow or a ModelRow."""
    section: str  # "op" or "model"
    op: str  # "add_relu", "add_relu_", "fused_conv2d" or "model"
    case: str  # a label: "32x256x56x56", "256 56x56 s1 N=32", "resnet50"
    shape: list  # input shape (conv: x; model: the image batch)
    dtype: str  # "fp32", "fp16", "bf16"
    memory_format: str  # "channels_last" or "contiguous"
    device: str
    provider: str  # "eager", "torchvision", "compile", "conv-only", a backend, "<backend>:inplace", "fused:<backend>"
    kind: str  # "ours" or "baseline"
    backend: Optional[str] = None  # ours' backend name
    eager_provider: Optional[str] = "eager"  # the provider speedup_vs_eager is taken against
    weight_shape: Optional[list] = None
    stride: Optional[int] = None
    padding: Optional[int] = None
    form: Optional[str] = None  # "bias_relu"/"residual" for conv, "throughput"/"latency" for models
    net: Optional[str] = None
    bytes: Optional[float] = None  # the bytes the row's form moves (roofline.form_bytes)
    flops: Optional[float] = None  # floating-point operations of the case
    median_ms: Optional[float] = None  # the timing (null when not timed)
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: int = 0
    compile_s: Optional[float] = None  # torch.compile's compile time (compile rows)
    status: str = "ok"  # "ok", "skipped", "missing", "error"
    note: str = ""  # why / extra facts
    gbps: Optional[float] = None  # achieved rates, and % of the measured ceiling
    tflops: Optional[float] = None
    roofline_pct: Optional[float] = None
    speedup_vs_eager: Optional[float] = None  # baseline_ms / median_ms (> 1: faster than the baseline)
    speedup_vs_compile: Optional[float] = None

    def timed(self, t) -> None:
        """Fill the timing from a timing.Timing."""
        self.median_ms, self.p20_ms, self.p80_ms, self.reps = t.median_ms, t.p20_ms, t.p80_ms, t.reps


@dataclass
class OpRow(Row):
    input_sets: int = 1  # input sets rotated among (so that repeated calls do not measure the cache)


@dataclass
class ModelRow(Row):
    images_per_s: Optional[float] = None
    max_rel_err: Optional[float] = None  # ours vs torchvision's output
    nan_kept: Optional[bool] = None  # a NaN pixel in the input comes out where torchvision eager puts it


NUM = (int, float, type(None))
_TYPES = {"str": str, "int": int, "list": list, "Optional[str]": (str, type(None)),
          "Optional[list]": (list, type(None)), "Optional[int]": (int, type(None)), "Optional[float]": NUM,
          "Optional[bool]": (bool, type(None))}
# What the validator asks of every row, and of model rows besides.
ROW_KEYS = {f.name: _TYPES[f.type] for f in fields(Row) if f.name not in ("weight_shape", "stride", "padding", "net")}
MODEL_ROW_KEYS = {f.name: _TYPES[f.type] for f in fields(ModelRow)[len(fields(Row)):]}

TOP_KEYS = {"schema_version": int, "tool": str, "created": str, "argv": list, "config": dict, "env": dict,
            "backends": dict, "ceilings": (dict, type(None)), "verification": (dict, type(None)), "timings": list,
            "notes": list, "wall_s": (int, float), "exit_code": int}
ENV_KEYS = {"device": str, "device_type": str, "device_name": str, "device_slug": str, "torch": str,
            "python": str, "git": dict}
CHECK_KEYS = {f.name: _TYPES[f.type] for f in fields(Check)}
STATUSES = {"ok", "skipped", "missing", "error"}


def _check(obj: dict, keys: dict, where: str, errors: List[str]) -> None:
    for k, typ in keys.items():
        if k not in obj:
            errors.append(f"{where}: missing key {k!r}")
        elif not isinstance(obj[k], typ) or (isinstance(obj[k], bool) and typ in (int, NUM)):
            errors.append(f"{where}.{k}: {type(obj[k]).__name__} is not {typ}")


def validate(result: Any) -> List[str]:
    """The ways ``result`` breaks the schema (empty when it is valid)."""
    if not isinstance(result, dict):
        return ["the result is not a JSON object"]
    errors: List[str] = []

    def need(ok: bool, why: str) -> None:
        if not ok:
            errors.append(why)

    _check(result, TOP_KEYS, "result", errors)
    auto = result.get("auto")
    need(auto is None or (isinstance(auto, dict) and isinstance(auto.get("choices"), list)
                          and isinstance(auto.get("exclusions"), list)),
         "auto: expected {choices: list, exclusions: list}")
    need(result.get("schema_version") == SCHEMA_VERSION,
         f"schema_version {result.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if isinstance(result.get("env"), dict):
        _check(result["env"], ENV_KEYS, "env", errors)
    for name, a in (result.get("backends") or {}).items():
        need(isinstance(a, dict) and isinstance(a.get("available"), bool) and isinstance(a.get("reason"), str),
             f"backends.{name}: expected {{available: bool, reason: str}}")
    if isinstance(ceil := result.get("ceilings"), dict):
        need(isinstance(ceil.get("copy"), dict) and isinstance(ceil["copy"].get("gbps"), (int, float)),
             "ceilings.copy.gbps missing")
        need(isinstance(ceil.get("matmul"), dict), "ceilings.matmul missing")
    if isinstance(ver := result.get("verification"), dict):
        need(isinstance(ver.get("seed"), int), "verification.seed missing")
        need(isinstance(ver.get("summary"), dict), "verification.summary missing")
        for i, c in enumerate(ver.get("results") or []):
            _check(c, CHECK_KEYS, f"verification.results[{i}]", errors)
            need(c.get("status") in TESTING_STATUSES, f"verification.results[{i}].status {c.get('status')!r}")
    for i, r in enumerate(result.get("timings") or []):
        if not isinstance(r, dict):
            errors.append(f"timings[{i}] is not an object")
            continue
        keys = {**ROW_KEYS, **(MODEL_ROW_KEYS if r.get("section") == "model" else {})}
        _check(r, keys, f"timings[{i}]", errors)
        for k, ok in (("section", ("op", "model")), ("status", STATUSES), ("kind", ("ours", "baseline"))):
            need(r.get(k) in ok, f"timings[{i}].{k} {r.get(k)!r}")
        need(r.get("status") != "ok" or isinstance(r.get("median_ms"), (int, float)),
             f"timings[{i}]: status ok without median_ms")
    return errors
