"""Whole models, inference: torchvision eager vs torch.compile vs ours (deeparch_kernels.models
built from torchvision's weights) — GPU: VGG16, ResNet-18, ResNet-50 at batch 64 fp16
channels_last; CPU: ResNet-18 at batch 1 fp32."""
import pytest
import torch

import suite
from deeparch_kernels.bench.modelbench import build_fused
from deeparch_kernels.testing import reference_model

OURS = suite.our_backends()
BATCH = 64 if suite.GPU else 1
DTYPE = torch.float16 if suite.GPU else torch.float32
# On a GPU ours is backend="auto" (each explicit backend would autotune its Triton kernels for
# every layer shape again); on a CPU each of ours.
FUSED = ["auto"] if suite.GPU else OURS
PROVIDERS = ["torchvision"] + (["compile"] if suite.COMPILE_MODELS else []) + [f"fused:{b}" for b in FUSED]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", suite.model_names())
def test_model(benchmark, name, provider):
    tv = reference_model(name, seed=0).eval()
    place = dict(device=suite.DEVICE, dtype=DTYPE, memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, 224, 224, device=suite.DEVICE).to(DTYPE).contiguous(
        memory_format=torch.channels_last)
    if provider.startswith("fused:"):
        model = build_fused(tv, name, provider.split(":", 1)[1]).to(**place)
    else:
        model = tv.to(**place)
        if provider == "compile":
            torch._dynamo.reset()
            model = torch.compile(model)
    suite.bench_call(benchmark, lambda: model(x), group=f"model {name} batch {BATCH}",
                     extra={"provider": provider, "model": name, "batch": BATCH,
                            "images": BATCH}, max_time_s=2.0)
