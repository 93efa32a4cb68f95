// Autograd for the C++ ops, in C++: deeparch::add_relu, deeparch::add_relu_ and deeparch::relu_
// (with their version counter bumps) and deeparch::fused_conv2d.
//
// The schemas are defined in Python (deeparch_kernels/ops/). Python's torch.library
// register_autograd would put a Python function on every call's path, also under no_grad:
// measured ~30 us per fused_conv2d call and ~4 us per add_relu call on the CPU, which is most of
// the host overhead budget. Registered here instead (the Autograd key, all devices), a call that
// needs no gradient goes straight to the backend kernel, and one that does builds one C++ node.
// ops/__init__.py registers the Python autograd only when this extension is missing or stale
// (build_info()["cpp_autograd"]).
//
// Backward, the same as the Python one it replaces (and as the Triton ops keep):
//   add_relu       g = threshold_backward(grad, out, 0) for both inputs (torch.relu's gradient)
//   fused_conv2d   g = threshold_backward(grad, out, 0) when relu, then ATen's
//                  convolution_backward for x, weight and bias; the residual gets g
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace deeparch {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool needs_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const std::optional<at::Tensor>& t) { return t && needs_grad(*t); }

// ---------------------------------------------------------------- add_relu

at::Tensor add_relu_below_autograd(const at::Tensor& x, const at::Tensor& identity) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("deeparch::add_relu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, identity);
}

struct AddReLUFn : public torch::autograd::Function<AddReLUFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& identity) {
    at::Tensor out = add_relu_below_autograd(x, identity);
    ctx->save_for_backward({out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor()};
    const at::Tensor out = ctx->get_saved_variables()[0];
    const at::Tensor g = at::threshold_backward(grad, out, 0);
    return {ctx->needs_input_grad(0) ? g : at::Tensor(), ctx->needs_input_grad(1) ? g : at::Tensor()};
  }
};

at::Tensor add_relu_autograd(const at::Tensor& x, const at::Tensor& identity) {
  if (!(at::GradMode::is_enabled() && (needs_grad(x) || needs_grad(identity)))) {
    return add_relu_below_autograd(x, identity);
  }
  return AddReLUFn::apply(x, identity);
}

// ---------------------------------------------------------------- add_relu_ (in place)
//
// What torch's own in-place ops get from their generated kernels: the Autograd kernel records
// the write in the graph (here: the out-of-place op's node, then an autograd-aware copy_ into x,
// which refuses a leaf that requires grad, as x.add_() does), and the ADInplaceOrView kernel
// bumps x's version counter, so autograd refuses a saved tensor that was overwritten since.

const c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&)>& add_relu_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("deeparch::add_relu_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&)>();
  return op;
}

void add_relu_inplace_autograd(const at::Tensor& x, const at::Tensor& identity) {
  if (at::GradMode::is_enabled() && (needs_grad(x) || needs_grad(identity))) {
    x.copy_(AddReLUFn::apply(x, identity));
    return;
  }
  at::AutoDispatchBelowAutograd guard;  // on to ADInplaceOrView
  add_relu_inplace_op().call(x, identity);
}

void add_relu_inplace_version_bump(const at::Tensor& x, const at::Tensor& identity) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    add_relu_inplace_op().call(x, identity);
  }
  torch::autograd::impl::bump_version(x);
}

// ---------------------------------------------------------------- relu_ (in place, opaque)
//
// With a gradient needed it is torch's own x.relu_() (its autograd and version bump); else the
// CPU kernel, and the ADInplaceOrView kernel bumps x's version, as for add_relu_.

const c10::TypedOperatorHandle<void(const at::Tensor&)>& relu_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("deeparch::relu_", "")
                             .typed<void(const at::Tensor&)>();
  return op;
}

void relu_inplace_autograd(const at::Tensor& x) {
  if (at::GradMode::is_enabled() && needs_grad(x)) {
    at::Tensor t = x;
    t.relu_();
    return;
  }
  at::AutoDispatchBelowAutograd guard;  // on to ADInplaceOrView
  relu_inplace_op().call(x);
}

void relu_inplace_version_bump(const at::Tensor& x) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    relu_inplace_op().call(x);
  }
  torch::autograd::impl::bump_version(x);
}

// ---------------------------------------------------------------- fused_conv2d

at::Tensor fused_conv2d_below_autograd(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& residual,
                                       c10::IntArrayRef stride, c10::IntArrayRef padding,
                                       bool relu) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("deeparch::fused_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
                            bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, bias, residual, stride, padding, relu);
}

struct FusedConv2dFn : public torch::autograd::Function<FusedConv2dFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, bool relu) {
    at::Tensor out =
        fused_conv2d_below_autograd(x, weight, bias, residual, stride, padding, relu);
    ctx->save_for_backward({x, weight, relu ? out : at::Tensor()});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Outputs: one gradient per forward input (x, weight, bias, residual, stride, padding, relu).
    variable_list result(7);
    if (!grads[0].defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();

    const at::Tensor g = relu ? at::threshold_backward(grads[0], saved[2], 0) : grads[0];
    // needs_input_grad counts the tensor inputs that were given: an absent bias shifts the
    // residual's index down by one.
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_r = has_residual && ctx->needs_input_grad(has_bias ? 3 : 2);
    if (need_x || need_w || need_b) {
      const int64_t bias_size[1] = {weight.size(0)};
      auto [gx, gw, gb] = at::convolution_backward(
          g, x, weight,
          has_bias ? at::OptionalIntArrayRef(c10::IntArrayRef(bias_size)) : std::nullopt, stride,
          padding, /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
          /*groups=*/1, {need_x, need_w, need_b});
      result[0] = need_x ? gx : at::Tensor();
      result[1] = need_w ? gw : at::Tensor();
      result[2] = need_b ? gb : at::Tensor();
    }
    if (need_r) result[3] = g;
    return result;
  }
};

at::Tensor fused_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding, bool relu) {
  if (!(at::GradMode::is_enabled() &&
        (needs_grad(x) || needs_grad(weight) || needs_grad(bias) || needs_grad(residual)))) {
    return fused_conv2d_below_autograd(x, weight, bias, residual, stride, padding, relu);
  }
  return FusedConv2dFn::apply(x, weight, bias, residual, stride, padding, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, ADInplaceOrView, m) {
  m.impl("add_relu_", &add_relu_inplace_version_bump);
  m.impl("relu_", &relu_inplace_version_bump);
}

TORCH_LIBRARY_IMPL(deeparch, Autograd, m) {
  m.impl("add_relu", &add_relu_autograd);
  m.impl("add_relu_", &add_relu_inplace_autograd);
  m.impl("relu_", &relu_inplace_autograd);
  m.impl("fused_conv2d", &fused_conv2d_autograd);
}

}  // namespace deeparch
