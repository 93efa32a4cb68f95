// Tensor-core implicit-GEMM convolution (fp16 / bf16 in, fp32 accumulate), sm_80 and sm_90.
//
// GEMM view: out[M, K] = A[M, RSC] * B[K, RSC]^T with M = N*Ho*Wo output pixels, A the im2col of
// x gathered on the fly, B the channels_last weight (K, R, S, C) read as is.
//
// Reduction order: k-tile t walks (r, s, c-block) with c fastest; a k-tile is BK = 32 channels
// of ONE filter tap (r, s). Each 16-byte chunk (8 channels) of a row therefore comes from one
// contiguous 16-byte piece of x or w (C % 8 == 0 and 16-byte aligned bases are required by the
// host), and is either all inside or all outside the image / channel range: cp.async with
// src_size 16 or 0 (zero fill) covers padding, the c >= C tail of the last c-block and rows
// m >= M (weight rows k >= K are clamped to K-1 instead: their output columns are discarded).
// Wasted MMA work only when C % 32 != 0.
//
// Block: BM x BN output tile, WARPS_M x WARPS_N warps, each warp a WM x WN = (MI*16) x (NI*8)
// patch of m16n8k16 MMAs. STAGES-deep cp.async ring in dynamic shared memory: stage = A tile
// (BM rows x 64 B) + B tile (BN rows x 64 B).
//
// Shared-memory swizzle: row `row`, 16-byte chunk `c` (0..3) of a 64-byte row lives at
//   row * 64 + ((c ^ ((row >> 1) & 3)) << 4).
// Eight consecutive rows at the same logical chunk then hit eight different 16-byte bank groups
// (row & 1 picks the 64-byte half of a 128-byte line, (row >> 1) & 3 permutes the chunk), so each
// 8-address phase of ldmatrix and of the cp.async stores is conflict-free.
//
// Pipeline (one __syncthreads per k-tile):
//   prologue: load tiles 0 .. STAGES-2, one commit group each (empty groups past the end).
//   iteration kt: wait_group(STAGES-2)  -> this thread's copies of tile kt have landed
//                 __syncthreads         -> everyone's have; everyone finished computing tile kt-1
//                 load tile kt+STAGES-1 into the stage tile kt-1 used; commit (maybe empty)
//                 ldmatrix + mma on tile kt's stage.
//   Committed groups before the wait at iteration kt: (STAGES-1) + kt; at most STAGES-2 pending
//   means groups 0..kt are complete, and group j holds tile j.
//
// Epilogue: after wait_group(0) + __syncthreads the ring is free; each warp stages its
// accumulators 16 rows at a time (fp32, row stride WN+8 floats: conflict-free float2 writes,
// float4 reads ordered by row parity so the 8 lanes of each phase hit distinct bank groups),
// then every lane owns 8 consecutive output channels of one pixel and calls Epilogue::store<8>:
// 16-byte residual load, 16-byte bias load, 16-byte store; 4 lanes cover a 64-byte row segment.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include "conv_common.cuh"
#include "conv_ptx.cuh"

namespace deeparch {
namespace conv {

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct TcTile {
  static constexpr int BM = BM_, BN = BN_, BK = 32;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int ROW_BYTES = BK * 2;             // one smem row: 4 chunks of 16 bytes
  static constexpr int CHUNKS = BK / 8;                // 16-byte chunks per row
  static constexpr int ROWS_PER_PASS = THREADS / CHUNKS;
  static constexpr int A_LOADS = BM / ROWS_PER_PASS;   // cp.async per thread per k-tile, A
  static constexpr int B_LOADS = BN / ROWS_PER_PASS;   // ... and B
  static constexpr int A_STAGE = BM * ROW_BYTES, B_STAGE = BN * ROW_BYTES;
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE);
  static constexpr int EPI_LD = WN + 8;                // floats per staged accumulator row
  static constexpr int EPI_GROUPS = WN / 8;            // 8-channel groups per staged row
  static constexpr int EPI_ITEMS = 16 * EPI_GROUPS / 32;  // (row, group) items per lane

  static_assert(BK == 32 && CHUNKS == 4, "swizzle assumes 64-byte rows");
  static_assert(BM % ROWS_PER_PASS == 0 && BN % ROWS_PER_PASS == 0, "loader passes");
  static_assert(ROWS_PER_PASS % 8 == 0, "row passes must keep the swizzle phase");
  static_assert(WM % 16 == 0 && NI % 2 == 0, "warp tile shape");
  static_assert(WN == 32, "epilogue bank mapping assumes 32-column warp tiles");
  static_assert(STAGES >= 2, "pipeline depth");
  static_assert((THREADS / 32) * 16 * EPI_LD * 4 <= SMEM_BYTES, "epilogue staging fits the ring");
};

// 128x128x32, 8 warps (2 x 4, warp tile 64x32), 4 stages = 64 KB, 2 blocks/SM.
using TcTileLarge = TcTile<128, 128, 2, 4, 4, 2>;
// 64x64x32, 4 warps (2 x 2, warp tile 32x32), 4 stages = 32 KB: small M or K <= 64.
using TcTileSmall = TcTile<64, 64, 2, 2, 4, 4>;

__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// One block computes the BM x BN output tile number blockIdx.x (N-tiles fastest, so the blocks
// that run together share their A rows in L2). T: at::Half or at::BFloat16.
//
// Split-K (gridDim.y > 1, `partial` != nullptr): block y reduces only its contiguous slice of the
// k-tiles and writes the fp32 tile to partial[(y*M + m)*K + k] (no epilogue); splitk_epilogue
// then sums the gridDim.y slices in order and applies Epilogue::store. A slice may be empty
// (it then writes zeros).
template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::THREADS, Tile::MIN_BLOCKS)
    conv_tc_kernel(const T* __restrict__ x, const T* __restrict__ w, const ConvShape s,
                   const Epilogue<T> epi, const int tiles_n, float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, STAGES = Tile::STAGES;
  constexpr int WM = Tile::WM, WN = Tile::WN, MI = Tile::MI, NI = Tile::NI;
  constexpr int ROW_BYTES = Tile::ROW_BYTES, RPP = Tile::ROWS_PER_PASS;
  constexpr bool kBf16 = std::is_same<T, c10::BFloat16>::value;
  static_assert(sizeof(T) == 2, "tensor-core path takes 16-bit types");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sA = ptx::smem_addr(smem);
  const uint32_t sB = sA + STAGES * Tile::A_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Tile::WARPS_N, warp_n = warp % Tile::WARPS_N;
  const int n0 = static_cast<int>(blockIdx.x % tiles_n) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / tiles_n) * BM;

  // ---- Loader state: this thread copies chunk ld_chunk of rows ld_row + i*RPP of A and of B.
  const int ld_chunk = tid % Tile::CHUNKS;
  const int ld_row = tid / Tile::CHUNKS;
  const uint32_t st_off = swizzled(ld_row, ld_chunk);  // + i*RPP*64: RPP % 8 == 0 keeps it valid
  int64_t a_off[Tile::A_LOADS];  // x offset of (n, hi0, wi0, ld_chunk*8); hi0 + r etc. per tap
  int a_h[Tile::A_LOADS], a_w[Tile::A_LOADS];
#pragma unroll
  for (int i = 0; i < Tile::A_LOADS; ++i) {
    const int64_t m = m0 + ld_row + i * RPP;
    if (m < s.M) {
      int n, ho, wo;
      decode_pixel(s, m, n, ho, wo);
      a_h[i] = ho * s.sh - s.ph;
      a_w[i] = wo * s.sw - s.pw;
      a_off[i] = ((static_cast<int64_t>(n) * s.H + a_h[i]) * s.W + a_w[i]) * s.C + ld_chunk * 8;
    } else {
      a_h[i] = -s.R;  // hi = a_h + r < 0 for every tap: always zero-filled
      a_w[i] = 0;
      a_off[i] = 0;
    }
  }
  const int64_t rsc = static_cast<int64_t>(s.R) * s.S * s.C;
  // Weight rows k >= K are clamped to row K-1 rather than zero-filled: they only feed output
  // columns that are never stored (column k of the tile depends on B row k alone).
  int64_t b_off[Tile::B_LOADS];
#pragma unroll
  for (int i = 0; i < Tile::B_LOADS; ++i) {
    const int k = min(n0 + ld_row + i * RPP, s.K - 1);
    b_off[i] = k * rsc + ld_chunk * 8;
  }

  // k-tile cursor of the next tile to load: c fastest, then s, then r. Besides (r, s, c0) it
  // carries the tile's offsets into x and w, updated by + BK within a tap and recomputed (the
  // only 64-bit multiplies of the main loop) when the tap changes.
  struct Cursor {
    int r, s, c0;
    int64_t x_delta;  // (r*W + s)*C + c0: offset of this tap/c-block relative to (n, hi0, wi0)
    int64_t w_delta;  // (r*S + s)*C + c0: offset within a weight row
  };
  // This block's k-tiles: all of them, or its slice [kt_lo, kt_lo + kt_count) under split-K.
  const int c_blocks = (s.C + BK - 1) / BK;
  const int kt_total = s.R * s.S * c_blocks;
  const int kt_per = (kt_total + static_cast<int>(gridDim.y) - 1) / static_cast<int>(gridDim.y);
  const int kt_lo = min(kt_total, static_cast<int>(blockIdx.y) * kt_per);
  const int kt_count = min(kt_total - kt_lo, kt_per);
  Cursor cur;
  {
    const int tap = kt_lo / c_blocks;
    cur.r = tap / s.S;
    cur.s = tap - cur.r * s.S;
    cur.c0 = (kt_lo - tap * c_blocks) * BK;
    cur.x_delta = (static_cast<int64_t>(cur.r) * s.W + cur.s) * s.C + cur.c0;
    cur.w_delta = (static_cast<int64_t>(cur.r) * s.S + cur.s) * s.C + cur.c0;
  }
  auto advance = [&]() {
    cur.c0 += BK;
    if (cur.c0 < s.C) {
      cur.x_delta += BK;
      cur.w_delta += BK;
      return;
    }
    cur.c0 = 0;
    if (++cur.s == s.S) {
      cur.s = 0;
      ++cur.r;
    }
    cur.x_delta = (static_cast<int64_t>(cur.r) * s.W + cur.s) * s.C;
    cur.w_delta = (static_cast<int64_t>(cur.r) * s.S + cur.s) * s.C;
  };

  // Copies the cursor's k-tile into ring stage `stage`; zero-fills what lies outside.
  auto load_tile = [&](int stage) {
    const bool c_ok = cur.c0 + ld_chunk * 8 < s.C;
    const uint32_t a_dst = sA + stage * Tile::A_STAGE + st_off;
#pragma unroll
    for (int i = 0; i < Tile::A_LOADS; ++i) {
      const int hi = a_h[i] + cur.r, wi = a_w[i] + cur.s;
      const bool ok = c_ok && static_cast<unsigned>(hi) < static_cast<unsigned>(s.H) &&
                      static_cast<unsigned>(wi) < static_cast<unsigned>(s.W);
      ptx::cp_async_16_zfill(a_dst + i * RPP * ROW_BYTES, ok ? x + (a_off[i] + cur.x_delta) : x,
                             ok);
    }
    const uint32_t b_dst = sB + stage * Tile::B_STAGE + st_off;
#pragma unroll
    for (int i = 0; i < Tile::B_LOADS; ++i) {
      ptx::cp_async_16_zfill(b_dst + i * RPP * ROW_BYTES, c_ok ? w + (b_off[i] + cur.w_delta) : w,
                             c_ok);
    }
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < kt_count) {
      load_tile(st);
      advance();
    }
    ptx::cp_async_commit();
  }

  // ---- ldmatrix addressing (see conv_ptx.cuh). A, lane l: row (l & 15), chunk 2*ks + (l >> 4).
  // B, lane l: n-row (l & 7) + 8*(l >> 4), chunk 2*ks + ((l >> 3) & 1). All added row offsets
  // are multiples of 8, so the swizzle term (row >> 1) & 3 is (l >> 1) & 3 for both.
  const int swz = (lane >> 1) & 3;
  const uint32_t a_frag = (warp_m * WM + (lane & 15)) * ROW_BYTES;
  const uint32_t b_frag = (warp_n * WN + (lane & 7) + ((lane >> 4) << 3)) * ROW_BYTES;
  uint32_t a_col[BK / 16], b_col[BK / 16];
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    a_col[ks] = static_cast<uint32_t>(((2 * ks + (lane >> 4)) ^ swz) << 4);
    b_col[ks] = static_cast<uint32_t>(((2 * ks + ((lane >> 3) & 1)) ^ swz) << 4);
  }

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

  int rd = 0, wr = STAGES - 1;
  for (int kt = 0; kt < kt_count; ++kt) {
    ptx::cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < kt_count) {
      load_tile(wr);
      advance();
    }
    ptx::cp_async_commit();
    wr = (wr + 1 == STAGES) ? 0 : wr + 1;

    const uint32_t a_stage = sA + rd * Tile::A_STAGE + a_frag;
    const uint32_t b_stage = sB + rd * Tile::B_STAGE + b_frag;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        ptx::ldmatrix_x4(af[mi], a_stage + mi * 16 * ROW_BYTES + a_col[ks]);
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t t4[4];
        ptx::ldmatrix_x4(t4, b_stage + nj * 16 * ROW_BYTES + b_col[ks]);
        bf[2 * nj][0] = t4[0];
        bf[2 * nj][1] = t4[1];
        bf[2 * nj + 1][0] = t4[2];
        bf[2 * nj + 1][1] = t4[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          ptx::mma_16816<kBf16>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
    rd = (rd + 1 == STAGES) ? 0 : rd + 1;
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the ring is free: reuse it to stage accumulators

  // ---- Epilogue, 16 accumulator rows of this warp at a time.
  float* stage = reinterpret_cast<float*>(smem) + warp * (16 * Tile::EPI_LD);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      *reinterpret_cast<float2*>(stage + g * Tile::EPI_LD + ni * 8 + 2 * t) =
          make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(stage + (g + 8) * Tile::EPI_LD + ni * 8 + 2 * t) =
          make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < Tile::EPI_ITEMS; ++j) {
      const int item = lane + 32 * j;
      const int row = item / Tile::EPI_GROUPS, grp = item % Tile::EPI_GROUPS;
      const int h = row & 1;  // odd rows read their upper half first: distinct bank groups
      const float* src = stage + row * Tile::EPI_LD + grp * 8;
      const float4 p = *reinterpret_cast<const float4*>(src + 4 * h);
      const float4 q = *reinterpret_cast<const float4*>(src + 4 * (h ^ 1));
      const float4 lo = h ? q : p, hi = h ? p : q;
      const int64_t m = m0 + warp_m * WM + mi * 16 + row;
      const int k = n0 + warp_n * WN + grp * 8;
      if (m < s.M && k < s.K) {
        if (partial != nullptr) {  // split-K: the raw fp32 partial, two 16-byte stores
          float4* dst = reinterpret_cast<float4*>(
              partial + (static_cast<int64_t>(blockIdx.y) * s.M + m) * s.K + k);
          dst[0] = lo;
          dst[1] = hi;
        } else {
          const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
          epi.template store<8>(m, k, v);
        }
      }
    }
    __syncwarp();
  }
#elif defined(__CUDA_ARCH__)
  // Compiled for an arch without cp.async / ldmatrix / bf16 mma.sync (e.g. compute_75 PTX
  // JIT-ed on a newer GPU): fail loudly, never return an unwritten output. The host does not
  // take this path for such a binary (tc_binary_refusal in fused_conv2d.cu).
  __trap();
#endif
}

// Second pass of split-K: one thread per (m, 8 channels): y[m, k..k+8) = epilogue(sum over the
// `splits` slices of partial[(i*M + m)*K + k..]), summed in slice order (deterministic, no
// atomics). K % 8 == 0 and 16-byte aligned buffers, as for conv_tc_kernel.
template <typename T>
__global__ void splitk_epilogue(const float* __restrict__ partial, const int64_t M, const int K,
                                const int splits, const Epilogue<T> epi) {
  const int groups = K / 8;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= M * groups) return;
  const int64_t m = item / groups;
  const int k = static_cast<int>(item - m * groups) * 8;
  const int64_t slice = M * K;
  const float4* src = reinterpret_cast<const float4*>(partial + m * K + k);
  float4 a = src[0], b = src[1];
  for (int i = 1; i < splits; ++i) {
    src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(src) + slice);
    const float4 c = src[0], d = src[1];
    a.x += c.x; a.y += c.y; a.z += c.z; a.w += c.w;
    b.x += d.x; b.y += d.y; b.z += d.z; b.w += d.w;
  }
  const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  epi.template store<8>(m, k, v);
}

}  // namespace conv
}  // namespace deeparch
