// Inline-PTX wrappers shared by the tensor-core kernels (sm_80+): asynchronous global -> shared
// copies, ldmatrix fragment loads and the m16n8k16 mma with fp32 accumulators. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace gkv::kernels {

// Asynchronous global -> shared copies of 16 or 4 bytes; with valid = false nothing is read (the
// source must still be a mapped address) and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 16-bit matrices from shared memory; lane i gives the row address of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Two floats as one register of two 16-bit values (lo in the low half); T is bf16 or fp16.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// c += a * b: A 16x16 (row), B 16x8 (col), fp32 accumulators; T is bf16 or fp16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Hopper's warpgroup MMA (wgmma, sm_90a only: the callers compile these under
// GKV_HAVE_WGMMA). Operands come from shared memory through descriptors; both are K-major tiles
// whose rows are 128 bytes (64 16-bit values), swizzled in 1024-byte atoms of 8 rows: 16-byte
// piece c of row r at c ^ (r & 7), which needs the tile to start 1024-byte aligned.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GKV_HAVE_WGMMA 1
#else
#define GKV_HAVE_WGMMA 0
#endif

// Descriptor of such a tile at shared address `addr`: 128-byte swizzle (bits 62-63 = 1), 1024
// bytes between 8-row groups (bits 32-45, in 16-byte units); the leading offset (bits 16-29) is
// unused with this swizzle. A k16 step inside the rows is addr + 32 bytes.
__device__ __forceinline__ uint64_t wgmma_desc_k_major_sw128(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// The wrappers below trap where wgmma is not compiled in (callers branch on GKV_HAVE_WGMMA);
// they exist in every build so that the branch not taken still names declared functions.
#if GKV_HAVE_WGMMA
#define GKV_SM90A_ASM(...) asm volatile(__VA_ARGS__)
#else
#define GKV_SM90A_ASM(...) __trap()
#endif
// Orders this thread's earlier shared-memory writes (cp.async copies that have landed) before
// the tensor cores' reads; each writer runs it before the barrier that publishes the tile.
__device__ __forceinline__ void fence_proxy_async_shared() {
  GKV_SM90A_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  GKV_SM90A_ASM("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  GKV_SM90A_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  GKV_SM90A_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The 32 accumulators of m64n64, as asm operands %0-%31 (the descriptors are %32, %33).
#define GKV_WGMMA_D32 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),\
    "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),\
    "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),\
    "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),\
    "+f"(d[30]), "+f"(d[31])
#define GKV_WGMMA_D32_LIST                                                          \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23," \
  "%24,%25,%26,%27,%28,%29,%30,%31}"

// d[64 x 64] += A[64 x 16] B[16 x 64]^T, both K-major in shared memory, fp32 accumulators:
// thread t of the warpgroup holds rows 16 (t / 32) + (t % 32) / 4 (+ 8 for d[4j + 2, 3]) and
// columns 8 j + 2 (t % 4) + {0, 1} of d[4j .. 4j + 3], j = 0..7.
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t a, uint64_t b) {
  // scale-d 1 (accumulate), scale-a/b 1, both operands K-major (no transpose).
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    GKV_SM90A_ASM("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " GKV_WGMMA_D32_LIST
                  ", %32, %33, 1, 1, 1, 0, 0;\n"
                  : GKV_WGMMA_D32
                  : "l"(a), "l"(b));
  } else {
    GKV_SM90A_ASM("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " GKV_WGMMA_D32_LIST
                  ", %32, %33, 1, 1, 1, 0, 0;\n"
                  : GKV_WGMMA_D32
                  : "l"(a), "l"(b));
  }
}
#undef GKV_WGMMA_D32
#undef GKV_WGMMA_D32_LIST
#undef GKV_SM90A_ASM

}  // namespace gkv::kernels
