// Fused residual add + ReLU on CUDA: y = relu(x + identity), one pass over memory.
//
// Memory-bound: 3 * n * sizeof(T) bytes. Each thread moves kUnroll 16-byte vectors per operand
// (all loads issued before the first use, so several are in flight), 64-bit indices throughout,
// and a scalar path for the tail and for pointers that are not 16-byte aligned.
// ReLU keeps NaN (v < 0 ? 0 : v), as torch.relu does; fmaxf would swallow it.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../common.h"
#include "relu.cuh"

namespace deeparch {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__global__ void add_relu_vec_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                    T* __restrict__ out, int64_t n) {
  constexpr int V = 16 / sizeof(T);
  using P = Pack<T, V>;
  const int64_t nvec = n / V;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll) + threadIdx.x;
  P pa[kUnroll], pb[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * kThreads;
    if (i < nvec) {
      pa[u] = reinterpret_cast<const P*>(a)[i];
      pb[u] = reinterpret_cast<const P*>(b)[i];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * kThreads;
    if (i < nvec) {
      P po;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        po.v[j] = static_cast<T>(relu_keep_nan(static_cast<float>(pa[u].v[j]) + static_cast<float>(pb[u].v[j])));
      }
      reinterpret_cast<P*>(out)[i] = po;
    }
  }
  // Tail (fewer than V elements): the first threads of block 0.
  const int64_t tail = nvec * V;
  if (blockIdx.x == 0 && tail + threadIdx.x < n) {
    const int64_t i = tail + threadIdx.x;
    out[i] = static_cast<T>(relu_keep_nan(static_cast<float>(a[i]) + static_cast<float>(b[i])));
  }
}

template <typename T>
__global__ void add_relu_scalar_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                       T* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<T>(relu_keep_nan(static_cast<float>(a[i]) + static_cast<float>(b[i])));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(out.scalar_type(), "add_relu_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = scalar_t;
    const T* pa = a.const_data_ptr<T>();
    const T* pb = b.const_data_ptr<T>();
    T* po = out.mutable_data_ptr<T>();
    if (aligned16(pa) && aligned16(pb) && aligned16(po)) {
      constexpr int V = 16 / sizeof(T);
      const int64_t nvec = n / V;
      const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
      const int64_t blocks = std::max<int64_t>(1, (nvec + per_block - 1) / per_block);
      TORCH_CHECK(blocks < (int64_t{1} << 31), "add_relu: tensor too large for one launch");
      add_relu_vec_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pa, pb, po, n);
    } else {
      const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20);
      add_relu_scalar_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pa, pb, po, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& identity) {
  check_add_relu_args("add_relu", x, identity);
  at::Tensor out = at::empty_like(x);
  launch(as_layout_of(x, out), as_layout_of(identity, out), out);
  return out;
}

void add_relu_inplace_cuda(const at::Tensor& x, const at::Tensor& identity) {
  check_add_relu_inplace_args("add_relu_", x, identity);
  if (x.is_non_overlapping_and_dense()) {
    launch(x, as_layout_of(identity, x), x);
  } else {
    x.copy_(add_relu_cuda(x, identity));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(deeparch, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_", &add_relu_inplace_cuda);
}

}  // namespace deeparch
