// The CUTLASS 3.x sm_90a convolution kernels, as types, and their host-side launch. Included by
// one translation unit per dtype (conv_sm90_f16.cu, conv_sm90_bf16.cu), which setup.py compiles
// for sm_90a only, with -DNDEBUG (device asserts would serialise the WGMMA pipeline).
//
// Per (dtype T, tile):
//  * mainloop: cutlass::conv::collective::CollectiveBuilder<Sm90, OpClassTensorOp, kFprop, ...>
//    with KernelScheduleAuto, which resolves to KernelImplicitTmaWarpSpecializedSm90: a producer
//    warp issues TMA im2col loads of x (UTMALDG...IM2COL) and tiled loads of the KRSC filter into
//    a multi-stage shared-memory ring, consumer warpgroups run WGMMA (HGMMA) with fp32
//    accumulators. (CUTLASS 4.2 has no persistent Cooperative/Pingpong schedule for conv, and a
//    128x256 tile spills under this one, so tiles stay <= 128x128.) Stages: as many as fit
//    beside the epilogue's shared memory (StageCountAutoCarveout).
//  * epilogue: TMA warp-specialised, fused through the epilogue visitor tree as
//    LinCombPerColBiasEltAct:  y = act(beta * residual + (alpha * acc + bias[k])), alpha = 1,
//    bias per GEMM column (the output channel k is the GEMM N mode; a null bias adds 0), the
//    residual as the C source with beta = 1, or beta = 0 and no C load at all without one
//    (CUTLASS clears the fragment then). act is ReluIf below: torch.relu's NaN-keeping ReLU, or
//    the identity, chosen at run time, so one instantiation covers every epilogue of the op.
//    Everything in fp32; the sum is rounded once to T before the ReLU (which commutes with it).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"

#include "../relu.cuh"
#include "conv_sm90.h"

namespace deeparch {
namespace cutlass_sm90 {

// The activation of the fused epilogue: relu_keep_nan (torch.relu: NaN passes) when enabled,
// the identity otherwise. CUTLASS's Sm90Compute hands it its Arguments (the runtime flag).
template <class T>
struct ReluIf {
  struct Arguments {
    bool enabled = true;
  };
  CUTLASS_HOST_DEVICE T operator()(T const& v, Arguments const& args) const {
    return args.enabled ? relu_keep_nan(v) : v;
  }
};

template <class T, int N>
struct ReluIf<cutlass::Array<T, N>> {
  using Arguments = typename ReluIf<T>::Arguments;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v,
                                                      Arguments const& args) const {
    cutlass::Array<T, N> out;
    ReluIf<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = op(v[i], args);
    return out;
  }
};

template <Tile kTile>
struct TileShapeOf;
template <>
struct TileShapeOf<Tile::k128x128> {
  using type = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
};
template <>
struct TileShapeOf<Tile::k128x64> {
  using type = cute::Shape<cute::_128, cute::_64, cute::Shape<cute::_64>>;
};
template <>
struct TileShapeOf<Tile::k64x128> {
  using type = cute::Shape<cute::_64, cute::_128, cute::Shape<cute::_64>>;
};

template <class T, Tile kTile>
struct ConvKernel {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;  // 16-byte TMA alignment
  using TileShape = typename TileShapeOf<kTile>::type;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Layout = cutlass::layout::TensorNHWC;
  using FusionOp = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<ReluIf, T, float, T, T, float>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, Layout, kAlign, T, Layout,
      kAlign, cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, T,
      Layout, kAlign, T, Layout, kAlign, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel =
      cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  using Arguments = typename Conv::Arguments;
};

template <class ProblemShape>
ProblemShape make_problem(const ConvDesc& d) {
  return ProblemShape(cutlass::conv::Mode::kCrossCorrelation, {d.N, d.H, d.W, d.C},
                      {d.K, d.R, d.S, d.C}, {d.pad_h, d.pad_w}, {d.pad_h, d.pad_w},
                      {d.stride_h, d.stride_w}, {1, 1}, /*groups=*/1);
}

template <class CK>
typename CK::Arguments make_arguments(const ConvDesc& d, const ConvPtrs& p) {
  using Element = typename CK::Kernel::ElementA;
  using StrideC = typename CK::Kernel::StrideC;
  using StrideD = typename CK::Kernel::StrideD;
  const auto problem = make_problem<typename CK::ProblemShape>(d);
  // C/D strides ((q, p, n), k) from the problem's NPQK strides, as CUTLASS's conv testbed does.
  constexpr int kRankT = CK::ProblemShape::RankT;
  StrideC dC{};
  StrideD dD{};
  cute::for_each(cute::make_seq<cute::rank<0>(StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(dC) = problem.stride_C[kRankT - 2 - i];
    cute::get<0, i>(dD) = problem.stride_C[kRankT - 2 - i];
  });
  auto* y = static_cast<Element*>(p.y);
  // Without a residual, beta = 0: CUTLASS skips the C load. It still builds a TMA descriptor
  // for C, so C points at y (a valid, aligned address of the right shape) rather than null.
  const auto* c = p.residual != nullptr ? static_cast<const Element*>(p.residual) : y;
  typename CK::Arguments args{
      problem,
      {static_cast<const Element*>(p.x), static_cast<const Element*>(p.w)},
      {{}, c, dC, y, dD}};
  auto& epi = args.epilogue.thread;
  epi.alpha = 1.f;
  epi.beta = p.residual != nullptr ? 1.f : 0.f;
  epi.bias_ptr = static_cast<const Element*>(p.bias);  // nullptr: CUTLASS adds its default 0
  epi.activation.enabled = p.relu;
  return args;
}

template <class T, Tile kTile>
TileInfo tile_info_of() {
  using CK = ConvKernel<T, kTile>;
  return {cute::size<0>(typename CK::TileShape{}), cute::size<1>(typename CK::TileShape{}),
          cute::size<2>(typename CK::TileShape{}), static_cast<int>(CK::Kernel::MaxThreadsPerBlock),
          static_cast<int>(CK::Kernel::SharedStorageSize), CK::Conv::kStages};
}

template <class T, Tile kTile>
Plan plan_of(const ConvDesc& d) {
  using CK = ConvKernel<T, kTile>;
  const ConvPtrs dummy{};  // can_implement looks at shapes and strides only
  const auto args = make_arguments<CK>(d, dummy);
  const auto& ps = args.problem_shape;
  Plan out{};
  out.can_implement = CK::Conv::can_implement(args) == cutlass::Status::kSuccess;
  for (int i = 0; i < 4; ++i) {
    out.shape_A[i] = ps.shape_A[i];
    out.stride_A[i] = ps.stride_A[i];
    out.shape_B[i] = ps.shape_B[i];
    out.stride_B[i] = ps.stride_B[i];
    out.shape_C[i] = ps.shape_C[i];
    out.stride_C[i] = ps.stride_C[i];
  }
  out.gemm_m = int64_t{ps.shape_C[0]} * ps.shape_C[1] * ps.shape_C[2];
  out.gemm_n = ps.shape_C[3];
  out.gemm_k = int64_t{ps.shape_B[1]} * ps.shape_B[2] * ps.shape_B[3];
  // The grid the kernel's tile scheduler launches (host arithmetic only).
  const auto tm = cute::size<0>(typename CK::TileShape{});
  const auto tn = cute::size<1>(typename CK::TileShape{});
  out.grid[0] = (out.gemm_m + tm - 1) / tm;
  out.grid[1] = (out.gemm_n + tn - 1) / tn;
  out.grid[2] = 1;
  return out;
}

// Raises the kernel's dynamic shared memory limit once per device (the adapter's initialize()
// would do it on every call).
template <class CK>
cudaError_t opt_in_smem() {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && done[dev].load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(cutlass::device_kernel<typename CK::Kernel>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(CK::Kernel::SharedStorageSize));
  if (err == cudaSuccess && cached) done[dev].store(true, std::memory_order_release);
  return err;
}

template <class T, Tile kTile>
int run_of(const ConvDesc& d, const ConvPtrs& p, cudaStream_t stream, cudaError_t* cuda_error) {
  using CK = ConvKernel<T, kTile>;
  *cuda_error = cudaSuccess;
  const auto args = make_arguments<CK>(d, p);
  if (CK::Conv::can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
  const cudaError_t smem = opt_in_smem<CK>();
  if (smem != cudaSuccess) {
    *cuda_error = smem;
    return kSmemAttribute;
  }
  // No workspace: the non-persistent kernel needs none (get_workspace_size is 0).
  auto params = CK::Kernel::to_underlying_arguments(args, nullptr);
  const cutlass::Status st = CK::Conv::run(params, stream);
  if (st != cutlass::Status::kSuccess) {
    *cuda_error = cudaGetLastError();
    return kLaunch;
  }
  return kOk;
}

// The three entry points of one dtype's translation unit.
#define DEEPARCH_CUTLASS_SM90_ENTRY_POINTS(T)                                                   \
  TileInfo tile_info(Tile tile) {                                                               \
    switch (tile) {                                                                             \
      case Tile::k128x128: return tile_info_of<T, Tile::k128x128>();                            \
      case Tile::k128x64: return tile_info_of<T, Tile::k128x64>();                              \
      default: return tile_info_of<T, Tile::k64x128>();                                         \
    }                                                                                           \
  }                                                                                             \
  Plan plan(Tile tile, const ConvDesc& d) {                                                     \
    switch (tile) {                                                                             \
      case Tile::k128x128: return plan_of<T, Tile::k128x128>(d);                                \
      case Tile::k128x64: return plan_of<T, Tile::k128x64>(d);                                  \
      default: return plan_of<T, Tile::k64x128>(d);                                             \
    }                                                                                           \
  }                                                                                             \
  int run(Tile tile, const ConvDesc& d, const ConvPtrs& p, cudaStream_t s, cudaError_t* err) { \
    switch (tile) {                                                                             \
      case Tile::k128x128: return run_of<T, Tile::k128x128>(d, p, s, err);                      \
      case Tile::k128x64: return run_of<T, Tile::k128x64>(d, p, s, err);                        \
      default: return run_of<T, Tile::k64x128>(d, p, s, err);                                   \
    }                                                                                           \
  }

}  // namespace cutlass_sm90
}  // namespace deeparch
