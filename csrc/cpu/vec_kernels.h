// Flat elementwise CPU kernels shared by add_relu.cpp and fused_conv2d.cpp: vectorised with
// at::vec (fp16/bf16 widened to fp32 for the add; a ReLU alone works on their bits), split
// across threads with at::parallel_for. The ReLU keeps NaN (v < 0 ? 0 : v), exactly as
// torch.relu does. `out` may alias an input.
#pragma once
#include <cstdint>
#include <type_traits>

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

// Each kernel is a function over one range, called from at::parallel_for's lambda with the
// range's pointers as arguments: pointers read from the lambda's captures are reloaded after
// every store through `out` (which may alias them), which halved the bandwidth (measured).

template <typename scalar_t>
void add_relu_range(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      relu_keep_nan(Vec::loadu(a + i) + Vec::loadu(b + i)).store(out + i);
    }
  } else {
    // Reduced precision: widen one vector of scalar_t into two float vectors.
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [a0, a1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(a + i));
      auto [b0, b1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(b + i));
      at::vec::convert_from_float<scalar_t>(relu_keep_nan(a0 + b0), relu_keep_nan(a1 + b1))
          .store(out + i);
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>(relu_keep_nan(static_cast<float>(a[i]) + static_cast<float>(b[i])));
  }
}

template <typename scalar_t>
void add_relu_flat(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    add_relu_range(a + begin, b + begin, out + begin, end - begin);
  });
}

// A 16-bit float (bf16, fp16) read as int16 is a negative number or -inf exactly when it lies in
// (INT16_MIN, its -inf]: above are the NaNs with the sign bit, INT16_MIN is -0. Zeroing those
// is torch.relu on every other value (NaN, -0, +inf and positives pass unchanged), with no
// round trip through fp32 (torch's bf16 relu_ is 3-4x slower here: at::vec's AVX2 conversions).
template <typename scalar_t>
constexpr int16_t neg_inf_bits() {
  static_assert(std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>);
  return std::is_same_v<scalar_t, at::BFloat16> ? int16_t(-128) : int16_t(-1024);  // 0xff80, 0xfc00
}

template <typename scalar_t>
void relu_range(const scalar_t* a, scalar_t* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + fVec::size() <= n; i += fVec::size()) relu_keep_nan(fVec::loadu(a + i)).store(out + i);
    for (; i < n; ++i) out[i] = relu_keep_nan(a[i]);
  } else {
    using IVec = at::vec::Vectorized<int16_t>;
    constexpr int16_t neg_inf = neg_inf_bits<scalar_t>();
    const auto* ia = reinterpret_cast<const int16_t*>(a);
    auto* io = reinterpret_cast<int16_t*>(out);
    const IVec lo(INT16_MIN), hi(neg_inf + 1), zero(0);
    for (; i + IVec::size() <= n; i += IVec::size()) {
      const IVec t = IVec::loadu(ia + i);
      IVec::blendv(t, zero, (t > lo) & (t < hi)).store(io + i);
    }
    for (; i < n; ++i) io[i] = (ia[i] > INT16_MIN && ia[i] <= neg_inf) ? int16_t(0) : ia[i];
  }
}

// out[i] = relu(a[i]): fp32 compares, fp16/bf16 on their bits (above).
template <typename scalar_t>
void relu_flat(const scalar_t* a, scalar_t* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    relu_range(a + begin, out + begin, end - begin);
  });
}

}  // namespace cpu
}  // namespace deeparch
