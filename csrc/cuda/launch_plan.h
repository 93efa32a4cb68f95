// Host-side decisions of the fused_conv2d CUDA launcher, as pure functions (no CUDA or torch
// types), so that tests can compile and check them on any machine (tests/test_cuda_launch_plan.py):
//
//  * arch_refusal: whether the loaded binary of an arch-gated kernel has its real body. Kernels
//    whose body needs sm_80 (cp.async, ldmatrix, bf16 mma.sync) are compiled under
//    `#if __CUDA_ARCH__ >= 800`, with a trap otherwise; a build for older archs (e.g.
//    TORCH_CUDA_ARCH_LIST="7.5+PTX", JIT-compiled by the driver on an sm_90 card) loads that trap.
//    cudaFuncGetAttributes says what was loaded: ptxVersion is the virtual arch the code was
//    compiled for (75 for compute_75 PTX, whatever GPU JIT-compiled it), binaryVersion the arch
//    of the binary the driver runs.
//  * plan_tc: tile and split-K of the tensor-core kernel from the wave count, the same model as
//    the Triton launcher's wave_cost (deeparch_kernels/triton/conv.py).
//  * padded_channels: the channel padding option (DEEPARCH_CUDA_PAD_CHANNELS) of the C = 3 stem.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace deeparch {
namespace conv {

// Empty when `kernel`'s loaded code was compiled for compute_<min_arch> or newer (so its
// arch-gated body is there); else why not, naming the archs and what to do.
inline std::string arch_refusal(const char* kernel, int ptx_version, int binary_version,
                                int min_arch) {
  if (ptx_version >= min_arch && binary_version >= min_arch) return {};
  return std::string(kernel) + " was compiled for compute_" + std::to_string(ptx_version) +
         " (running as sm_" + std::to_string(binary_version) + "), where its body is a trap: it needs compute_" +
         std::to_string(min_arch) + " or newer. Rebuild the extension with this GPU's arch in "
         "TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0\")";
}

// The wave model (deeparch_kernels/triton/conv.py, wave_cost): a launch takes about as long as
// its busiest SM, which runs ceil(tiles * split / SMs) CTAs of ceil(steps / split) reduction
// steps, plus kFillSteps of pipeline fill, plus kPartialSteps to write and re-read an fp32
// partial tile under split-K. Estimates, not measurements (no GPU has run this yet).
constexpr int64_t kFillSteps = 2;
constexpr int64_t kPartialSteps = 6;
constexpr int64_t kMaxSplitK = 16;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t wave_cost(int64_t tiles, int64_t sm_count, int64_t steps, int64_t split) {
  const int64_t per_slice = cdiv(steps, split) + kFillSteps + (split > 1 ? kPartialSteps : 0);
  return cdiv(tiles * split, std::max<int64_t>(1, sm_count)) * per_slice;
}

struct TcPlan {
  bool large;  // 128x128 tile (else 64x64)
  int split;   // split-K slices (64x64 tile only), >= 1, never an empty slice
};

// Tiles: 128x128 (4x the work of a 64x64 tile per step) or 64x64 (taken as 0.8x as fast per
// output: fewer operand reuses; an estimate), both with BK = 32 channel steps. Costs are in
// 64x64-tile steps, x10 to stay in integers.
inline TcPlan plan_tc(int64_t M, int64_t K, int64_t R, int64_t S, int64_t C, int64_t sm_count,
                      int64_t max_split = kMaxSplitK) {
  const int64_t steps = R * S * cdiv(C, 32);
  const int64_t tiles_large = cdiv(M, 128) * cdiv(K, 128);
  const int64_t tiles_small = cdiv(M, 64) * cdiv(K, 64);
  TcPlan best{true, 1};
  int64_t best_cost = wave_cost(tiles_large, sm_count, steps, 1) * 40;
  for (int64_t split = 1; split <= std::min(max_split, steps); ++split) {
    const int64_t cost = wave_cost(tiles_small, sm_count, steps, split) * 125 / 10;
    if (cost < best_cost) {
      best_cost = cost;
      // Equal slices of ceil(steps / split) k-tiles, as the kernel cuts them; drop the slices
      // that would be left empty.
      best = {false, static_cast<int>(cdiv(steps, cdiv(steps, split)))};
    }
  }
  return best;
}

// The channel count the CUDA kernel runs a convolution with: C itself, or, when `enabled`
// (DEEPARCH_CUDA_PAD_CHANNELS=1) for 16-bit dtypes with C % 8 != 0 and K % 8 == 0, C rounded up
// to a multiple of 8 (x and weight zero-padded: the tensor-core kernel instead of the SIMT one).
inline int64_t padded_channels(int64_t C, int64_t K, bool sixteen_bit, bool enabled) {
  if (!enabled || !sixteen_bit || C <= 0 || C % 8 == 0 || K % 8 != 0) return C;
  return cdiv(C, 8) * 8;
}

}  // namespace conv
}  // namespace deeparch
