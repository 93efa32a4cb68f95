// fused_conv2d on the CPU: y = relu?(conv2d(x, w) + bias + residual).
//
// The convolution itself is oneDNN's (the mkldnn::_convolution_pointwise ops torch already
// carries; bias, and residual where oneDNN fuses it, go in as a fused post-op), or ATen's
// convolution where oneDNN does not take the dtype/layout. What oneDNN did not fuse runs in ONE
// vectorised, parallel in-place pass over the output (epilogue_inplace below).
//
// oneDNN's eltwise ReLU (and leaky ReLU with alpha 0) turn NaN into 0, unlike torch.relu, so the
// ReLU is never handed to oneDNN: it always runs in our pass, which keeps NaN.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../common.h"

namespace deeparch {

namespace {

using fVec = at::vec::Vectorized<float>;

inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }
inline fVec relu_keep_nan(const fVec& v) {
  const fVec zero(0.f);
  return fVec::blendv(v, zero, v < zero);
}

// y[p, k] (channels_last: k fastest) or y[n, k, hw] (contiguous) += bias[k] (+ residual), ReLU.
// All arithmetic in fp32; one read and one write of y, one read of residual.
template <typename scalar_t>
void epilogue_inplace(scalar_t* y, const scalar_t* bias, const scalar_t* res, int64_t N,
                      int64_t K, int64_t HW, bool channels_last, bool relu) {
  auto finish = [&](float v) { return relu ? relu_keep_nan(v) : v; };
  auto finishv = [&](fVec v) { return relu ? relu_keep_nan(v) : v; };
  constexpr int64_t W = fVec::size();
  if (channels_last) {
    // Rows of K contiguous channels, one row per output pixel.
    at::parallel_for(0, N * HW, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                     [&](int64_t p0, int64_t p1) {
      std::vector<float> b(K, 0.f);
      if (bias) for (int64_t k = 0; k < K; ++k) b[k] = static_cast<float>(bias[k]);
      float tmp[W];
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* row = y + p * K;
        const scalar_t* rrow = res ? res + p * K : nullptr;
        int64_t k = 0;
        for (; k + W <= K; k += W) {
          fVec v;
          if constexpr (std::is_same_v<scalar_t, float>) {
            v = fVec::loadu(row + k);
            if (rrow) v = v + fVec::loadu(rrow + k);
          } else {
            for (int64_t j = 0; j < W; ++j) {
              tmp[j] = static_cast<float>(row[k + j]) + (rrow ? static_cast<float>(rrow[k + j]) : 0.f);
            }
            v = fVec::loadu(tmp);
          }
          v = finishv(v + fVec::loadu(b.data() + k));
          if constexpr (std::is_same_v<scalar_t, float>) {
            v.store(row + k);
          } else {
            v.store(tmp);
            for (int64_t j = 0; j < W; ++j) row[k + j] = static_cast<scalar_t>(tmp[j]);
          }
        }
        for (; k < K; ++k) {
          float v = static_cast<float>(row[k]) + b[k] + (rrow ? static_cast<float>(rrow[k]) : 0.f);
          row[k] = static_cast<scalar_t>(finish(v));
        }
      }
    });
  } else {
    // Planes of HW contiguous pixels, one plane per (n, k).
    at::parallel_for(0, N * K, std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)),
                     [&](int64_t q0, int64_t q1) {
      float tmp[W];
      for (int64_t q = q0; q < q1; ++q) {
        const float bk = bias ? static_cast<float>(bias[q % K]) : 0.f;
        const fVec bv(bk);
        scalar_t* plane = y + q * HW;
        const scalar_t* rplane = res ? res + q * HW : nullptr;
        int64_t i = 0;
        for (; i + W <= HW; i += W) {
          fVec v;
          if constexpr (std::is_same_v<scalar_t, float>) {
            v = fVec::loadu(plane + i);
            if (rplane) v = v + fVec::loadu(rplane + i);
          } else {
            for (int64_t j = 0; j < W; ++j) {
              tmp[j] = static_cast<float>(plane[i + j]) + (rplane ? static_cast<float>(rplane[i + j]) : 0.f);
            }
            v = fVec::loadu(tmp);
          }
          v = finishv(v + bv);
          if constexpr (std::is_same_v<scalar_t, float>) {
            v.store(plane + i);
          } else {
            v.store(tmp);
            for (int64_t j = 0; j < W; ++j) plane[i + j] = static_cast<scalar_t>(tmp[j]);
          }
        }
        for (; i < HW; ++i) {
          float v = static_cast<float>(plane[i]) + bk + (rplane ? static_cast<float>(rplane[i]) : 0.f);
          plane[i] = static_cast<scalar_t>(finish(v));
        }
      }
    });
  }
}

// oneDNN takes fp32 in either layout and bf16 in channels_last (bf16 NCHW trips an internal
// assert in torch's binary post-op path); fp16 needs AVX-512-FP16 CPUs, so it goes to ATen.
bool onednn_takes(const at::Tensor& x, bool channels_last) {
  if (!at::hasMKLDNN()) return false;
  const auto s = x.scalar_type();
  return s == at::kFloat || (s == at::kBFloat16 && channels_last);
}

// Calls mkldnn::_convolution_pointwise{,.binary} boxed, so no C++ signature is assumed.
// Returns false (and leaves `out` undefined) when the op is missing or oneDNN declines.
bool onednn_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                 const at::Tensor* residual, c10::IntArrayRef stride, c10::IntArrayRef padding,
                 at::Tensor& out) {
  static const auto unary = c10::Dispatcher::singleton().findOp({"mkldnn::_convolution_pointwise", ""});
  static const auto binary = c10::Dispatcher::singleton().findOp({"mkldnn::_convolution_pointwise", "binary"});
  const std::vector<int64_t> pad(padding.begin(), padding.end()), str(stride.begin(), stride.end()),
      dil{1, 1};
  torch::jit::Stack stack;
  try {
    if (residual == nullptr) {
      if (!unary) return false;
      stack = {x, w, bias, pad, str, dil, int64_t{1}, std::string("none"),
               c10::List<std::optional<at::Scalar>>(), std::string("")};
      unary->callBoxed(&stack);
    } else {
      if (!binary) return false;
      stack = {x, *residual, w, bias, pad, str, dil, int64_t{1}, std::string("add"),
               c10::IValue(), c10::IValue(), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
      binary->callBoxed(&stack);
    }
  } catch (const c10::Error&) {
    return false;  // oneDNN declined this configuration; ATen's path below is always correct
  }
  out = stack.at(0).toTensor();
  return true;
}

at::Tensor fused_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, bool relu) {
  check_fused_conv2d_args("fused_conv2d", x, weight, bias, residual, stride, padding);
  const bool cl = is_channels_last_4d(x) || is_channels_last_4d(weight);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor xin = x.contiguous(fmt);
  const at::Tensor win = weight.contiguous(fmt);
  std::optional<at::Tensor> res;
  if (residual) res = residual->contiguous(fmt);

  at::Tensor y;
  bool bias_done = false, res_done = false;
  if (onednn_takes(xin, cl)) {
    // conv + bias (+ residual) in oneDNN; no eltwise post-op (see the file comment).
    const at::Tensor* r = res ? &*res : nullptr;
    if (onednn_conv(xin, win, bias, r, stride, padding, y)) {
      bias_done = true;
      res_done = r != nullptr;
    }
  }
  if (!y.defined()) {
    y = at::convolution(xin, win, bias, stride, padding, {1, 1}, false, {0, 0}, 1);
    bias_done = true;
  }
  y = y.contiguous(fmt);
  if (!(relu || (!res_done && res) || !bias_done) || y.numel() == 0) return y;

  const int64_t N = y.size(0), K = y.size(1), HW = y.size(2) * y.size(3);
  const at::Tensor b = (!bias_done && bias) ? bias->contiguous() : at::Tensor();
  const at::Tensor r = (!res_done && res) ? res->contiguous(fmt) : at::Tensor();
  dispatch_float_types(y.scalar_type(), "fused_conv2d_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    epilogue_inplace<scalar_t>(y.mutable_data_ptr<scalar_t>(),
                               b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                               r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, N, K, HW, cl,
                               relu);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CPU, m) { m.impl("fused_conv2d", &fused_conv2d_cpu); }

}  // namespace deeparch
