"""The Triton kernels compile for sm_90 without a GPU (scripts/triton_aot_check.py --quick):
what the interpreter cannot catch (a kernel the GPU compiler rejects, shared memory past the
card's limit, register spills on the benchmarked shapes) fails here, on any machine."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

triton = pytest.importorskip("triton")
_TOOL = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.mark.skipif(not os.path.exists(_TOOL), reason="Triton's NVIDIA backend (cuobjdump) is not installed")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles
    p = subprocess.run([sys.executable, "scripts/triton_aot_check.py", "--quick", "--dtypes", "fp16,bf16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("ok", "note", "BAD", "FAIL"))]
    assert len(lines) >= 12 and all(ln.startswith("ok") for ln in lines), p.stdout
    assert "0 problem(s)" in p.stdout


@pytest.mark.skipif(not os.path.exists(_TOOL), reason="Triton's NVIDIA backend is not installed")
def test_conv_offsets_are_64bit():
    """Issue 11: the conv kernel compiled (sm_90, no GPU) for x of 1x512x3x2,100,000 fp16, 3x3,
    where each stride fits in int32 but (KH-1) * sxh does not: its TTIR must multiply no stride
    argument in 32 bits (the script fails on the old `r * sxh`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "scripts/triton_aot_check.py", "--offsets"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "offsets: 0 i32 multiplies of a stride argument" in p.stdout, p.stdout


@pytest.mark.skipif(not os.path.exists(_TOOL), reason="Triton's NVIDIA backend is not installed")
def test_conv_sass_async_copies_tma_and_occupancy():
    """Issue 15, from the sm_90 SASS: the gather kernel's loop for C = 24 / 40 uses 16-byte async
    copies (LDGSTS.128) and no 2-byte loads; the TMA kernel loads by UTMALDG into HGMMA, and
    every one of its configurations fits two CTAs per SM (registers and shared memory); both
    kernels compile for images one pixel high or wide (integer arguments equal to 1 are
    compiled in as constants)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "scripts/triton_aot_check.py", "--sass", "--dtypes", "fp16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("ok", "BAD"))]
    assert len(lines) == 17 and all(ln.startswith("ok") for ln in lines), p.stdout
    assert "sass: 0 problem(s)" in p.stdout
