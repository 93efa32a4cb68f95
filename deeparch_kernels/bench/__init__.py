"""Benchmarking and verification behind ``deeparch-bench`` (deeparch_kernels.cli).

  cases.py     the anchor table's shapes, named subsets, explicit shape specs
  verify.py    every backend vs a float64 reference (fresh random data, poisoned outputs, NaN/Inf)
  timing.py    Timer (CUDA events + L2 flush on GPU, perf_counter on CPU; median, p20, p80),
               input rotation, the soft time budget
  roofline.py  the measured ceilings: device copy bandwidth, matmul rate per dtype
  opbench.py   add+ReLU and fused conv: our backends vs eager, torchvision's pattern, torch.compile
  modelbench.py  VGG16 / ResNet-18 / ResNet-50: fused vs torchvision eager vs torch.compile
  runner.py    one run -> the result dict;  schema.py: its schema and validator
  report.py    console and markdown tables, file names;  plots.py: PNGs (matplotlib optional)
  compare.py   two result files side by side

The pytest-benchmark suite in benchmarks/ times the same cases with the same providers.
"""
from .schema import SCHEMA_VERSION, validate

__all__ = ["SCHEMA_VERSION", "validate"]
