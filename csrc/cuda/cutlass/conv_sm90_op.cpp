// deeparch::fused_conv2d_cutlass on CUDA: the CUTLASS 3.x sm_90a convolution (conv_sm90.h) as a
// torch op, with the schema, the fake and the autograd of deeparch::fused_conv2d (they are
// registered in deeparch_kernels/ops/conv.py, the schema's home).
//
// Host side of every call: the argument checks (those of fused_conv2d, then what the CUTLASS
// kernels can't run: the same refusals as the backend's supports() in ops/conv.py, which the
// dispatcher consults first); x, weight and residual made channels_last (a no-op when they
// are) and copied when their data is not 16-byte aligned (TMA needs it); one channels_last
// output; the tile from the wave count (choose_tile); the launch on the current stream. The
// output is returned channels_last when x or weight is, else contiguous: torch's conv2d rule
// (csrc/common.h is_channels_last_4d), as for the other backends.
//
// Also defines deeparch::_cutlass_conv_plan, a diagnostic op with no tensors (it runs on any
// machine, no GPU needed): what CUTLASS's ConvProblemShape and can_implement() make of a
// convolution, and the tile choose_tile takes, as a JSON string. The tests compare it with torch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "../../common.h"
#include "conv_sm90.h"

namespace deeparch {
namespace cutlass_sm90 {

TileInfo tile_info(DType dtype, Tile tile) {
  return dtype == DType::kHalf ? f16::tile_info(tile) : bf16::tile_info(tile);
}

Plan plan(DType dtype, Tile tile, const ConvDesc& d) {
  return dtype == DType::kHalf ? f16::plan(tile, d) : bf16::plan(tile, d);
}

int run(DType dtype, Tile tile, const ConvDesc& d, const ConvPtrs& p, cudaStream_t stream,
        cudaError_t* cuda_error) {
  return dtype == DType::kHalf ? f16::run(tile, d, p, stream, cuda_error)
                               : bf16::run(tile, d, p, stream, cuda_error);
}

namespace {

constexpr const char* kOp = "fused_conv2d_cutlass";
constexpr const char* kTileNames[kNumTiles] = {"128x128", "128x64", "64x128"};

// CTAs of a tile resident on one SM at a time: CUTLASS gives each as many pipeline stages as
// fit in shared memory, so this is 1 for every instantiated tile (227 KB per CTA, 228 KB per SM
// on sm_90, 1 KB of it reserved per CTA); threads and registers would allow no more either.
int ctas_per_sm(const TileInfo& t) {
  constexpr int kSmemPerSm = 228 * 1024, kReservedPerCta = 1024, kThreadsPerSm = 2048;
  return std::max(1, std::min(kSmemPerSm / (t.smem_bytes + kReservedPerCta),
                              kThreadsPerSm / std::max(1, t.threads)));
}

// Relative WGMMA throughput of one CTA per output element. A guess, not a measurement (no
// Hopper GPU has run these kernels yet): the 64-wide tiles issue half-size WGMMAs and reload
// their A or B operand twice as often per output.
double tile_efficiency(Tile t) { return t == Tile::k128x128 ? 1.0 : 0.85; }

// The tile with the least estimated time for an M x K output: waves of CTAs (tiles divided by
// the CTAs the GPU runs at once, rounded up: a partial last wave costs a full one) times the
// work of one CTA. E.g. on 132 SMs, 512 channels at 14x14 and batch 32 (M = 6272) is 196 tiles
// of 128x128 (1.5 waves, so 2) or 392 of 64x128 (2.97 waves, so 3 at half the work): 64x128;
// K = 64 layers take 128x64 (a 128-wide tile would be half padding); large layers 128x128.
// The same wave model as the other backends' (csrc/cuda/launch_plan.h, triton/conv.py).
Tile choose_tile(DType dtype, int64_t M, int64_t K, int sm_count) {
  // In order of preference on equal cost: 64x128 before 128x64 (one 64x128 WGMMA per k-step
  // rather than two 64x64 ones).
  constexpr Tile kOrder[kNumTiles] = {Tile::k128x128, Tile::k64x128, Tile::k128x64};
  Tile best = Tile::k128x128;
  double best_cost = INFINITY;
  for (const Tile t : kOrder) {
    const TileInfo info = tile_info(dtype, t);
    const int64_t tiles = ((M + info.tile_m - 1) / info.tile_m) * ((K + info.tile_n - 1) / info.tile_n);
    const int64_t slots = int64_t{std::max(1, sm_count)} * ctas_per_sm(info);
    const double waves = static_cast<double>((tiles + slots - 1) / slots);
    const double cost = waves * info.tile_m * info.tile_n / tile_efficiency(t);
    if (cost < best_cost) {
      best_cost = cost;
      best = t;
    }
  }
  return best;
}

DType dtype_of(at::ScalarType s) { return s == at::kHalf ? DType::kHalf : DType::kBFloat16; }

// What the CUTLASS kernels can't run, beyond fused_conv2d's own argument rules; empty when
// they can. The same rules as cutlass_refusal() in ops/conv.py (the backend's supports(), which
// the dispatcher asks first); the tests check both against CUTLASS's can_implement().
std::string refusal(at::ScalarType dtype, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                    int64_t R, int64_t S, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  std::ostringstream why;
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    // torch's Python names, as the Python side words it
    const char* name = dtype == at::kFloat ? "float32" : dtype == at::kDouble ? "float64"
                                                                              : c10::toString(dtype);
    why << "the CUTLASS kernels take float16 or bfloat16, got " << name;
  } else if (C <= 0 || C % 8 != 0 || K % 8 != 0) {
    why << "the CUTLASS kernels need C and K multiples of 8 (16-byte TMA rows), got C=" << C
        << ", K=" << K;
  } else if (sh > 8 || sw > 8) {
    why << "the CUTLASS kernels take strides up to 8 (TMA im2col traversal), got (" << sh << ", "
        << sw << ")";
  } else if (ph > 128 || pw > 128 || R - 1 - ph > 128 || S - 1 - pw > 128 || ph - (R - 1) > 127 ||
             pw - (S - 1) > 127 || R > 255 || S > 255) {
    why << "the CUTLASS kernels' TMA im2col corners need padding <= 128, kernel - 1 - padding "
           "<= 128 and kernel <= 255, got kernel ("
        << R << ", " << S << "), padding (" << ph << ", " << pw << ")";
  } else {
    const int64_t P = (H + 2 * ph - R) / sh + 1, Q = (W + 2 * pw - S) / sw + 1;
    constexpr int64_t kMaxElems = int64_t{1} << 38;  // TMA strides < 2^40 bytes
    if (N * H * W > INT_MAX || N * P * Q > INT_MAX || N * H * W * C >= kMaxElems ||
        N * P * Q * K >= kMaxElems) {
      why << "the CUTLASS kernels' extents are 32-bit: N*H*W and N*Ho*Wo must be below 2^31 and "
             "each tensor below 2^38 elements";
    }
  }
  return why.str();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Compute capability (major * 10 + minor) and SM count of a device, read once.
struct DeviceInfo {
  int cc;
  int sm_count;
};

DeviceInfo device_info(int dev) {
  constexpr int kMaxCached = 64;
  static std::array<std::atomic<int>, kMaxCached> cc_cache{}, sm_cache{};  // 0: not read yet
  if (dev >= 0 && dev < kMaxCached) {
    const int sms = sm_cache[dev].load(std::memory_order_acquire);
    if (sms > 0) return {cc_cache[dev].load(std::memory_order_relaxed), sms};
  }
  int major = 0, minor = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < kMaxCached) {
    cc_cache[dev].store(major * 10 + minor, std::memory_order_relaxed);
    sm_cache[dev].store(sms, std::memory_order_release);  // published last: readers test it
  }
  return {major * 10 + minor, sms};
}

// t itself when its data is 16-byte aligned, else an aligned copy (a view with an odd offset).
at::Tensor aligned(const at::Tensor& t) {
  if (!t.defined() || aligned16(t.const_data_ptr())) return t;
  return t.clone(t.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
}

at::Tensor fused_conv2d_cutlass(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual,
                                c10::IntArrayRef stride, c10::IntArrayRef padding, bool relu) {
  DA_CHECK_ARG(x.is_cuda(), kOp, "x must be a CUDA tensor, got device ", x.device());
  check_fused_conv2d_args(kOp, x, weight, bias, residual, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = weight.size(0), R = weight.size(2), S = weight.size(3);
  const std::string why = refusal(x.scalar_type(), N, C, H, W, K, R, S, stride[0], stride[1],
                                  padding[0], padding[1]);
  DA_CHECK_ARG(why.empty(), kOp, why);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo dev = device_info(x.get_device());
  DA_CHECK_ARG(dev.cc == 90, kOp,
               "the CUTLASS kernels are built for sm_90a (Hopper) only; this GPU is sm_", dev.cc);

  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  const bool channels_last_out = is_channels_last_4d(x) || is_channels_last_4d(weight);
  const at::Tensor xc = aligned(x.contiguous(kCL));
  const at::Tensor wc = aligned(weight.contiguous(kCL));
  const at::Tensor bc = bias ? aligned(bias->contiguous()) : at::Tensor();
  const at::Tensor rc = residual ? aligned(residual->contiguous(kCL)) : at::Tensor();
  const int64_t P = (H + 2 * padding[0] - R) / stride[0] + 1;
  const int64_t Q = (W + 2 * padding[1] - S) / stride[1] + 1;
  at::Tensor y = at::empty({N, K, P, Q}, x.options().memory_format(kCL));
  if (y.numel() == 0) return channels_last_out ? y : y.contiguous();

  const ConvDesc d{static_cast<int>(N), static_cast<int>(H), static_cast<int>(W),
                   static_cast<int>(C), static_cast<int>(K), static_cast<int>(R),
                   static_cast<int>(S), static_cast<int>(stride[0]), static_cast<int>(stride[1]),
                   static_cast<int>(padding[0]), static_cast<int>(padding[1])};
  const ConvPtrs p{xc.const_data_ptr(), wc.const_data_ptr(),
                   bc.defined() ? bc.const_data_ptr() : nullptr,
                   rc.defined() ? rc.const_data_ptr() : nullptr, y.mutable_data_ptr(), relu};
  const DType dt = dtype_of(x.scalar_type());
  const Tile tile = choose_tile(dt, N * P * Q, K, dev.sm_count);
  cudaError_t err = cudaSuccess;
  const int st = run(dt, tile, d, p, c10::cuda::getCurrentCUDAStream(), &err);
  TORCH_CHECK(st != kCannotImplement, kOp, ": CUTLASS's can_implement() refused x ", x.sizes(),
              ", weight ", weight.sizes(), ", stride ", stride, ", padding ", padding,
              " (a case supports() should have refused: please report it)");
  TORCH_CHECK(st == kOk, kOp, ": the CUTLASS ", kTileNames[static_cast<int>(tile)],
              " kernel failed to ", st == kSmemAttribute ? "set its shared memory size" : "launch",
              ": ", cudaGetErrorString(err),
              err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction
                  ? " (the extension's sm_90a binary can't run on this GPU)"
                  : "");
  return channels_last_out ? y : y.contiguous();
}

void json_array(std::ostringstream& o, const int64_t* v, int n) {
  o << "[";
  for (int i = 0; i < n; ++i) o << (i ? ", " : "") << v[i];
  o << "]";
}

// deeparch::_cutlass_conv_plan: see the file comment. x_shape (N, C, H, W), w_shape (K, C, R, S).
std::string cutlass_conv_plan(c10::IntArrayRef x_shape, c10::IntArrayRef w_shape,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              at::ScalarType dtype, int64_t sm_count) {
  TORCH_CHECK(x_shape.size() == 4 && w_shape.size() == 4 && stride.size() == 2 &&
                  padding.size() == 2,
              "_cutlass_conv_plan: x_shape and w_shape must have 4 entries, stride and padding 2");
  const int64_t N = x_shape[0], C = x_shape[1], H = x_shape[2], W = x_shape[3];
  const int64_t K = w_shape[0], R = w_shape[2], S = w_shape[3];
  const std::string why =
      refusal(dtype, N, C, H, W, K, R, S, stride[0], stride[1], padding[0], padding[1]);
  const DType dt = dtype_of(dtype);
  const ConvDesc d{static_cast<int>(N), static_cast<int>(H), static_cast<int>(W),
                   static_cast<int>(C), static_cast<int>(K), static_cast<int>(R),
                   static_cast<int>(S), static_cast<int>(stride[0]), static_cast<int>(stride[1]),
                   static_cast<int>(padding[0]), static_cast<int>(padding[1])};
  const int64_t P = (H + 2 * padding[0] - R) / stride[0] + 1;
  const int64_t Q = (W + 2 * padding[1] - S) / stride[1] + 1;
  const Tile chosen = choose_tile(dt, N * P * Q, K, static_cast<int>(sm_count));
  std::ostringstream o;
  o << "{\"refusal\": \"" << why << "\", \"tile\": \"" << kTileNames[static_cast<int>(chosen)]
    << "\", \"tiles\": {";
  for (int i = 0; i < kNumTiles; ++i) {
    const Tile t = static_cast<Tile>(i);
    const TileInfo ti = tile_info(dt, t);
    const Plan pl = plan(dt, t, d);
    o << (i ? ", " : "") << "\"" << kTileNames[i] << "\": {\"tile\": [" << ti.tile_m << ", "
      << ti.tile_n << ", " << ti.tile_k << "], \"threads\": " << ti.threads
      << ", \"smem_bytes\": " << ti.smem_bytes << ", \"stages\": " << ti.stages
      << ", \"ctas_per_sm\": " << ctas_per_sm(ti)
      << ", \"can_implement\": " << (pl.can_implement ? "true" : "false") << ", \"shape_A\": ";
    json_array(o, pl.shape_A, 4);
    o << ", \"stride_A\": ";
    json_array(o, pl.stride_A, 4);
    o << ", \"shape_B\": ";
    json_array(o, pl.shape_B, 4);
    o << ", \"stride_B\": ";
    json_array(o, pl.stride_B, 4);
    o << ", \"shape_C\": ";
    json_array(o, pl.shape_C, 4);
    o << ", \"stride_C\": ";
    json_array(o, pl.stride_C, 4);
    const int64_t gemm[3] = {pl.gemm_m, pl.gemm_n, pl.gemm_k};
    o << ", \"gemm_mnk\": ";
    json_array(o, gemm, 3);
    o << ", \"grid\": ";
    json_array(o, pl.grid, 3);
    o << "}";
  }
  o << "}}";
  return o.str();
}

}  // namespace
}  // namespace cutlass_sm90

TORCH_LIBRARY_FRAGMENT(deeparch, m) {
  m.def("_cutlass_conv_plan(int[] x_shape, int[] w_shape, int[2] stride, int[2] padding, "
        "ScalarType dtype, int sm_count) -> str",
        &cutlass_sm90::cutlass_conv_plan);
}

TORCH_LIBRARY_IMPL(deeparch, CUDA, m) {
  m.impl("fused_conv2d_cutlass", &cutlass_sm90::fused_conv2d_cutlass);
}

}  // namespace deeparch
