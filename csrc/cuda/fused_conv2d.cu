// fused_conv2d on CUDA: y = relu?(conv2d(x, weight, stride, padding) + bias[k] + residual),
// dilation 1, groups 1, one kernel launch, the epilogue fused into the GEMM's store.
//
// Layout. x, weight and residual are taken channels_last (NHWC, KRSC, NHWC; a no-op when they
// already are), the kernels write a channels_last y. The op returns y as is when x or weight is
// channels_last, else y.contiguous() (NCHW): the rule of csrc/common.h's is_channels_last_4d, the
// one the CPU kernel and the Python fake (deeparch_kernels/ops/conv.py) use.
//
// GEMM view: M = N*Ho*Wo output pixels x K output channels, reduction over R*S*C (im2col of x
// gathered on the fly, never materialised). Offsets into x, y and residual are int64_t.
//
// Kernels (device code in conv_*.cuh):
//  1. conv_tc_kernel<T, Tile> (conv_tc.cuh): fp16/bf16, tensor cores via mma.sync m16n8k16
//     (fp32 accumulate), 4-stage cp.async ring (16-byte copies, zero-fill for padding and
//     out-of-range rows/channels), XOR-swizzled shared memory read with ldmatrix.x4.
//     Chosen when: dtype fp16/bf16, C % 8 == 0, K % 8 == 0, C > 0, x/weight 16-byte aligned, the
//     device is sm_80 or newer, and the loaded binary of the kernel was compiled for compute_80
//     or newer (tc_binary_ok: its body is a trap otherwise). Tile and split-K from the wave count
//     (plan_tc in launch_plan.h: the tile, and slice count, whose busiest SM has the least work):
//       TcTileLarge 128x128x32, 8 warps (64x32 each), 64 KB smem, 2 blocks/SM: large layers;
//       TcTileSmall  64x64x32, 4 warps (32x32 each), 32 KB smem: few output tiles (batch-1 or
//                   7x7/14x14 layers) and K <= 64; with split-K when the tiles leave SMs idle:
//                   blockIdx.y slices the reduction, fp32 partials go to a workspace, and
//                   splitk_epilogue sums them and applies the epilogue.
//  2. conv_simt_kernel<T> (conv_simt.cuh): everything else (fp32, C or K % 8 != 0 such as C = 3
//     first layers, unaligned views, pre-sm_80 devices): 64x64x16 tiles, exact fp32 FMA.
//  Both end in Epilogue<T>::store (conv_common.cuh), the one fused epilogue: fp32
//  acc + bias + residual, ReLU that keeps NaN, one rounding to T, 16-byte stores on the TC path.
//
// Grid: 1-D over output tiles, output-channel tiles fastest. Host cost per call: the argument
// checks, .contiguous() views, one output allocation, the launch; the SM count and compute
// capability are read once per device, the >48 KB shared-memory opt-in is set once per kernel
// and device. No device synchronisation.
//
// The Hopper path (WGMMA + TMA, sm_90a) is the separate 'cutlass' backend: csrc/cuda/cutlass/.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../common.h"
#include "conv_common.cuh"
#include "conv_simt.cuh"
#include "conv_tc.cuh"
#include "launch_plan.h"

namespace deeparch {
namespace conv {
namespace {

constexpr const char* kOp = "fused_conv2d";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Multiprocessor count and compute capability major, read once per device.
struct DeviceInfo {
  int sm_count;
  int major;
};

DeviceInfo device_info(int dev) {
  constexpr int kMaxCached = 64;
  static std::array<std::atomic<int>, kMaxCached> sm_cache{};  // 0: not read yet
  static std::array<std::atomic<int>, kMaxCached> major_cache{};
  if (dev >= 0 && dev < kMaxCached) {
    const int sms = sm_cache[dev].load(std::memory_order_relaxed);
    if (sms > 0) return {sms, major_cache[dev].load(std::memory_order_relaxed)};
  }
  int sms = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (dev >= 0 && dev < kMaxCached) {
    major_cache[dev].store(major, std::memory_order_relaxed);
    sm_cache[dev].store(sms, std::memory_order_relaxed);  // published last: readers test it
  }
  return {sms, major};
}

// Raises the kernel's dynamic shared-memory limit above the 48 KB default, once per device.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes, int dev, std::atomic<uint64_t>& done) {
  if (bytes <= 48 * 1024) return;
  const uint64_t bit = (dev >= 0 && dev < 64) ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.fetch_or(bit, std::memory_order_release);
}

int grid_size(int64_t tiles_m, int64_t tiles_n) {
  const int64_t blocks = tiles_m * tiles_n;
  TORCH_CHECK(blocks <= INT_MAX, kOp, ": output too large for one launch (", blocks, " tiles)");
  return static_cast<int>(blocks);
}

// split > 1: `partial` is a (split, M, K) fp32 workspace; the tile kernel writes the slices'
// partial sums there and splitk_epilogue finishes.
template <typename T, typename Tile>
void launch_tc(const T* x, const T* w, const ConvShape& s, const Epilogue<T>& epi, int dev,
               cudaStream_t stream, int split = 1, float* partial = nullptr) {
  static std::atomic<uint64_t> smem_ready{0};  // one per instantiation
  const int tiles_n = static_cast<int>(ceil_div(s.K, Tile::BN));
  const int blocks = grid_size(ceil_div(s.M, Tile::BM), tiles_n);
  auto kernel = &conv_tc_kernel<T, Tile>;
  allow_dynamic_smem(kernel, Tile::SMEM_BYTES, dev, smem_ready);
  const dim3 grid(blocks, split);
  kernel<<<grid, Tile::THREADS, Tile::SMEM_BYTES, stream>>>(x, w, s, epi, tiles_n,
                                                             split > 1 ? partial : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (split > 1) {
    constexpr int kThreads = 256;
    const int64_t items = s.M * (s.K / 8);
    splitk_epilogue<T><<<grid_size(ceil_div(items, kThreads), 1), kThreads, 0, stream>>>(
        partial, s.M, s.K, split, epi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_simt(const T* x, const T* w, const ConvShape& s, const Epilogue<T>& epi,
                 cudaStream_t stream) {
  const int tiles_n = static_cast<int>(ceil_div(s.K, SimtTile::BN));
  const int blocks = grid_size(ceil_div(s.M, SimtTile::BM), tiles_n);
  conv_simt_kernel<T><<<blocks, SimtTile::THREADS, 0, stream>>>(x, w, s, epi, tiles_n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether conv_tc_kernel<T, Tile>'s binary, as loaded on device `dev`, has its tensor-core body
// (arch_refusal in launch_plan.h); checked once per kernel and device. When it has not, the
// reason is warned once and the SIMT kernel runs instead.
template <typename T, typename Tile>
bool tc_binary_ok(int dev) {
  constexpr int kMaxCached = 64;
  static std::array<std::atomic<int>, kMaxCached> state{};  // 0 unknown, 1 usable, 2 refused
  if (dev >= 0 && dev < kMaxCached) {
    const int known = state[dev].load(std::memory_order_relaxed);
    if (known != 0) return known == 1;
  }
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, conv_tc_kernel<T, Tile>);
  std::string why;
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the SIMT path reports its own launch errors
    why = std::string("conv_tc_kernel has no binary for this GPU (") + cudaGetErrorString(err) + ")";
  } else {
    why = arch_refusal("conv_tc_kernel", attr.ptxVersion, attr.binaryVersion, 80);
  }
  const int now = why.empty() ? 1 : 2;
  int expected = 0;
  const bool first = !(dev >= 0 && dev < kMaxCached) ||
                     state[dev].compare_exchange_strong(expected, now, std::memory_order_relaxed);
  if (!why.empty() && first) {
    TORCH_WARN(kOp, ": ", why, "; running the generic SIMT kernel instead (slower)");
  }
  return why.empty();
}

// Which kernel runs; see the file comment.
template <typename T>
void launch_conv(const T* x, const T* w, const ConvShape& s, const Epilogue<T>& epi, int dev,
                 cudaStream_t stream, const at::TensorOptions& opts) {
  if constexpr (!std::is_same<T, float>::value) {
    const bool tc_shape = s.C > 0 && s.C % 8 == 0 && s.K % 8 == 0;
    if (tc_shape && aligned16(x) && aligned16(w) && aligned16(epi.y)) {
      const DeviceInfo info = device_info(dev);
      const TcPlan plan = plan_tc(s.M, s.K, s.R, s.S, s.C, info.sm_count);
      const bool ok = info.major >= 8 && (plan.large ? tc_binary_ok<T, TcTileLarge>(dev)
                                                     : tc_binary_ok<T, TcTileSmall>(dev));
      if (ok) {
        if (plan.large) {
          launch_tc<T, TcTileLarge>(x, w, s, epi, dev, stream);
          return;
        }
        const int split = plan.split;
        if (split > 1) {
          // From the caching allocator, stream-ordered: freed on return, reused by the next call.
          const at::Tensor ws = at::empty({split, s.M, s.K}, opts.dtype(at::kFloat));
          float* partial = ws.mutable_data_ptr<float>();
          TORCH_CHECK(aligned16(partial), kOp, ": split-K workspace is not 16-byte aligned");
          launch_tc<T, TcTileSmall>(x, w, s, epi, dev, stream, split, partial);
        } else {
          launch_tc<T, TcTileSmall>(x, w, s, epi, dev, stream);
        }
        return;
      }
    }
  }
  launch_simt<T>(x, w, s, epi, stream);
}

bool pad_channels_enabled() {
  const char* v = std::getenv("DEEPARCH_CUDA_PAD_CHANNELS");  // read per call: tests flip it
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// t (N, C, H, W) channels_last, zero-padded to (N, Cp, H, W) channels_last.
at::Tensor pad_channels(const at::Tensor& t, int64_t Cp) {
  const int64_t C = t.size(1);
  at::Tensor out = at::empty({t.size(0), Cp, t.size(2), t.size(3)},
                             t.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.narrow(1, C, Cp - C).zero_();
  out.narrow(1, 0, C).copy_(t);
  return out;
}

at::Tensor fused_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, bool relu) {
  DA_CHECK_ARG(x.is_cuda(), kOp, "x must be a CUDA tensor, got device ", x.device());
  // rank 4, dtypes, same device and dtype for all, weight C == x C, stride >= 1, padding >= 0,
  // padded input >= kernel (so Ho, Wo >= 1), bias (K,), residual == output shape.
  check_fused_conv2d_args(kOp, x, weight, bias, residual, stride, padding);

  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = weight.size(0), R = weight.size(2), S = weight.size(3);
  const int64_t Hp = H + 2 * padding[0], Wp = W + 2 * padding[1];
  const int64_t Ho = (Hp - R) / stride[0] + 1, Wo = (Wp - S) / stride[1] + 1;
  // Per-dimension indices are int in the kernels (products are int64_t); the reduction loops
  // run up to R*S*C + 63, hence the margin.
  constexpr int64_t kDimLimit = INT_MAX, kReductionLimit = int64_t{INT_MAX} - 64;
  DA_CHECK_ARG(N <= kDimLimit && C <= kDimLimit && K <= kDimLimit && Hp <= kDimLimit &&
                   Wp <= kDimLimit && stride[0] <= kDimLimit && stride[1] <= kDimLimit &&
                   C <= kReductionLimit / std::max<int64_t>(1, R * S),  // R*S*C, no overflow
               kOp, "sizes too large for 32-bit per-dimension indexing: x ", x.sizes(),
               ", weight ", weight.sizes(), ", padding ", padding,
               " (each dimension, the padded height/width and C*kh*kw must be below 2^31)");

  const c10::cuda::CUDAGuard guard(x.device());
  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  const bool channels_last_out = is_channels_last_4d(x) || is_channels_last_4d(weight);
  at::Tensor xc = x.contiguous(kCL);
  at::Tensor wc = weight.contiguous(kCL);
  // DEEPARCH_CUDA_PAD_CHANNELS=1: C % 8 != 0 (the C = 3 stem) zero-padded to the next multiple
  // of 8, so that the tensor-core kernel runs instead of the SIMT one (exact: the added
  // channels are zero in x and in the weight). Costs a padded copy of x and of the weight per
  // call. Off by default: whether it is faster is not measured yet (scripts/gpu_check.sh does).
  const int64_t Cp = padded_channels(C, K, x.scalar_type() != at::kFloat, pad_channels_enabled());
  if (Cp != C) {
    xc = pad_channels(xc, Cp);
    wc = pad_channels(wc, Cp);
  }
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor rc = residual ? residual->contiguous(kCL) : at::Tensor();
  at::Tensor y = at::empty({N, K, Ho, Wo}, x.options().memory_format(kCL));
  if (y.numel() > 0) {
    ConvShape s{};
    s.N = static_cast<int>(N);
    s.H = static_cast<int>(H);
    s.W = static_cast<int>(W);
    s.C = static_cast<int>(Cp);
    s.K = static_cast<int>(K);
    s.R = static_cast<int>(R);
    s.S = static_cast<int>(S);
    s.Ho = static_cast<int>(Ho);
    s.Wo = static_cast<int>(Wo);
    s.sh = static_cast<int>(stride[0]);
    s.sw = static_cast<int>(stride[1]);
    s.ph = static_cast<int>(padding[0]);
    s.pw = static_cast<int>(padding[1]);
    s.M = N * Ho * Wo;
    const int dev = x.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float_types(x.scalar_type(), "fused_conv2d_cuda", [&](auto tag) {
      using T = decltype(tag);
      Epilogue<T> epi;
      epi.y = y.mutable_data_ptr<T>();
      epi.bias = bc.defined() ? bc.const_data_ptr<T>() : nullptr;
      epi.residual = rc.defined() ? rc.const_data_ptr<T>() : nullptr;
      epi.K = s.K;
      epi.relu = relu;
      epi.bias_vec = epi.bias != nullptr && aligned16(epi.bias);
      epi.res_vec = epi.residual != nullptr && aligned16(epi.residual);
      launch_conv<T>(xc.const_data_ptr<T>(), wc.const_data_ptr<T>(), s, epi, dev, stream,
                     x.options());
    });
  }
  return channels_last_out ? y : y.contiguous();
}

}  // namespace
}  // namespace conv

TORCH_LIBRARY_IMPL(deeparch, CUDA, m) { m.impl("fused_conv2d", &conv::fused_conv2d_cuda); }

}  // namespace deeparch
