// Inline-PTX wrappers for the sm_80+ tensor-core path (valid on sm_80 and sm_90):
// cp.async (16 bytes, zero-fill), ldmatrix.x4, mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate).
//
// Semantics relied on (PTX ISA, "cp.async", "ldmatrix", "Matrix Fragments for mma.m16n8k16 with
// floating point type"):
//  * cp.async.cg.shared.global [dst], [src], 16, src_size: copies src_size bytes and fills the
//    remaining 16 - src_size bytes of dst with zeros; src_size = 0 reads nothing (src must still
//    be a valid address expression; we pass the tensor's base). Completion is tracked per thread
//    by commit_group / wait_group N (wait until at most N of this thread's groups are pending);
//    other threads see the data only after a barrier that follows the wait.
//  * ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8*j + r supplies the address of row r (16
//    contiguous bytes) of matrix j; lane 4*r + c receives, in register j, the two b16 elements
//    (row r, columns 2c, 2c+1) of matrix j.
//  * mma.m16n8k16, with g = lane / 4, t = lane % 4:
//      A (16x16, row): a[0] = (row g,   k 2t..2t+1)   a[1] = (row g+8, k 2t..2t+1)
//                      a[2] = (row g,   k 2t+8..+9)   a[3] = (row g+8, k 2t+8..+9)
//      B (16x8, col):  b[0] = (k 2t..2t+1, col g)     b[1] = (k 2t+8..+9, col g)
//      C/D (16x8 f32): d[0..1] = (row g, cols 2t, 2t+1)   d[2..3] = (row g+8, cols 2t, 2t+1)
//    So ldmatrix.x4 over the four 8x8 quadrants of a 16x16 A tile (top-left, bottom-left,
//    top-right, bottom-right) yields a[0..3] directly, and over [n 0-7,k 0-7], [n 0-7,k 8-15],
//    [n 8-15,k 0-7], [n 8-15,k 8-15] of a B tile stored n-major (k contiguous) yields b[0..1] of
//    two adjacent n8 tiles.
#pragma once

#include <cstdint>

namespace deeparch {
namespace conv {
namespace ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a * b for one 16x8x16 tile; kBf16 picks bf16 inputs, fp16 otherwise.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace ptx
}  // namespace conv
}  // namespace deeparch
