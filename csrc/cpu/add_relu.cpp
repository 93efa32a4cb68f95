// Fused residual add + ReLU on the CPU: y = relu(x + identity), one pass (vec_kernels.h:
// at::vec + at::parallel_for; ReLU keeps NaN; fp16/bf16 widened to fp32 for the add, as torch does).
#include <torch/library.h>

#include "../common.h"
#include "vec_kernels.h"

namespace deeparch {
namespace {

void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  if (out.numel() == 0) return;
  dispatch_float_types(out.scalar_type(), "add_relu_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    cpu::add_relu_flat<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(), out.numel());
  });
}

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& identity) {
  check_add_relu_args("add_relu", x, identity);
  at::Tensor out = at::empty_like(x);  // x's memory format, as the fake implementation says
  launch(as_layout_of(x, out), as_layout_of(identity, out), out);
  return out;
}

void add_relu_inplace_cpu(const at::Tensor& x, const at::Tensor& identity) {
  check_add_relu_inplace_args("add_relu_", x, identity);
  if (x.is_non_overlapping_and_dense()) {
    launch(x, as_layout_of(identity, x), x);
  } else {  // a strided view: compute densely, then write back through the view
    x.copy_(add_relu_cpu(x, identity));
  }
}

}  // namespace

// deeparch::relu_: x.relu_() as an op torch.compile can't see into, so that its CPU pattern
// passes can't fuse it into oneDNN's convolution as a post-op (whose ReLU turns NaN into 0); in
// place, on the convolution's fresh output (inductor keeps a mutating op in place where it can).
// Its version bump and autograd: autograd.cpp.
// Dense floating tensors (the case it exists for) take the flat kernel, fp16/bf16 on their bits
// (vec_kernels.h: 3-4x torch's bf16 relu_ here); anything else is torch's relu_ (its dtypes, its
// refusal of overlapping tensors).
void relu_inplace_opaque_cpu(const at::Tensor& x) {
  if (x.numel() == 0) return;
  const auto t = x.scalar_type();
  if ((t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && x.is_non_overlapping_and_dense()) {
    dispatch_float_types(t, "relu_", [&](auto tag) {
      using scalar_t = decltype(tag);
      scalar_t* p = x.mutable_data_ptr<scalar_t>();
      cpu::relu_flat<scalar_t>(p, p, x.numel());
    });
    return;
  }
  at::Tensor y = x;
  at::relu_(y);
}

TORCH_LIBRARY_IMPL(deeparch, CPU, m) {
  m.impl("relu_", &relu_inplace_opaque_cpu);
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_", &add_relu_inplace_cpu);
}

}  // namespace deeparch
