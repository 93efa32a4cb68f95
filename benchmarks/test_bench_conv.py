"""Fused conv3x3 + bias (+ residual) + ReLU: our backends vs eager ``relu(conv2d(x, w, b))`` /
``conv2d(...).add_(identity).relu_()``, conv2d alone (the floor) and torch.compile, on the anchor
table's VGG16/ResNet layers (GPU: fp16 channels_last, N=32) or ResNet layers at batch 1 (CPU)."""
import pytest

import suite

CASES = suite.cases("fused_conv2d")


@pytest.mark.parametrize("provider", [p.name for p in suite.providers(CASES[0])] if CASES else [])
@pytest.mark.parametrize("case", CASES, ids=suite.case_id)
def test_conv(benchmark, case, provider):
    suite.bench_case(benchmark, case, provider)
