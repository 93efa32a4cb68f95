"""The CUDA launcher's host-side decisions and arch guards, checked without a GPU.

* csrc/cuda/launch_plan.h (pure C++): compiled here with the host compiler into a small program
  that answers queries, so the arch refusal (issue 11, item 6), the tile / split-K choice from the
  wave count and the channel-padding option are tested on any machine with a C++ compiler.
* conv_tc_kernel compiled to compute_75 PTX with nvcc (issue 11's TORCH_CUDA_ARCH_LIST="7.5+PTX"
  case): its body must be a trap, not a bare `ret;`; and in the built extension's sm_80/sm_90
  code the same kernel has its tensor-core body (HMMA) and no trap.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")

_PROGRAM = r"""
#include <iostream>
#include <string>
#include "launch_plan.h"
using namespace deeparch::conv;
int main() {
  std::string q;
  while (std::cin >> q) {
    if (q == "arch") {
      int ptx, bin, min;
      std::cin >> ptx >> bin >> min;
      const std::string why = arch_refusal("conv_tc_kernel", ptx, bin, min);
      std::cout << (why.empty() ? "OK" : why) << "\n";
    } else if (q == "plan") {
      long long M, K, R, S, C, sms;
      std::cin >> M >> K >> R >> S >> C >> sms;
      const TcPlan p = plan_tc(M, K, R, S, C, sms);
      std::cout << (p.large ? "large" : "small") << " " << p.split << "\n";
    } else if (q == "pad") {
      long long C, K;
      int sixteen, enabled;
      std::cin >> C >> K >> sixteen >> enabled;
      std::cout << padded_channels(C, K, sixteen != 0, enabled != 0) << "\n";
    }
  }
}
"""


@pytest.fixture(scope="module")
def host_logic(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("launch_plan")
    src, exe = d / "prog.cpp", d / "prog"
    src.write_text(_PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{CUDA_SRC}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, timeout=120)

    def ask(*lines):
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return out.strip().splitlines()
    return ask


def test_arch_refusal(host_logic):
    """The tensor-core path is refused exactly when the loaded code was compiled for an arch
    below compute_80, naming both archs and the fix; PTX JIT-compiled for a newer GPU is fine."""
    ok_cases = ["arch 80 80 80", "arch 90 90 80", "arch 80 86 80", "arch 90 100 80", "arch 80 90 80"]
    assert host_logic(*ok_cases) == ["OK"] * len(ok_cases)
    why = host_logic("arch 75 90 80")[0]  # compute_75 PTX JIT-compiled on an H100
    assert "compute_75" in why and "sm_90" in why and "compute_80" in why
    assert "trap" in why and "TORCH_CUDA_ARCH_LIST" in why
    assert host_logic("arch 75 75 80", "arch 70 80 80")[0] != "OK"
    assert host_logic("arch 70 80 80")[0] != "OK"


# (M, K, R, S, C) of the anchor layers and batch-1 late layers, 132 SMs (H100/H200 SXM).
@pytest.mark.parametrize("shape,want", [
    ((32 * 224 * 224, 64, 3, 3, 64), "small 1"),    # K = 64: a 128-wide tile is half padding
    ((32 * 56 * 56, 256, 3, 3, 256), "large 1"),    # 1568 large tiles, 12 waves
    ((32 * 28 * 28, 512, 3, 3, 512), "large 1"),
    ((32 * 14 * 14, 512, 3, 3, 512), "small 1"),    # 196 large tiles: 1.5 waves, 2 on the busiest SM
    ((32 * 7 * 7, 512, 3, 3, 512), "small 3"),      # 200 small tiles: split-K now taken (issue 15)
    ((14 * 14, 256, 3, 3, 256), "small 8"),         # batch 1: 16 tiles for 132 SMs
    ((7 * 7, 512, 3, 3, 512), "small 16"),
    ((7 * 7, 64, 1, 1, 64), "small 1"),             # 2 k-steps: nothing worth splitting
])
def test_tile_and_split_from_wave_count(host_logic, shape, want):
    assert host_logic("plan " + " ".join(map(str, shape)) + " 132") == [want]


def test_split_never_leaves_an_empty_slice(host_logic):
    """The kernel cuts k_tiles into slices of ceil(k_tiles / split): every returned split is
    one whose last slice is non-empty, for any shape."""
    cases = [(m, k, r, r, c) for m in (1, 49, 196, 1000) for k in (8, 64, 512)
             for r in (1, 3) for c in (8, 40, 64, 264, 512)]
    out = host_logic(*("plan " + " ".join(map(str, cs)) + " 132" for cs in cases))
    for (m, k, r, s, c), line in zip(cases, out):
        kind, split = line.split()
        split = int(split)
        k_tiles = r * s * -(-c // 32)
        per = -(-k_tiles // split)
        assert 1 <= split <= min(16, k_tiles) and (split - 1) * per < k_tiles, (m, k, r, c, line)
        assert kind == "small" or split == 1


def test_channel_padding_option(host_logic):
    """DEEPARCH_CUDA_PAD_CHANNELS: C % 8 != 0 rounded up to 8 for 16-bit dtypes when K % 8 == 0,
    only when enabled."""
    q = ["pad 3 64 1 1", "pad 3 64 1 0", "pad 3 64 0 1", "pad 8 64 1 1", "pad 3 7 1 1",
         "pad 12 64 1 1", "pad 0 64 1 1"]
    assert host_logic(*q) == ["8", "3", "3", "8", "3", "16", "0"]


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


_TC_INSTANCE = r"""
#include "conv_tc.cuh"
namespace deeparch { namespace conv {
template __global__ void conv_tc_kernel<c10::Half, TcTileSmall>(
    const c10::Half*, const c10::Half*, const ConvShape, const Epilogue<c10::Half>, const int,
    float*);
}}
"""


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_tc_kernel_compute75_ptx_is_a_trap(tmp_path):
    """Issue 11: built for compute_75 (JIT-compiled by the driver on an sm_80/sm_90 card), the
    tensor-core kernel used to be a bare `ret;` and the op returned uninitialised memory. Its
    compute_75 PTX must now be a trap, with none of the kernel's loads, MMAs or stores."""
    from torch.utils.cpp_extension import include_paths

    src = tmp_path / "tc75.cu"
    src.write_text(_TC_INSTANCE)
    ptx = tmp_path / "tc75.ptx"
    cmd = [_nvcc(), "--ptx", "-arch=compute_75", "-std=c++17", "--expt-relaxed-constexpr",
           f"-I{CUDA_SRC}", *(f"-I{p}" for p in include_paths()), str(src), "-o", str(ptx)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    text = ptx.read_text()
    entry = re.search(r"\.entry\s+\S*conv_tc_kernel\S*\((.*?)\n\}", text, re.S)
    assert entry, "no conv_tc_kernel entry in the PTX"
    body = entry.group(1)
    assert "trap;" in body
    assert not re.search(r"\b(mma|ldmatrix|cp\.async|ld\.global|st\.global)\b", body)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_tc_kernel_has_its_body_in_the_built_extension():
    """The extension's sm_80 / sm_90 code of the same kernel: tensor-core MMAs, no trap."""
    import deeparch_kernels._ext as ext

    info = ext.build_info()
    if not info or not info.get("cuda"):
        pytest.skip("extension built without CUDA")
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("cuobjdump (Triton's NVIDIA backend) not found")
    so = sys.modules["deeparch_kernels._C"].__file__
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, timeout=120).stdout
    functions = re.split(r"\n\s*Function : ", sass)
    tc = [f for f in functions if f.startswith("_ZN8deeparch4conv") and "conv_tc_kernel" in f.split("\n")[0]]
    assert tc, "no conv_tc_kernel in the extension"
    for f in tc:
        assert "HMMA.16816.F32" in f and "BPT.TRAP" not in f, f.split("\n")[0]
