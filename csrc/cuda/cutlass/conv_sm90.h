// The CUTLASS 3.x sm_90a convolution (TMA im2col loads, WGMMA, warp-specialised; the epilogue
// bias + residual + ReLU fused through CUTLASS's epilogue visitor tree), seen from the host.
//
// A plain C++ interface with no torch or CUTLASS types, so that the kernel translation units
// (conv_sm90_f16.cu, conv_sm90_bf16.cu: CUTLASS headers, compiled for sm_90a only, see setup.py)
// and the torch op (conv_sm90_op.cpp: argument checks, layouts, tile choice) compile apart.
//
// Tensors are NHWC activations x (N, H, W, C), KRSC filters w (K, R, S, C), NPQK output y and
// residual (N, P, Q, K), all packed, 16-byte aligned, C % 8 == 0 and K % 8 == 0.
//   y = relu?(conv(x, w) + bias[k] + residual)
// bias == nullptr adds nothing; residual == nullptr runs the epilogue with beta = 0 (CUTLASS
// then never loads the C source); relu is a runtime flag of the same instantiation.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace deeparch {
namespace cutlass_sm90 {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// The instantiated tile shapes (GEMM M = output pixels x GEMM N = output channels x BK 64).
enum class Tile : int {
  k128x128 = 0,  // large layers
  k128x64 = 1,   // K <= 64 layers (half of a 128-wide tile would be padding)
  k64x128 = 2,   // few output pixels (late layers): twice the CTAs of 128x128
};
constexpr int kNumTiles = 3;

struct TileInfo {
  int tile_m, tile_n, tile_k;
  int threads;     // per CTA
  int smem_bytes;  // dynamic shared memory per CTA (mainloop stages + epilogue)
  int stages;      // mainloop pipeline depth CUTLASS's StageCountAutoCarveout chose
};

struct ConvDesc {
  int N, H, W, C;      // activation
  int K, R, S;         // filter
  int stride_h, stride_w;
  int pad_h, pad_w;    // symmetric (torch's padding): CUTLASS's lower and upper padding
};

struct ConvPtrs {
  const void* x;
  const void* w;
  const void* bias;      // (K,) or nullptr
  const void* residual;  // (N, P, Q, K) or nullptr
  void* y;               // (N, P, Q, K)
  bool relu;
};

// What CUTLASS itself makes of a ConvDesc (host only, no GPU needed): its ConvProblemShape's
// tensors and the kernel's can_implement() verdict. The tests compare it with torch's conv2d.
struct Plan {
  bool can_implement;
  int64_t shape_A[4], stride_A[4];  // activation NHWC
  int64_t shape_B[4], stride_B[4];  // filter KRSC
  int64_t shape_C[4], stride_C[4];  // output / residual NPQK
  int64_t gemm_m, gemm_n, gemm_k;   // N*P*Q, K, R*S*C
  int64_t grid[3];                  // CTAs per dimension
};

// Status codes of run(): 0 success, else one of these (cuda_error holds the CUDA error, if any).
enum Status : int {
  kOk = 0,
  kCannotImplement = 1,  // can_implement() refused the problem
  kSmemAttribute = 2,    // cudaFuncSetAttribute (dynamic shared memory opt-in) failed
  kLaunch = 3,           // the launch failed
};

TileInfo tile_info(DType dtype, Tile tile);
Plan plan(DType dtype, Tile tile, const ConvDesc& d);
int run(DType dtype, Tile tile, const ConvDesc& d, const ConvPtrs& p, cudaStream_t stream,
        cudaError_t* cuda_error);

// The kernel translation units' entry points (one per dtype); the functions above dispatch.
namespace f16 {
TileInfo tile_info(Tile tile);
Plan plan(Tile tile, const ConvDesc& d);
int run(Tile tile, const ConvDesc& d, const ConvPtrs& p, cudaStream_t stream, cudaError_t* err);
}  // namespace f16
namespace bf16 {
TileInfo tile_info(Tile tile);
Plan plan(Tile tile, const ConvDesc& d);
int run(Tile tile, const ConvDesc& d, const ConvPtrs& p, cudaStream_t stream, cudaError_t* err);
}  // namespace bf16

}  // namespace cutlass_sm90
}  // namespace deeparch
