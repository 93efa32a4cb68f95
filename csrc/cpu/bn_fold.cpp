// deeparch::bn_scale_shift on the CPU: eval-mode BatchNorm after a convolution as a per-channel
// y * scale + shift, in one pass over the K channels (deeparch_kernels/ops/bn_fold.py has the
// schema and the same formula in torch ops). The eager fold check of the fused modules calls it
// for every (conv, BN) pair at every call, where five separate torch ops cost ~33 us.
#include <cmath>

#include <torch/library.h>

#include "../common.h"

namespace deeparch {
namespace {

template <typename acc_t>
void scale_shift_kernel(const at::Tensor& mean, const at::Tensor& var,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& conv_bias, double eps, at::Tensor& scale,
                        at::Tensor& shift) {
  const int64_t K = var.numel();
  auto as = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t || !t->defined()) return std::nullopt;
    return t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  };
  const at::Tensor m = mean.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor v = var.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const auto w = as(weight), b = as(bias), cb = as(conv_bias);
  const acc_t* pm = m.template const_data_ptr<acc_t>();
  const acc_t* pv = v.template const_data_ptr<acc_t>();
  const acc_t* pw = w ? w->template const_data_ptr<acc_t>() : nullptr;
  const acc_t* pb = b ? b->template const_data_ptr<acc_t>() : nullptr;
  const acc_t* pcb = cb ? cb->template const_data_ptr<acc_t>() : nullptr;
  acc_t* ps = scale.template mutable_data_ptr<acc_t>();
  acc_t* pt = shift.template mutable_data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps);
  for (int64_t k = 0; k < K; ++k) {
    acc_t s = acc_t(1) / std::sqrt(pv[k] + e);
    if (pw) s = s * pw[k];
    const acc_t centred = (pcb ? pcb[k] : acc_t(0)) - pm[k];
    ps[k] = s;
    pt[k] = pb ? std::fma(centred, s, pb[k]) : centred * s;  // as torch.addcmul rounds it
  }
}

std::tuple<at::Tensor, at::Tensor> bn_scale_shift_cpu(const at::Tensor& running_mean,
                                                      const at::Tensor& running_var,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& conv_bias,
                                                      double eps) {
  const char* op = "bn_scale_shift";
  const int64_t K = running_var.numel();
  DA_CHECK_ARG(running_var.dim() == 1 && running_mean.dim() == 1 && running_mean.numel() == K, op,
               "running_mean and running_var must be 1-D of one length, got ", running_mean.sizes(),
               " and ", running_var.sizes());
  for (const auto* t : {&weight, &bias, &conv_bias}) {
    if (*t && (*t)->defined()) {
      DA_CHECK_ARG((*t)->dim() == 1 && (*t)->numel() == K, op, "weight, bias and conv_bias must be 1-D of ",
                   K, " elements, got ", (*t)->sizes());
    }
  }
  const bool wide = running_var.scalar_type() == at::kDouble;
  const auto dt = wide ? at::kDouble : at::kFloat;
  at::Tensor scale = at::empty({K}, running_var.options().dtype(dt));
  at::Tensor shift = at::empty({K}, running_var.options().dtype(dt));
  if (wide) {
    scale_shift_kernel<double>(running_mean, running_var, weight, bias, conv_bias, eps, scale, shift);
  } else {
    scale_shift_kernel<float>(running_mean, running_var, weight, bias, conv_bias, eps, scale, shift);
  }
  return {scale, shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CPU, m) { m.impl("bn_scale_shift", &bn_scale_shift_cpu); }

}  // namespace deeparch
