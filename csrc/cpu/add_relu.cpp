// Fused residual add + ReLU on the CPU: y = relu(x + identity), one pass, vectorised with
// at::vec and split across threads with at::parallel_for. The ReLU keeps NaN (v < 0 ? 0 : v),
// exactly as torch.relu does. fp16/bf16 are widened to fp32 for the add, as torch does.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../common.h"

namespace deeparch {
namespace {

using fVec = at::vec::Vectorized<float>;

inline fVec relu_keep_nan(const fVec& v) {
  const fVec zero(0.f);
  return fVec::blendv(v, zero, v < zero);  // NaN < 0 is false: NaN stays
}

inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

constexpr int64_t kGrain = 1 << 15;

template <typename scalar_t>
void add_relu_flat(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (; i + Vec::size() <= end; i += Vec::size()) {
        relu_keep_nan(Vec::loadu(a + i) + Vec::loadu(b + i)).store(out + i);
      }
    } else {
      // Reduced precision: widen one vector of scalar_t into two float vectors.
      for (; i + Vec::size() <= end; i += Vec::size()) {
        auto [a0, a1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(a + i));
        auto [b0, b1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(b + i));
        at::vec::convert_from_float<scalar_t>(relu_keep_nan(a0 + b0), relu_keep_nan(a1 + b1))
            .store(out + i);
      }
    }
    for (; i < end; ++i) {
      out[i] = static_cast<scalar_t>(
          relu_keep_nan(static_cast<float>(a[i]) + static_cast<float>(b[i])));
    }
  });
}

void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  if (out.numel() == 0) return;
  dispatch_float_types(out.scalar_type(), "add_relu_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    add_relu_flat<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
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
  check_add_relu_args("add_relu_", x, identity);
  if (x.is_non_overlapping_and_dense()) {
    launch(x, as_layout_of(identity, x), x);
  } else {  // a strided view: compute densely, then write back through the view
    x.copy_(add_relu_cpu(x, identity));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_", &add_relu_inplace_cpu);
}

}  // namespace deeparch
