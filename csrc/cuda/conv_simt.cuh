// Generic implicit-GEMM convolution on the CUDA cores: any dtype (fp32 / fp16 / bf16 in, exact
// fp32 FMA accumulate), any C and K, any pointer alignment. The correct-everywhere path: fp32
// inputs, C or K not a multiple of 8 (C = 3 first layers), unaligned views.
//
// Block: 64 (pixels) x 64 (output channels), 256 threads, each a 4 x 4 register tile at rows
// ty + 16*i, columns tx + 16*j (tx = tid % 16, ty = tid / 16: 16 consecutive output channels per
// half-warp, so stores are coalesced in channels_last). Reduction flattened over RSC = R*S*C in
// slices of 16, staged through shared memory as fp32; the next slice's global loads are issued
// before the current slice's FMAs (register prefetch).
//
// Loads: thread tid always loads reduction column lk = tid % 16 of a slice (256 % 16 == 0), rows
// lr + 16*i (lr = tid / 16), so it decodes ONE (r, s, c) per slice; the per-row (n, hi0, wi0) are
// decoded once per block. Shared tiles are [16][64 + 2] floats: the store pattern
// (lk*66 + row) hits 32 distinct banks, the compute reads are broadcasts or 16 consecutive words.
#pragma once

#include <cstdint>

#include "conv_common.cuh"

namespace deeparch {
namespace conv {

struct SimtTile {
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
};

template <typename T>
__global__ void __launch_bounds__(SimtTile::THREADS)
    conv_simt_kernel(const T* __restrict__ x, const T* __restrict__ w, const ConvShape s,
                     const Epilogue<T> epi, const int tiles_n) {
  constexpr int BM = SimtTile::BM, BN = SimtTile::BN, BK = SimtTile::BK;
  __shared__ float As[BK][BM + 2];
  __shared__ float Bs[BK][BN + 2];

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;  // compute: columns tx + 16j, rows ty + 16i
  const int lk = tid & 15, lr = tid >> 4;  // load: reduction column lk, rows lr + 16i
  const int n0 = static_cast<int>(blockIdx.x % tiles_n) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / tiles_n) * BM;

  int64_t a_off[4];  // x offset of (n, hi0, wi0, 0)
  int a_h[4], a_w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + lr + 16 * i;
    if (m < s.M) {
      int n, ho, wo;
      decode_pixel(s, m, n, ho, wo);
      a_h[i] = ho * s.sh - s.ph;
      a_w[i] = wo * s.sw - s.pw;
      a_off[i] = ((static_cast<int64_t>(n) * s.H + a_h[i]) * s.W + a_w[i]) * s.C;
    } else {
      a_h[i] = -s.R;  // hi = a_h + r < 0 for every tap
      a_w[i] = 0;
      a_off[i] = 0;
    }
  }
  const int rsc = s.R * s.S * s.C;  // < 2^31 (host check)
  int64_t b_off[4];
  bool b_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = n0 + lr + 16 * i;
    b_ok[i] = k < s.K;
    b_off[i] = b_ok[i] ? static_cast<int64_t>(k) * rsc : 0;
  }

  float ra[4], rb[4];
  auto load = [&](int k0) {
    const int kg = k0 + lk;
    const bool k_ok = kg < rsc;
    int r = 0, sx = 0, c = 0;
    if (k_ok) {
      const int rs = kg / s.C;
      c = kg - rs * s.C;
      r = rs / s.S;
      sx = rs - r * s.S;
    }
    const int64_t a_delta = (static_cast<int64_t>(r) * s.W + sx) * s.C + c;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int hi = a_h[i] + r, wi = a_w[i] + sx;
      const bool ok = k_ok && static_cast<unsigned>(hi) < static_cast<unsigned>(s.H) &&
                      static_cast<unsigned>(wi) < static_cast<unsigned>(s.W);
      ra[i] = ok ? static_cast<float>(x[a_off[i] + a_delta]) : 0.f;
      rb[i] = (k_ok && b_ok[i]) ? static_cast<float>(w[b_off[i] + kg]) : 0.f;
    }
  };

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  const int kt_count = (rsc + BK - 1) / BK;
  if (kt_count > 0) load(0);
  for (int kt = 0; kt < kt_count; ++kt) {
    __syncthreads();  // everyone finished reading the previous slice
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      As[lk][lr + 16 * i] = ra[i];
      Bs[lk][lr + 16 * i] = rb[i];
    }
    __syncthreads();
    if (kt + 1 < kt_count) load((kt + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = n0 + tx + 16 * j;
      if (m < s.M && k < s.K) {
        const float v[1] = {acc[i][j]};
        epi.template store<1>(m, k, v);
      }
    }
  }
}

}  // namespace conv
}  // namespace deeparch
