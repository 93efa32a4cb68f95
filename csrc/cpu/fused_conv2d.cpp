// fused_conv2d on the CPU: y = relu?(conv2d(x, w) + bias + residual).
//
// The convolution itself is ATen's (oneDNN for fp32/bf16 on x86, the path eager conv2d takes,
// bias included); the residual add and the ReLU run in ONE vectorised, parallel in-place pass
// over the fresh output (vec_kernels.h): no second output tensor, one read of the
// residual, against eager's conv + add + relu (two more passes and allocations).
//
// Why not oneDNN's fused post-ops (mkldnn::_convolution_pointwise with "relu", or ".binary" with
// "add")? Their ReLU (and leaky ReLU with alpha 0) turns NaN into 0, unlike torch.relu, and the
// pointwise entry point measured slower than eager's cached convolution on small batch-1 layers.
#include <torch/library.h>

#include "../common.h"
#include "vec_kernels.h"

namespace deeparch {

namespace {

at::Tensor fused_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, bool relu) {
  check_fused_conv2d_args("fused_conv2d", x, weight, bias, residual, stride, padding);
  const bool cl = is_channels_last_4d(x) || is_channels_last_4d(weight);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  std::optional<at::Tensor> res;
  if (residual) res = residual->contiguous(fmt);

  // x and weight go in as they are (ATen picks the layout, as for eager conv2d); the output is
  // brought to our rule's format, a no-op but for ambiguous shapes (C == 1, H == W == 1).
  at::Tensor y;
  const int64_t wo = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  if (x.scalar_type() == at::kBFloat16 && stride[1] > 1 && wo == 1) {
    // oneDNN (3.12, in torch 2.14) gets bfloat16 convolutions with one output column and a
    // column stride > 1 wrong (tests/test_fuzz.py found it; the Python aten backend routes
    // around it the same way, ops/conv.py conv2d): with one column the stride doesn't matter.
    y = at::conv2d(x, weight, bias, {stride[0], 1}, padding).narrow(3, 0, 1);
  } else {
    y = at::conv2d(x, weight, bias, stride, padding);  // eager conv2d's entry point
  }
  y = y.contiguous(fmt);
  if (!(relu || res) || y.numel() == 0) return y;
  if (!relu) return y.add_(*res);  // no ReLU: a plain in-place add

  // y and the residual share one dense layout (fmt): the epilogue is one flat in-place pass.
  dispatch_float_types(y.scalar_type(), "fused_conv2d_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    if (res) {
      cpu::add_relu_flat<scalar_t>(out, res->const_data_ptr<scalar_t>(), out, y.numel());
    } else {
      cpu::relu_flat<scalar_t>(out, out, y.numel());
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CPU, m) { m.impl("fused_conv2d", &fused_conv2d_cpu); }

}  // namespace deeparch
