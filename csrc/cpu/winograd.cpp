// Winograd F(m x m, 3x3) convolution on the CPU (fp32, channels_last, stride 1, padding 1),
// m = 4 (6x6 input tiles: 36 products per 16 outputs and channel, 4x fewer than a direct
// convolution's 144) or m = 2 (4x4 tiles: 16 per 4, 2.25x fewer). Lavin & Gray, "Fast Algorithms
// for Convolutional Neural Networks" (2016).
//
//   U = G g G^T   per (input, output) channel pair, once per weight, in Python (float64), packed
//                 as (A*A, K/16, C, 16): the GEMM's B panels (ops/conv_winograd.py)
//   V = B^T d B   per input tile and channel, 8 channels to a vector (channels_last: contiguous)
//   M = V U       A*A GEMMs (tiles x C) @ (C x K): a 6x16 register-blocked FMA micro-kernel
//                 (a smaller one for the last rows), each 16-channel panel of U prefetched
//                 while the one before it runs (avx2_gemm.h Prefetch): at batch 1 (few tiles)
//                 U comes from memory and outweighs the products (measured with U read from
//                 memory, batch 1, against neither, medians of alternating processes in two
//                 steps: 128@28x28 1.3x, 256@14x14 1.5x, 512@7x7 1.55x; 512@7x7 now beats oneDNN)
//   Y = A^T M A   per tile, + bias, + residual, ReLU (NaN kept), written to the output
//
// Tiles go in chunks sized so that a chunk's V and M stay in cache: for narrow layers with many
// tiles each thread takes chunks of its own through all three phases (its core's L2), else each
// phase of a chunk is one at::parallel_for over the threads. The input transform also takes max|x| and looks for NaN (over each tile's
// own m x m pixels: the tiles' input windows overlap, those partition x): the op returns
// ok = false (and the caller runs the direct convolution) unless x is finite and
// max|x| * bound < 1e30 (bound: the largest L1 norm of a filter), where neither order of
// summation can overflow (Winograd's intermediates are at most ~4e3 times the direct ones), so
// that NaN and Inf come out as torch gives them.
//
// AVX2 + FMA (the build's at::vec ISA, setup.py): without it the op says so and isn't used.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"

#if DEEPARCH_WINOGRAD
#include "avx2_gemm.h"
#endif

namespace deeparch {

namespace {

#if DEEPARCH_WINOGRAD

using namespace avx2;

// One dimension of B^T d (input transform) and of A^T m (output transform).
template <int M>
struct Tf;

// F(4x4, 3x3) on the points 0, +-3/2, +-2/3 and infinity, not the usual 0, +-1, +-2: with
// them the fp32 result is ~4x closer to the exact one (measured: 3.9e-6 against 1.7e-5 of
// max|y| at 512 channels; the direct convolution's is ~2e-6). B^T and A^T below, G in Python.
template <>
struct Tf<4> {
  static constexpr int A = 6;
  static void in(const V8* d, V8* o) {
    const V8 k97_36 = splat(97.f / 36.f), k4_9 = splat(4.f / 9.f), k9_4 = splat(2.25f);
    const V8 k2_3 = splat(2.f / 3.f), k3_2 = splat(1.5f);
    const V8 e1 = fnma(k4_9, d[2], d[4]), o1 = fnma(k3_2, d[3], _mm256_mul_ps(k2_3, d[1]));
    const V8 e3 = fnma(k9_4, d[2], d[4]), o3 = fnma(k2_3, d[3], _mm256_mul_ps(k3_2, d[1]));
    o[0] = add(fnma(k97_36, d[2], d[0]), d[4]);  // d0 - 97/36 d2 + d4
    o[1] = sub(e1, o1);                           // -2/3 d1 - 4/9 d2 + 3/2 d3 + d4
    o[2] = add(e1, o1);                           //  2/3 d1 - 4/9 d2 - 3/2 d3 + d4
    o[3] = sub(e3, o3);                           // -3/2 d1 - 9/4 d2 + 2/3 d3 + d4
    o[4] = add(e3, o3);                           //  3/2 d1 - 9/4 d2 - 2/3 d3 + d4
    o[5] = add(fnma(k97_36, d[3], d[1]), d[5]);  // d1 - 97/36 d3 + d5
  }
  static void out(const V8* m, V8* o) {
    const V8 s12 = add(m[1], m[2]), d12 = sub(m[1], m[2]);
    const V8 s34 = add(m[3], m[4]), d34 = sub(m[3], m[4]);
    o[0] = add(add(m[0], s12), s34);                                                 // 1 1 1 1 1 0
    o[1] = fma(splat(1.5f), d12, _mm256_mul_ps(splat(2.f / 3.f), d34));              // 0 p -p q -q 0
    o[2] = fma(splat(2.25f), s12, _mm256_mul_ps(splat(4.f / 9.f), s34));             // p^2, q^2
    o[3] = add(fma(splat(3.375f), d12, _mm256_mul_ps(splat(8.f / 27.f), d34)), m[5]);  // p^3, q^3, 1
  }
};

template <>
struct Tf<2> {
  static constexpr int A = 4;
  static void in(const V8* d, V8* o) {
    o[0] = sub(d[0], d[2]);
    o[1] = add(d[1], d[2]);
    o[2] = sub(d[2], d[1]);
    o[3] = sub(d[1], d[3]);
  }
  static void out(const V8* m, V8* o) {
    o[0] = add(add(m[0], m[1]), m[2]);
    o[1] = sub(sub(m[1], m[2]), m[3]);
  }
};

// Bytes of V and M per chunk of tiles: about what stays in this machine class's L2 + L3 share,
// and per thread when each thread takes chunks of its own (its core's L2).
constexpr int64_t kChunkBytes = 4 << 20;
constexpr int64_t kOwnChunkBytes = 1 << 20;
constexpr int64_t kMinOwnRows = 48;  // fewer rows than this reuse u too little: share chunks

// The layer's shape: N images of C x H x W in, K channels out, Th x Tw tiles each; V's rows are
// C rounded up to 8 (zero lanes past C), M's K rounded up to 16 (u's packing).
struct Shape {
  int64_t C, H, W, K, Th, Tw, Cp, Kp;
};

// The three phases are functions of their arguments, called from at::parallel_for's lambdas:
// every vector store may alias memory (the intrinsics' types are may_alias), so pointers and
// sizes read from a lambda's captures would be reloaded after each one.

// V = B^T d B for tiles [t0 + tb, t0 + te) (rows tb..te of the chunk's V: (A2, chunk, Cp), row
// stride ldv per alpha). Returns false when x there is not finite or max|x| * bound >= 1e30.
template <int M>
bool input_tiles(const float* x, float* V, int64_t ldv, const Shape s, int64_t t0, int64_t tb,
                 int64_t te, double bound) {
  constexpr int A = Tf<M>::A;
  const int64_t C = s.C, H = s.H, W = s.W, Th = s.Th, Tw = s.Tw, Cp = s.Cp;
  const V8 sign = splat(-0.f);
  V8 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
  int64_t off[A][A];
  for (int64_t tt = tb; tt < te; ++tt) {
    const int64_t t = t0 + tt, n = t / (Th * Tw), th = (t / Tw) % Th, tw = t % Tw;
    const int64_t h0 = th * M - 1, w0 = tw * M - 1;
    for (int i = 0; i < A; ++i) {
      for (int j = 0; j < A; ++j) {
        const int64_t h = h0 + i, w = w0 + j;
        off[i][j] = (h >= 0 && h < H && w >= 0 && w < W) ? ((n * H + h) * W + w) * C : -1;
      }
    }
    for (int64_t c = 0; c < C; c += 8) {
      const bool full = c + 8 <= C;
      const __m256i cm = lanes_below(C - c);
      V8 d[A][A], tcol[A][A];
      for (int i = 0; i < A; ++i) {
        for (int j = 0; j < A; ++j) {
          const int64_t o = off[i][j];
          const V8 v = o < 0  ? _mm256_setzero_ps()
                       : full ? _mm256_loadu_ps(x + o + c)
                              : _mm256_maskload_ps(x + o + c, cm);
          if (i >= 1 && i <= M && j >= 1 && j <= M) {  // the tile's own MxM: each x once
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          }
          d[j][i] = v;  // column j, row i
        }
      }
      for (int j = 0; j < A; ++j) Tf<M>::in(d[j], tcol[j]);  // tcol[j][a] = (B^T d)[a][j]
      for (int a = 0; a < A; ++a) {
        V8 row[A], o[A];
        for (int j = 0; j < A; ++j) row[j] = tcol[j][a];
        Tf<M>::in(row, o);  // o[b] = (B^T d B)[a][b]
        for (int b = 0; b < A; ++b) _mm256_storeu_ps(V + (a * A + b) * ldv + tt * Cp + c, o[b]);
      }
    }
  }
  float m[8];
  _mm256_storeu_ps(m, vmax);
  float mx = 0.f;
  for (float v : m) mx = std::max(mx, v);
  return _mm256_movemask_ps(vnan) == 0 && double(mx) * bound < 1e30;
}

// M = V U for tasks [b, e): task = (alpha, 16 output channels), over the chunk's nt rows (the
// last block of fewer than 6 rows by a micro-kernel of its size: no padding rows computed).
inline void gemm_tasks(const float* V, int64_t ldv, const float* u, float* Mb, int64_t ldm,
                       int64_t C, int64_t Cp, int64_t KB, int64_t Kp, int64_t nt, int64_t b,
                       int64_t e) {
  const int64_t share = panel_share(C, nt);
  for (int64_t task = b; task < e; ++task) {
    const int64_t a = task / KB, kb = task % KB;
    const float* ub = u + (a * KB + kb) * C * NR;
    // The next task's panel (C lines) is prefetched over this task's row blocks, a share each.
    const float* next = task + 1 < e ? ub + C * NR : nullptr;
    for (int64_t r = 0, blk = 0; r < nt; r += MR, ++blk) {
      float* c = Mb + a * ldm + r * Kp + kb * NR;
      auto store = [c, Kp](int i, V8 lo, V8 hi) {
        _mm256_storeu_ps(c + i * Kp, lo);
        _mm256_storeu_ps(c + i * Kp + 8, hi);
      };
      const Prefetch pf = next_panel_block(next, C, share, blk);
      if (r + MR <= nt) {
        micro_6x16(V + a * ldv + r * Cp, Cp, ub, C, store, pf);
      } else {
        micro_tail(nt - r, V + a * ldv + r * Cp, Cp, ub, C, store, pf);
      }
    }
  }
}

// Y = A^T M A + bias (+ residual), ReLU, for tiles [t0 + tb, t0 + te).
template <int M>
void output_tiles(const float* Mb, int64_t ldm, const float* bias, const float* res, float* y,
                  const Shape s, bool relu, int64_t t0, int64_t tb, int64_t te) {
  constexpr int A = Tf<M>::A;
  const int64_t H = s.H, W = s.W, K = s.K, Th = s.Th, Tw = s.Tw, Kp = s.Kp;
  for (int64_t tt = tb; tt < te; ++tt) {
    const int64_t t = t0 + tt, n = t / (Th * Tw), th = (t / Tw) % Th, tw = t % Tw;
    const int mh = int(std::min<int64_t>(M, H - th * M)), mw = int(std::min<int64_t>(M, W - tw * M));
    for (int64_t k = 0; k < K; k += 8) {
      const bool full = k + 8 <= K;
      const __m256i km = lanes_below(K - k);
      V8 mcol[A][A], sm[M][A];
      for (int a = 0; a < A; ++a) {
        for (int b = 0; b < A; ++b) mcol[b][a] = _mm256_loadu_ps(Mb + (a * A + b) * ldm + tt * Kp + k);
      }
      for (int b = 0; b < A; ++b) {
        V8 o[M];
        Tf<M>::out(mcol[b], o);  // o[i] = (A^T M)[i][b]
        for (int i = 0; i < M; ++i) sm[i][b] = o[i];
      }
      const V8 bv = !bias ? _mm256_setzero_ps()
                    : full ? _mm256_loadu_ps(bias + k) : _mm256_maskload_ps(bias + k, km);
      for (int i = 0; i < mh; ++i) {
        V8 o[M];
        Tf<M>::out(sm[i], o);  // o[j] = (A^T M A)[i][j]
        const int64_t row = ((n * H + th * M + i) * W + tw * M) * K + k;
        for (int j = 0; j < mw; ++j) {
          V8 v = bias ? add(o[j], bv) : o[j];
          if (res) {
            const float* p = res + row + j * K;
            v = add(v, full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, km));
          }
          if (relu) v = relu_keep_nan(v);
          if (full) {
            _mm256_storeu_ps(y + row + j * K, v);
          } else {
            _mm256_maskstore_ps(y + row + j * K, km, v);
          }
        }
      }
    }
  }
}

template <int M>
bool winograd_run(const float* x, const float* u, const float* bias, const float* res, float* y,
                  int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, bool relu, double bound) {
  constexpr int A = Tf<M>::A, A2 = A * A;
  const int64_t Th = (H + M - 1) / M, Tw = (W + M - 1) / M, T = N * Th * Tw;
  const int64_t Cp = (C + 7) / 8 * 8, KB = (K + NR - 1) / NR, Kp = KB * NR;
  const Shape shape{C, H, W, K, Th, Tw, Cp, Kp};
  const int64_t tile_bytes = A2 * (Cp + Kp) * int64_t(sizeof(float));
  const int64_t rows = (T + MR - 1) / MR * MR;
  const int64_t nth = at::get_num_threads();
  // Two ways to split the work between threads. Own chunks: each thread runs all three phases on
  // chunks of its own, which stay in its core's cache, when such chunks still reuse u over
  // enough rows (64-128 channels) and there are tiles for every thread. Shared chunks: each
  // phase of a chunk split between the threads (few tiles, or wide layers).
  const int64_t own = kOwnChunkBytes / tile_bytes / MR * MR;
  const bool own_chunks = nth > 1 && own >= kMinOwnRows && rows >= nth * kMinOwnRows;
  int64_t chunk;
  if (own_chunks) {
    chunk = std::min(own, ((T + nth - 1) / nth + MR - 1) / MR * MR);
  } else {
    chunk = std::min(std::max<int64_t>(MR, kChunkBytes / tile_bytes / MR * MR), rows);
  }
  const int64_t ldv = chunk * Cp, ldm = chunk * Kp;
  std::atomic<bool> unsafe{false};

  // One chunk of tiles [t0, t0 + chunk): its phases are at::parallel_for loops, which run
  // serially when called from a worker (own chunks).
  auto run_chunk = [&](int64_t t0) {
    // V: (A2, chunk, Cp) and M: (A2, chunk, Kp), row-major; rows past the chunk's tiles unused.
    // Kept per thread: a fresh multi-MB buffer is a fresh mmap each call, and page faults on
    // every page it touches.
    thread_local std::vector<float> buf;
    const size_t vsize = size_t(A2) * chunk * Cp, need = vsize + size_t(A2) * chunk * Kp;
    if (buf.size() < need) buf.resize(need);
    float* const V = buf.data();
    float* const Mb = V + vsize;
    const int64_t nt = std::min(chunk, T - t0);
    at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
      if (!input_tiles<M>(x, V, ldv, shape, t0, tb, te, bound)) unsafe.store(true);
    });
    if (unsafe.load()) return;
    at::parallel_for(0, A2 * KB, 1, [&](int64_t b, int64_t e) {
      gemm_tasks(V, ldv, u, Mb, ldm, C, Cp, KB, Kp, nt, b, e);
    });
    at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
      output_tiles<M>(Mb, ldm, bias, res, y, shape, relu, t0, tb, te);
    });
  };

  const int64_t nchunks = (T + chunk - 1) / chunk;
  if (own_chunks) {
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e && !unsafe.load(); ++i) run_chunk(i * chunk);
    });
  } else {
    for (int64_t i = 0; i < nchunks && !unsafe.load(); ++i) run_chunk(i * chunk);
  }
  return !unsafe.load();
}

#endif  // DEEPARCH_WINOGRAD

// (y, ok): y = conv2d(x, g, bias, padding=1) (+ residual), ReLU'd when relu, for g with k
// output channels and u its packed transform for this tile size (ops/conv_winograd.py); ok =
// false (y unfinished) when x is not finite or too large for the bound (see the top of this file).
std::tuple<at::Tensor, bool> winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& u,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& residual,
                                                  int64_t K, bool relu, int64_t tile, double bound) {
  const char* op = "winograd_conv3x3";
  DA_CHECK_ARG(DEEPARCH_WINOGRAD, op, "built without AVX2/FMA (setup.py DEEPARCH_CPU_ISA)");
  DA_CHECK_ARG(tile == 2 || tile == 4, op, "tile must be 2 or 4, got ", tile);
  DA_CHECK_ARG(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                   x.is_contiguous(at::MemoryFormat::ChannelsLast),
               op, "x must be a 4-D float32 channels_last-contiguous CPU tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), A = tile + 2;
  DA_CHECK_ARG(K > 0 && u.dim() == 4 && u.size(0) == A * A && u.size(1) == (K + 15) / 16 &&
                   u.size(2) == C && u.size(3) == 16 && u.scalar_type() == at::kFloat &&
                   u.is_contiguous(),
               op, "u must be the packed (", A * A, ", ", (K + 15) / 16, ", ", C,
               ", 16) float32 transform, got ", u.sizes());
  if (bias) {
    DA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == K && bias->scalar_type() == at::kFloat &&
                     bias->is_contiguous(),
                 op, "bias must be a contiguous float32 (", K, ") tensor");
  }
  at::Tensor y = at::empty({N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (residual) {
    DA_CHECK_ARG(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat &&
                     residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                 op, "residual must be a float32 channels_last tensor of shape ", y.sizes());
  }
  bool ok = true;
#if DEEPARCH_WINOGRAD
  if (y.numel() > 0) {
    const float* b = bias ? bias->const_data_ptr<float>() : nullptr;
    const float* r = residual ? residual->const_data_ptr<float>() : nullptr;
    auto run = tile == 4 ? &winograd_run<4> : &winograd_run<2>;
    ok = run(x.const_data_ptr<float>(), u.const_data_ptr<float>(), b, r, y.mutable_data_ptr<float>(),
             N, C, H, W, K, relu, bound);
  }
#endif
  return {y, ok};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace deeparch
