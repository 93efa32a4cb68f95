// ReLU with torch.relu's semantics, shared by every CUDA kernel's epilogue (add_relu.cu,
// conv_common.cuh, the CUTLASS epilogue in cutlass/conv_sm90_kernel.cuh): v < 0 ? 0 : v, so NaN
// passes through (NaN < 0 is false). fmaxf(v, 0) would turn NaN into 0.
#pragma once

#if defined(__CUDACC__)
#define DEEPARCH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DEEPARCH_HOST_DEVICE inline
#endif

namespace deeparch {

DEEPARCH_HOST_DEVICE float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

}  // namespace deeparch
