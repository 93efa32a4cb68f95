"""Test helpers: float64-reference comparison, NaN/Inf checks, poisoned outputs, random data."""
import os

import torch

# The one definition of an op's error against its float64 reference, and its bound per dtype.
from deeparch_kernels.testing import OP_TOL as TOL, rel_err  # noqa: F401

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def assert_nonfinite_match(out: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN where the reference has NaN, and +/-Inf exactly where it has them."""
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ from the reference"
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)), "+Inf positions differ"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "-Inf positions differ"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill t with NaN so any element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, channels_last=False, scale=1.0):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backends_for(device: str):
    """Backends that can run on ``device`` in this environment."""
    import deeparch_kernels as dk

    return [name for name, a in dk.available_backends(device).items() if a.available]
