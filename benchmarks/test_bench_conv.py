"""Fused conv3x3 + bias (+ residual) + ReLU: our backends vs eager ``relu(conv2d(x, w, b))`` /
``conv2d(...).add_(identity).relu_()``, conv2d alone (the floor) and torch.compile, on the anchor
table's VGG16/ResNet layers (GPU: fp16 channels_last, N=32) or ResNet layers at batch 1 (CPU)."""
import pytest

from deeparch_kernels.bench import suite
from deeparch_kernels.bench.cases import dtype_name
from deeparch_kernels.bench.specs import conv_inputs, conv_providers

OURS = suite.our_backends()
CASES = suite.conv_cases()
NAMES = [p.name for p in conv_providers(CASES[0], OURS, compile_=suite.COMPILE)] if CASES else []


@pytest.mark.parametrize("provider", NAMES)
@pytest.mark.parametrize("case", CASES, ids=suite.conv_case_id)
def test_conv(benchmark, case, provider):
    prov = {p.name: p for p in conv_providers(case, OURS, compile_=suite.COMPILE)}[provider]
    sets = conv_inputs(case, suite.DEVICE, suite.n_sets(case))
    fn = suite.compiled(prov.fn, sets[0]) if prov.compiled else prov.fn
    suite.bench_call(benchmark, suite.rotating(fn, sets),
                     group=f"conv {case.label} {case.form} {dtype_name(case.dtype)} {case.memory_format}",
                     extra={"provider": provider, "case": case.label, "form": case.form,
                            "dtype": dtype_name(case.dtype), "flops": case.flops, "bytes": case.bytes,
                            "input_sets": len(sets)})
