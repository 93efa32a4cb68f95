// Pieces shared by every fused_conv2d CUDA kernel: the problem description (ConvShape), the
// output-pixel decode, and THE fused epilogue (Epilogue<T>::store), written once and used by the
// tensor-core kernel (conv_tc.cuh) and the generic SIMT kernel (conv_simt.cuh) alike.
//
// Layouts (all channels_last, element offsets in int64_t):
//   x        (N, H, W, C)      x[((n*H + h)*W + w)*C + c]
//   weight   (K, R, S, C)      w[k*R*S*C + (r*S + s)*C + c]      (channels_last weight)
//   y, res   (N, Ho, Wo, K)    y[m*K + k],  m = (n*Ho + ho)*Wo + wo   (a row-major M x K matrix)
#pragma once

#include <cstdint>
#include <climits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "relu.cuh"

namespace deeparch {
namespace conv {

// One convolution, as the kernels see it. Every single dimension fits in int (the host checks,
// together with H + 2*ph, W + 2*pw and R*S*C); products that can pass 2^31 are formed in int64_t.
struct ConvShape {
  int N, H, W, C;   // input
  int K, R, S;      // weight
  int Ho, Wo;       // output spatial size
  int sh, sw;       // stride
  int ph, pw;       // padding
  int64_t M;        // N * Ho * Wo: GEMM rows (output pixels)
};

// Output pixel m -> (n, ho, wo). 32-bit division when M fits (the usual case; the branch is
// uniform across the grid), 64-bit otherwise.
__device__ __forceinline__ void decode_pixel(const ConvShape& s, int64_t m, int& n, int& ho,
                                             int& wo) {
  if (s.M <= INT_MAX) {
    const int hw = s.Ho * s.Wo;  // <= M <= INT_MAX
    const int mm = static_cast<int>(m);
    n = mm / hw;
    const int p = mm - n * hw;
    ho = p / s.Wo;
    wo = p - ho * s.Wo;
  } else {
    const int64_t hw = static_cast<int64_t>(s.Ho) * s.Wo;
    n = static_cast<int>(m / hw);
    const int64_t p = m - static_cast<int64_t>(n) * hw;
    ho = static_cast<int>(p / s.Wo);
    wo = static_cast<int>(p - static_cast<int64_t>(ho) * s.Wo);
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// y[m, k..k+V) = relu?(acc + bias[k..] + residual[m, k..]), all arithmetic in fp32, one rounding
// to T at the end. V = 1 (any alignment) or V = 16/sizeof(T) (one 16-byte access per operand).
// For V > 1 the caller guarantees: k % V == 0, K % V == 0 and y 16-byte aligned; bias and
// residual are read with 16-byte loads only where bias_vec / res_vec say their base pointers are
// 16-byte aligned (they are views the caller did not allocate), element by element otherwise.
template <typename T>
struct Epilogue {
  T* __restrict__ y;
  const T* __restrict__ bias;      // (K,) or nullptr
  const T* __restrict__ residual;  // (M, K) or nullptr
  int K;
  bool relu;
  bool bias_vec;
  bool res_vec;

  template <int V>
  __device__ __forceinline__ void store(int64_t m, int k, const float (&acc)[V]) const {
    using P = Pack<T, V>;
    const int64_t off = m * K + k;
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = acc[j];
    if (bias != nullptr) {
      if (V > 1 && bias_vec) {
        const P b = *reinterpret_cast<const P*>(bias + k);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] += static_cast<float>(b.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] += static_cast<float>(bias[k + j]);
      }
    }
    if (residual != nullptr) {
      if (V > 1 && res_vec) {
        const P r = *reinterpret_cast<const P*>(residual + off);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] += static_cast<float>(r.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] += static_cast<float>(residual[off + j]);
      }
    }
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(relu ? relu_keep_nan(v[j]) : v[j]);
    *reinterpret_cast<P*>(y + off) = o;
  }
};

}  // namespace conv
}  // namespace deeparch
