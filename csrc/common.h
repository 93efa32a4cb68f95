// Shared argument checks for the deeparch C++ kernels: every check names the argument and what
// was expected, so bad input is a clear Python error (RuntimeError), never a crash.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <torch/types.h>

#define DEEPARCH_API_VERSION 4

// The CPU Winograd kernel (cpu/winograd.cpp) is written for AVX2 + FMA (setup.py's at::vec ISA).
#if defined(__AVX2__) && defined(__FMA__)
#define DEEPARCH_WINOGRAD 1
#else
#define DEEPARCH_WINOGRAD 0
#endif

#define DA_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

namespace deeparch {

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline void check_same_device_dtype(const char* op, const at::Tensor& ref, const char* ref_name,
                                    const at::Tensor& t, const char* name) {
  DA_CHECK_ARG(t.device() == ref.device(), op, name, " must be on ", ref_name, "'s device ",
               ref.device(), ", got ", t.device());
  DA_CHECK_ARG(t.scalar_type() == ref.scalar_type(), op, name, " must have ", ref_name,
               "'s dtype ", dtype_name(ref.scalar_type()), ", got ", dtype_name(t.scalar_type()));
}

inline void check_float_dtype(const char* op, const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  DA_CHECK_ARG(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, name,
               " must be float32, float16 or bfloat16, got ", dtype_name(s));
}

// The memory format torch's conv2d gives its output: channels_last when the input or the weight
// suggests it (Tensor::suggest_memory_format, as ATen's convolution decides, also for ambiguous
// strides). The Python side (ops/_lib.py output_memory_format) applies the same rule.
inline bool is_channels_last_4d(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// True when a, b and out can be walked as one flat array in the same element order.
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.is_non_overlapping_and_dense();
}

// Calls f(scalar_t{}) for the three dtypes the kernels take (float, half, bfloat16).
template <typename F>
void dispatch_float_types(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", c10::toString(t));
  }
}

// Brings t into out's layout when it is not already, so that a flat kernel applies to both.
inline at::Tensor as_layout_of(const at::Tensor& t, const at::Tensor& out) {
  if (same_dense_layout(t, out)) return t;
  return at::empty_like(out).copy_(t);
}

inline void check_add_relu_args(const char* op, const at::Tensor& x, const at::Tensor& identity) {
  check_float_dtype(op, x, "x");
  check_same_device_dtype(op, x, "x", identity, "identity");
  DA_CHECK_ARG(x.sizes() == identity.sizes(), op, "identity must have x's shape ", x.sizes(),
               ", got ", identity.sizes());
}

// add_relu_ writes x: torch's in-place rules (ATen/MemoryOverlap.h), as x.add_(identity) applies
// them: no element of x shared by two indices, no partial overlap of x and identity.
inline void check_add_relu_inplace_args(const char* op, const at::Tensor& x,
                                        const at::Tensor& identity) {
  check_add_relu_args(op, x, identity);
  at::assert_no_internal_overlap(x);
  at::assert_no_partial_overlap(x, identity);
}

void check_fused_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                             c10::IntArrayRef padding);

}  // namespace deeparch
