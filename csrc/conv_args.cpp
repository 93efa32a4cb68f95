// Argument checks of fused_conv2d, shared by the CPU and CUDA implementations.
#include "common.h"

namespace deeparch {

void check_fused_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                             c10::IntArrayRef padding) {
  DA_CHECK_ARG(x.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  DA_CHECK_ARG(weight.dim() == 4, op, "weight must be 4-D (K, C, kh, kw), got ", weight.dim(), "-D");
  check_float_dtype(op, x, "x");
  check_same_device_dtype(op, x, "x", weight, "weight");
  DA_CHECK_ARG(weight.size(1) == x.size(1), op, "weight has ", weight.size(1),
               " input channels but x has ", x.size(1), " (groups != 1 is not supported)");
  DA_CHECK_ARG(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
               "stride must be two integers >= 1, got ", stride);
  DA_CHECK_ARG(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
               "padding must be two integers >= 0, got ", padding);
  const int64_t K = weight.size(0);
  const int64_t Ho = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t Wo = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  DA_CHECK_ARG(x.size(2) + 2 * padding[0] >= weight.size(2) && x.size(3) + 2 * padding[1] >= weight.size(3),
               op, "the padded input (", x.size(2) + 2 * padding[0], "x", x.size(3) + 2 * padding[1],
               ") is smaller than the kernel (", weight.size(2), "x", weight.size(3), ")");
  if (bias) {
    check_same_device_dtype(op, x, "x", *bias, "bias");
    DA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == K, op, "bias must have shape (", K,
                 ",), got ", bias->sizes());
  }
  if (residual) {
    check_same_device_dtype(op, x, "x", *residual, "residual");
    const std::vector<int64_t> want{x.size(0), K, Ho, Wo};
    DA_CHECK_ARG(residual->sizes() == c10::IntArrayRef(want), op,
                 "residual must have the output's shape ", c10::IntArrayRef(want), ", got ",
                 residual->sizes());
  }
}

}  // namespace deeparch
