// The bf16 instantiations of the CUTLASS sm_90a convolution (see conv_sm90_kernel.cuh).
#include "conv_sm90_kernel.cuh"

namespace deeparch {
namespace cutlass_sm90 {
namespace bf16 {
DEEPARCH_CUTLASS_SM90_ENTRY_POINTS(cutlass::bfloat16_t)
}  // namespace bf16
}  // namespace cutlass_sm90
}  // namespace deeparch
