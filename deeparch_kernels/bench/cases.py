"""The cases a run verifies and times: the anchor table's shapes (/work/shared/anchors/README.md,
mirrored here), named subsets of them, and explicit shapes given on the command line (``--shapes``:
the specs are listed in benchmarks/README.md). Conv forms: "bias_relu" (relu(conv(x, w) + b)) for
every conv shape, and "residual" (relu(conv(x, w) + b + identity), ResNet's second conv of a
block) for ResNet and explicit shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPE_NAMES: Dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES: Dict[str, torch.dtype] = {**{n: d for d, n in DTYPE_NAMES.items()}, "float32": torch.float32,
                                  "float": torch.float32, "float16": torch.float16, "half": torch.float16,
                                  "bfloat16": torch.bfloat16}


def dtype_name(dt: torch.dtype) -> str:
    return DTYPE_NAMES[dt]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16") from None


@dataclass(frozen=True)
class AddCase:
    shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    memory_format: str = "channels_last"

    op = "add_relu"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def bytes(self) -> int:
        """Fewest bytes moved: read a and b, write the output."""
        return 3 * self.numel * self.dtype.itemsize

    @property
    def fmt(self) -> str:
        return self.memory_format if len(self.shape) == 4 else "contiguous"


@dataclass(frozen=True)
class ConvCase:
    N: int
    C: int
    H: int
    W: int
    K: int
    k: int = 3
    stride: int = 1
    padding: Optional[int] = None  # None: k // 2
    dtype: torch.dtype = torch.float32
    memory_format: str = "channels_last"
    form: str = "bias_relu"  # or "residual"
    net: str = "custom"

    op = "fused_conv2d"

    @property
    def pad(self) -> int:
        return self.k // 2 if self.padding is None else self.padding

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        p, s, k = self.pad, self.stride, self.k
        return self.N, self.K, (self.H + 2 * p - k) // s + 1, (self.W + 2 * p - k) // s + 1

    @property
    def flops(self) -> int:
        return 2 * math.prod(self.out_shape) * self.C * self.k * self.k

    @property
    def bytes(self) -> int:
        """Fewest bytes moved: x, weight, bias (and residual) read once, the output written once."""
        n = math.prod(self.shape) + self.K * self.C * self.k * self.k + self.K
        return self.dtype.itemsize * (n + math.prod(self.out_shape) * (2 if self.form == "residual" else 1))

    @property
    def label(self) -> str:
        return (f"{self.C}->{self.K}" if self.C != self.K else f"{self.C}") + f" {self.H}x{self.W}" \
            + (f" k{self.k}" if self.k != 3 else "") + f" s{self.stride} N={self.N}"

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.N, self.C, self.H, self.W)


# The anchor table: (C=K, H=W, stride), net.
VGG16_CONV = [(64, 224, 1), (128, 112, 1), (256, 56, 1), (512, 28, 1), (512, 14, 1)]
RESNET_CONV = [(64, 56, 1), (128, 28, 1), (256, 14, 1), (512, 7, 1), (128, 56, 2)]
ANCHOR_N1 = [(256, 56, 1), (256, 14, 1)]  # also timed at N=1
ANCHOR_FP32_NCHW = [(64, 224, 1), (256, 56, 1)]  # also timed fp32 NCHW (TF32 on)
ANCHOR_ADD = [((32, 256, 56, 56), torch.float16), ((32, 256, 56, 56), torch.float32),
              ((128, 256, 56, 56), torch.float16), ((32, 64, 56, 56), torch.float16),
              ((32, 2048, 7, 7), torch.float16)]
# CPU: fp32, and sizes a 2-core run can time in seconds. 32x256x32x32 = 8.4M elements.
CPU_ADD = [(32, 256, 56, 56), (32, 256, 32, 32), (32, 64, 56, 56), (32, 2048, 7, 7)]
# ResNet-50's 1x1 layers at batch 1 (what the CPU gemm backend takes): two reductions with the
# ReLU, two expansions with the residual, as in its bottlenecks. (C, H, stride, K, k)
RESNET50_1X1 = {"bias_relu": [(1024, 14, 1, 256, 1), (2048, 7, 1, 512, 1)],
                "residual": [(64, 56, 1, 256, 1), (256, 14, 1, 1024, 1)]}
TINY_CONV = [(2, 3, 17, 15, 16, 3, 1), (2, 16, 16, 16, 16, 3, 1), (2, 16, 15, 15, 32, 3, 2)]
TINY_ADD = [(2, 64, 28, 28), (4, 32, 15, 17)]

NAMED = ("anchors", "vgg", "resnet", "conv", "add", "cpu", "tiny")


@dataclass
class CaseSet:
    add: List[AddCase]
    conv: List[ConvCase]


def parse_shape_spec(spec: str) -> str:
    """Validate one --shapes item (raises ValueError with the reason); returns it normalised."""
    s = spec.strip().lower()
    if s in NAMED:
        return s
    if s.startswith("conv:"):
        parts = s[5:].split("x")
        if not 3 <= len(parts) <= 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad conv shape {spec!r}: expected conv:CxHxSTRIDE[xK[xKSIZE]] with "
                             "positive integers, e.g. conv:64x56x1")
        return s
    if s.startswith("add:"):
        if not re.fullmatch(r"\d+(x\d+)*", s[4:]) or any(int(d) == 0 for d in s[4:].split("x")):
            raise ValueError(f"bad add shape {spec!r}: expected add:AxBxCxD, e.g. add:32x256x56x56")
        return s
    raise ValueError(f"unknown shape set {spec!r}; expected one of {', '.join(NAMED)}, "
                     "conv:CxHxSTRIDE[xK[xKSIZE]] or add:AxBx...")


def build_cases(specs: Sequence[str], device_type: str, *, dtypes: Optional[Sequence[torch.dtype]] = None,
                batches: Optional[Sequence[int]] = None, memory_format: Optional[str] = None) -> CaseSet:
    """Expand shape specs into cases. Without overrides the anchor sets keep the anchor table's
    dtypes/batches/layouts on the GPU; on the CPU everything is fp32, channels_last, batch 1 for
    convolutions. ``dtypes``/``batches``/``memory_format`` replace those everywhere."""
    gpu = device_type == "cuda"
    dt = torch.float16 if gpu else torch.float32
    n = 32 if gpu else 1
    fmt = memory_format or "channels_last"
    add: List[AddCase] = []
    conv: List[ConvCase] = []

    def convs(rows, net, N=n, dtype=dt, layout=fmt, forms=None):
        for C, H, s, *K in rows:  # (C, H, stride[, K, k])
            for form in forms or (["bias_relu"] if net == "vgg16" else ["bias_relu", "residual"]):
                conv.append(ConvCase(N, C, H, H, K[0] if K else C, K[1] if len(K) > 1 else 3, s, None, dtype,
                                     layout, form, net))

    for spec in map(parse_shape_spec, specs):
        if spec in ("anchors", "vgg", "conv", "cpu"):
            convs(VGG16_CONV, "vgg16")
        if spec in ("anchors", "resnet", "conv", "cpu"):
            convs(RESNET_CONV, "resnet")
        if spec == "anchors" and gpu:
            for row in ANCHOR_N1:
                convs([row], "vgg16" if row in VGG16_CONV else "resnet", N=1)
            convs(ANCHOR_FP32_NCHW, "vgg16", dtype=torch.float32, layout=memory_format or "contiguous")
        if spec in ("anchors", "add"):  # on a CPU in fp32, without the 128x256x56x56 row (400 MB a tensor)
            add += [AddCase(shape, adt if gpu else torch.float32, fmt) for shape, adt in ANCHOR_ADD
                    if gpu or shape[0] <= 32]
        if spec == "cpu":
            add += [AddCase(shape, dt, fmt) for shape in CPU_ADD]
            for form, rows in RESNET50_1X1.items():
                convs(rows, "resnet", forms=[form])
        if spec == "tiny":
            conv += [ConvCase(N, C, H, W, K, k, s, None, dt, fmt, form, "custom")
                     for N, C, H, W, K, k, s in TINY_CONV for form in ("bias_relu", "residual")]
            add += [AddCase(shape, dt, fmt) for shape in TINY_ADD]
        if spec.startswith("conv:"):
            convs([tuple(int(v) for v in spec[5:].split("x"))], "custom", forms=["bias_relu", "residual"])
        if spec.startswith("add:"):
            add.append(AddCase(tuple(int(d) for d in spec[4:].split("x")), dt, fmt))

    if batches:
        conv = [replace(c, N=b) for c in conv for b in batches]
    if dtypes:
        conv = [replace(c, dtype=d) for c in conv for d in dtypes]
        add = [replace(a, dtype=d) for a in add for d in dtypes]
    return CaseSet(list(dict.fromkeys(add)), list(dict.fromkeys(conv)))
