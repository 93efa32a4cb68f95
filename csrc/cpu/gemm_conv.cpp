// 1x1 stride-1 convolutions on the CPU (fp32, channels_last) as one GEMM: x viewed as
// (N*H*W) x C row-major is the A matrix as it lies in memory, the weight packed once as
// (K/16, C, 16) panels (ops/conv_gemm.py) is B, and the output rows are channels_last pixels:
//
//   y[p, k] = relu?(sum_c x[p, c] w[k, c] + bias[k] + residual[p, k])
//
// The 6x16 micro-kernel (avx2_gemm.h, shared with the Winograd kernel) reduces over all of C in
// registers; bias, residual and the NaN-keeping ReLU are applied to its accumulators before the
// one store, so the output is written once and no pass follows. Threads split the 16-channel
// panels (each streams all rows of x against its panels, which stay in its L2), or, for layers
// whose whole packed weight fits a core's L2 (few channels, many pixels), the rows.
//
// The sum is a plain dot product in fp32, as oneDNN's: NaN and Inf propagate through it as
// through any direct convolution (no finiteness check is needed, unlike Winograd's transforms).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

#if DEEPARCH_WINOGRAD
#include "avx2_gemm.h"
#endif

namespace deeparch {

namespace {

#if DEEPARCH_WINOGRAD
using namespace avx2;

constexpr int64_t kRowSplitWeightBytes = 256 << 10;  // packed weight <= this: threads split rows
constexpr int64_t kRowChunk = 8 * MR;                 // rows per task when they do

// Panels [kb0, kb1) over rows [r0, r1) of y = x @ u (+ bias, + residual, ReLU).
void gemm_range(const float* x, const float* u, const float* bias, const float* res, float* y,
                int64_t P, int64_t C, int64_t K, bool relu, int64_t kb0, int64_t kb1, int64_t r0,
                int64_t r1) {
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const float* ub = u + kb * C * NR;
    const int64_t k0 = kb * NR;
    const bool full0 = k0 + 8 <= K, full1 = k0 + 16 <= K;
    const __m256i m0 = lanes_below(K - k0), m1 = lanes_below(K - k0 - 8);
    auto load = [&](const float* p, bool full, __m256i m) {
      return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
    };
    const V8 bv0 = bias ? load(bias + k0, full0, m0) : _mm256_setzero_ps();
    const V8 bv1 = bias && k0 + 8 < K ? load(bias + k0 + 8, full1, m1) : _mm256_setzero_ps();
    auto store = [&](int64_t row, V8 v0, V8 v1) {
      v0 = add(v0, bv0);
      v1 = add(v1, bv1);
      if (res) {
        const float* rp = res + row * K + k0;
        v0 = add(v0, load(rp, full0, m0));
        if (k0 + 8 < K) v1 = add(v1, load(rp + 8, full1, m1));
      }
      if (relu) {
        v0 = relu_keep_nan(v0);
        v1 = relu_keep_nan(v1);
      }
      float* yp = y + row * K + k0;
      if (full1) {
        _mm256_storeu_ps(yp, v0);
        _mm256_storeu_ps(yp + 8, v1);
      } else {
        _mm256_maskstore_ps(yp, m0, v0);
        if (k0 + 8 < K) _mm256_maskstore_ps(yp + 8, m1, v1);
      }
    };
    // The next panel (C lines) is prefetched over this panel's row blocks, a share each: with
    // few rows (7x7, 14x14 at batch 1) the panels come from memory and would stall each start.
    const float* next = kb + 1 < kb1 ? ub + C * NR : nullptr;
    const int64_t share = panel_share(C, r1 - r0);
    for (int64_t r = r0, blk = 0; r < r1; r += MR, ++blk) {
      const Prefetch pf = next_panel_block(next, C, share, blk);
      if (r + MR <= P) {
        micro_6x16(x + r * C, C, ub, C, [&](int i, V8 v0, V8 v1) { store(r + i, v0, v1); }, pf);
      } else {  // the last rows: the block ending at row P (P >= MR), its rows before r dropped
        const int64_t b = P - MR;
        micro_6x16(x + b * C, C, ub, C, [&](int i, V8 v0, V8 v1) {
          if (b + i >= r) store(b + i, v0, v1);
        }, pf);
      }
    }
  }
}

void gemm_conv(const float* x, const float* u, const float* bias, const float* res, float* y,
               int64_t P, int64_t C, int64_t K, bool relu) {
  const int64_t KB = (K + NR - 1) / NR;
  if (P < MR) {  // fewer rows than one block: pad them into a zeroed copy
    std::vector<float> xa(size_t(MR * C), 0.f), ya(size_t(MR * K)), ra(res ? size_t(MR * K) : 0);
    std::copy(x, x + P * C, xa.begin());
    if (res) std::copy(res, res + P * K, ra.begin());
    gemm_range(xa.data(), u, bias, res ? ra.data() : nullptr, ya.data(), MR, C, K, relu, 0, KB, 0, MR);
    std::copy(ya.begin(), ya.begin() + P * K, y);
    return;
  }
  if (KB * C * NR * int64_t(sizeof(float)) <= kRowSplitWeightBytes) {
    const int64_t chunks = (P + kRowChunk - 1) / kRowChunk;
    at::parallel_for(0, chunks, 1, [=](int64_t b, int64_t e) {
      gemm_range(x, u, bias, res, y, P, C, K, relu, 0, KB, b * kRowChunk, std::min(P, e * kRowChunk));
    });
  } else {
    at::parallel_for(0, KB, 1, [=](int64_t b, int64_t e) {
      gemm_range(x, u, bias, res, y, P, C, K, relu, b, e, 0, P);
    });
  }
}

#endif  // DEEPARCH_WINOGRAD

// y = conv2d(x, w, bias) (+ residual), ReLU'd when relu, for a 1x1 stride-1 w with k output
// channels and u its packed (ceil(k/16), C, 16) panels (ops/conv_gemm.py).
at::Tensor conv1x1_gemm_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, int64_t K, bool relu) {
  const char* op = "conv1x1_gemm";
  DA_CHECK_ARG(DEEPARCH_WINOGRAD, op, "built without AVX2/FMA (setup.py DEEPARCH_CPU_ISA)");
  DA_CHECK_ARG(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                   x.is_contiguous(at::MemoryFormat::ChannelsLast),
               op, "x must be a 4-D float32 channels_last-contiguous CPU tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  DA_CHECK_ARG(K > 0 && u.dim() == 3 && u.size(0) == (K + 15) / 16 && u.size(1) == C &&
                   u.size(2) == 16 && u.scalar_type() == at::kFloat && u.device().is_cpu() &&
                   u.is_contiguous(),
               op, "u must be the packed (", (K + 15) / 16, ", ", C, ", 16) float32 weight, got ",
               u.sizes());
  if (bias) {
    DA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == K && bias->scalar_type() == at::kFloat &&
                     bias->device().is_cpu() && bias->is_contiguous(),
                 op, "bias must be a contiguous float32 (", K, ") CPU tensor");
  }
  at::Tensor y = at::empty({N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (residual) {
    DA_CHECK_ARG(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat &&
                     residual->device().is_cpu() &&
                     residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                 op, "residual must be a float32 channels_last CPU tensor of shape ", y.sizes());
  }
#if DEEPARCH_WINOGRAD
  if (y.numel() > 0) {  // (C == 0 sums nothing: the bias and residual alone, as conv2d gives)
    gemm_conv(x.const_data_ptr<float>(), u.const_data_ptr<float>(),
              bias ? bias->const_data_ptr<float>() : nullptr,
              residual ? residual->const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
              N * H * W, C, K, relu);
  }
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CPU, m) { m.impl("conv1x1_gemm", &conv1x1_gemm_cpu); }

}  // namespace deeparch
