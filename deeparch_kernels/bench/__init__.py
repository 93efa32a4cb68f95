"""Benchmarking and verification behind ``deeparch-bench`` (deeparch_kernels.cli).

  specs.py     one spec per op: providers, timed inputs, verification cases and references
  cases.py     the anchor table's shapes, named subsets, explicit shape specs
  verify.py    every backend vs a float64 reference; models through deeparch_kernels.verify
  roofline.py  the measured ceilings and the bytes each form is counted for
  opbench.py   the ops' providers side by side;  modelbench.py: whole models
  runner.py    one run -> the result dict;  schema.py: its rows, schema and validator
  report.py    console and markdown tables;  plots.py: PNGs;  compare.py: two results side by side
  env.py       what a result was measured on

Timing itself is deeparch_kernels.timing; the pytest-benchmark suite is benchmarks/.
"""
from .schema import SCHEMA_VERSION, validate

__all__ = ["SCHEMA_VERSION", "validate"]
