// Flat elementwise CPU kernels shared by add_relu.cpp and fused_conv2d.cpp: vectorised with
// at::vec (fp16/bf16 widened to fp32), split across threads with at::parallel_for. The ReLU
// keeps NaN (v < 0 ? 0 : v), exactly as torch.relu does. `out` may alias an input.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace deeparch {
namespace cpu {

using fVec = at::vec::Vectorized<float>;

inline fVec relu_keep_nan(const fVec& v) {
  const fVec zero(0.f);
  return fVec::blendv(v, zero, v < zero);  // NaN < 0 is false: NaN stays
}

inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

constexpr int64_t kGrain = 1 << 15;

template <typename scalar_t>
void add_relu_flat(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (; i + Vec::size() <= end; i += Vec::size()) {
        relu_keep_nan(Vec::loadu(a + i) + Vec::loadu(b + i)).store(out + i);
      }
    } else {
      // Reduced precision: widen one vector of scalar_t into two float vectors.
      for (; i + Vec::size() <= end; i += Vec::size()) {
        auto [a0, a1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(a + i));
        auto [b0, b1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(b + i));
        at::vec::convert_from_float<scalar_t>(relu_keep_nan(a0 + b0), relu_keep_nan(a1 + b1))
            .store(out + i);
      }
    }
    for (; i < end; ++i) {
      out[i] = static_cast<scalar_t>(
          relu_keep_nan(static_cast<float>(a[i]) + static_cast<float>(b[i])));
    }
  });
}

// out[i] = relu(a[i]), in fp32.
template <typename scalar_t>
void relu_flat(const scalar_t* a, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (; i + Vec::size() <= end; i += Vec::size()) relu_keep_nan(Vec::loadu(a + i)).store(out + i);
    } else {
      for (; i + Vec::size() <= end; i += Vec::size()) {
        auto [a0, a1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(a + i));
        at::vec::convert_from_float<scalar_t>(relu_keep_nan(a0), relu_keep_nan(a1)).store(out + i);
      }
    }
    for (; i < end; ++i) out[i] = static_cast<scalar_t>(relu_keep_nan(static_cast<float>(a[i])));
  });
}

}  // namespace cpu
}  // namespace deeparch
