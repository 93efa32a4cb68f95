// The AVX2/FMA pieces the CPU GEMM kernels share (winograd.cpp's products, gemm_conv.cpp's 1x1
// convolutions): 8-float vectors, the NaN-keeping ReLU, lane masks for channel tails, and the
// 6x16 register-blocked micro-kernel. Only where the build has AVX2 + FMA (DEEPARCH_WINOGRAD,
// common.h); the kernels that include it say so otherwise.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace deeparch {
namespace avx2 {

using V8 = __m256;
constexpr int MR = 6;   // GEMM rows per micro-kernel
constexpr int NR = 16;  // GEMM columns (output channels) per micro-kernel: two vectors

inline V8 add(V8 a, V8 b) { return _mm256_add_ps(a, b); }
inline V8 sub(V8 a, V8 b) { return _mm256_sub_ps(a, b); }
inline V8 splat(float v) { return _mm256_set1_ps(v); }
// a * b + c and c - a * b
inline V8 fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
inline V8 fnma(V8 a, V8 b, V8 c) { return _mm256_fnmadd_ps(a, b, c); }

// A mask of the first min(n, 8) lanes (for the channel tails).
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline V8 relu_keep_nan(V8 v) {
  const V8 zero = _mm256_setzero_ps();
  return _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));  // NaN < 0 is false
}

// sum_k a[r * lda + k] * b[k * 16 : k * 16 + 16] for r < R <= 6 (k < kc), handed to epi(r, lo,
// hi) (the row's columns 0-7 and 8-15): 2R accumulators, two vectors of b and one broadcast of a
// per row and k (R < 6: a GEMM's last rows, without computing padding rows). The loops unroll
// fully and the accumulators live in registers (checked in the object code: no spills) -- so
// they are locals here, never written through a reference or pointer, which made the compiler
// store them every iteration (measured: half the FMA rate).
//
// pf: the first pf.n 64-byte lines from pf.p are prefetched, one per k (k < pf.n), for the
// caller's next b panel (a panel read from memory otherwise stalls its first micro-kernel).
struct Prefetch {
  const float* p = nullptr;
  int64_t n = 0;
  bool l2 = false;
};

// The prefetch of a GEMM's next b panel (C lines; none when next is null) as shared out over the
// row blocks of the current one: block blk takes lines [blk share, (blk + 1) share), share =
// panel_share(C, rows). Into L1 for panels of up to kL1PanelChannels (8 KB), else into L2, where
// a 16-32 KB panel doesn't evict the panel in use from the 32 KB L1 (measured on Zen 4, U read
// from memory, against L1 for every width: Winograd 256@14x14 1.2-1.35x and 512@7x7 1.1x
// faster; L2 for every width made the 64-128 channel layers 1.05-1.17x slower). (Plain
// functions of values: with an object holding them, GCC stopped giving the Winograd GEMM's loop
// a prefetch-free copy, 31 instructions a k instead of 25, seen in the object code.)
constexpr int64_t kL1PanelChannels = 128;

inline int64_t panel_share(int64_t C, int64_t rows) {
  const int64_t blocks = std::max<int64_t>(1, (rows + MR - 1) / MR);
  return (C + blocks - 1) / blocks;
}

inline Prefetch next_panel_block(const float* next, int64_t C, int64_t share, int64_t blk) {
  if (!next) return {};
  const int64_t lo = std::min(C, blk * share);
  return {next + lo * NR, std::min(C, lo + share) - lo, C > kL1PanelChannels};
}

template <int R, class Epi>
__attribute__((always_inline)) inline void micro_rx16(const float* a, int64_t lda, const float* b,
                                                      int64_t kc, Epi&& epi, Prefetch pf = {}) {
  static_assert(R >= 1 && R <= MR, "1 to 6 rows");
  V8 acc[R][2];
  const float* row[R];  // one pointer a row: each broadcast is then [row + 4k], no arithmetic
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    row[r] = a + r * lda;
  }
  for (int64_t k = 0; k < kc; ++k, b += NR) {
    if (k < pf.n) {
      const char* line = reinterpret_cast<const char*>(pf.p + k * NR);
      if (pf.l2) {
        _mm_prefetch(line, _MM_HINT_T1);
      } else {
        _mm_prefetch(line, _MM_HINT_T0);
      }
    }
    const V8 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const V8 t = _mm256_broadcast_ss(row[r] + k);
      acc[r][0] = fma(t, b0, acc[r][0]);
      acc[r][1] = fma(t, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) epi(r, acc[r][0], acc[r][1]);
}

template <class Epi>
__attribute__((always_inline)) inline void micro_6x16(const float* a, int64_t lda, const float* b,
                                                      int64_t kc, Epi&& epi, Prefetch pf = {}) {
  micro_rx16<MR>(a, lda, b, kc, static_cast<Epi&&>(epi), pf);
}

// micro_rx16 for rows = 1..6 rows (a GEMM's last rows).
template <class Epi>
inline void micro_tail(int64_t rows, const float* a, int64_t lda, const float* b, int64_t kc,
                       Epi&& epi, Prefetch pf = {}) {
  switch (rows) {
    case 1: micro_rx16<1>(a, lda, b, kc, epi, pf); break;
    case 2: micro_rx16<2>(a, lda, b, kc, epi, pf); break;
    case 3: micro_rx16<3>(a, lda, b, kc, epi, pf); break;
    case 4: micro_rx16<4>(a, lda, b, kc, epi, pf); break;
    case 5: micro_rx16<5>(a, lda, b, kc, epi, pf); break;
    default: micro_rx16<6>(a, lda, b, kc, epi, pf); break;
  }
}

}  // namespace avx2
}  // namespace deeparch
