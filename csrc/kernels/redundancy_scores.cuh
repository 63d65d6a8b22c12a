// Key-redundancy score R (reference section 2.2) for gkv::redundancy_scores. Three kernels:
//   1. inv_norm: per slot 1 / (||k|| + 1e-6) in fp32, or -1 for an empty slot (pos < 0) and for
//      the padding slots [N, Np) of the tile grid, so one array carries norm and validity.
//   2. gram: one pass over the Gram matrix in 64 x 64 tiles. A block owns 64 rows and walks all
//      column tiles; c_ij = (k_i . k_j) * inv_i * inv_j, c_ii = 0. Per row i it keeps the sum of
//      c_ij over valid j and the largest valid j with c_ij > threshold (with that c). Since c is
//      symmetric, that row maximum is the column exemption m*(j) of the method, found by a
//      parallel max-reduction, not a sequential scan. bf16/fp16 keys with d % 16 == 0 use tensor
//      cores (mma.sync m16n8k16 on the raw keys, fp32 accumulation: the products of two 16-bit
//      values are exact, so c agrees with an fp32 computation to rounding); fp32 keys and d = 8
//      use FFMA.
//   3. finalize: per (b, h), scatter-subtract the exempted entries, then the masked softmax with
//      temperature |V|; 0 at empty slots, all 0 when no slot is valid.
// No torch headers: raw pointers, sizes, a stream, a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"

namespace gkv::kernels {

constexpr int kRedTile = 64;  // rows and columns of a Gram tile

// Slots of the inv_norm workspace per head: N rounded up to the tile.
inline int64_t redundancy_padded_len(int64_t n) { return (n + kRedTile - 1) / kRedTile * kRedTile; }

// k [rows, N, D], pos [rows, N] int32 -> inv [rows, Np] fp32. One warp per slot.
template <typename T, int D>
__global__ void inv_norm_kernel(const T* __restrict__ k, const int* __restrict__ pos, int64_t rows,
                                int N, int Np, float* __restrict__ inv) {
  const int64_t slot = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (slot >= rows * Np) return;
  const int64_t r = slot / Np;
  const int j = static_cast<int>(slot - r * Np);
  const bool valid = j < N && pos[r * N + j] >= 0;
  float ss = 0.f;
  if (valid) {
    const T* key = k + (r * N + j) * D;
    for (int e = lane; e < D; e += 32) {
      const float x = to_float(key[e]);
      ss += x * x;
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) inv[slot] = valid ? 1.f / (sqrtf(ss) + 1e-6f) : -1.f;
}

// Running per-row state of the Gram pass.
struct RowState {
  float sum = 0.f;     // sum of c_ij over valid j
  int last = -1;       // largest valid j with c_ij > threshold, -1 if none
  float last_c = 0.f;  // c at that j
};

// Folds c_ij into row i's state; columns arrive in ascending j within a thread.
__device__ __forceinline__ void visit(RowState& s, float dot, float inv_i, float inv_j, int i,
                                      int j, float threshold) {
  if (inv_j < 0.f) return;  // empty slot or past N
  const float c = i == j ? 0.f : dot * inv_i * inv_j;
  s.sum += c;
  if (c > threshold) {
    s.last = j;
    s.last_c = c;
  }
}

// Combines the states of the lanes (xor distances < width) that share a row.
template <int Width>
__device__ __forceinline__ void reduce_lanes(RowState& s) {
#pragma unroll
  for (int off = 1; off < Width; off <<= 1) {
    const float sum = __shfl_xor_sync(0xffffffffu, s.sum, off);
    const int last = __shfl_xor_sync(0xffffffffu, s.last, off);
    const float last_c = __shfl_xor_sync(0xffffffffu, s.last_c, off);
    s.sum += sum;
    if (last > s.last) {
      s.last = last;
      s.last_c = last_c;
    }
  }
}

__device__ __forceinline__ void store_row(const RowState& s, int64_t at, float* rowsum, int* last,
                                          float* last_c) {
  rowsum[at] = s.sum;
  last[at] = s.last;
  last_c[at] = s.last_c;
}

// ---- FFMA path (fp32 keys, or d not a multiple of 16) -----------------------------------------

constexpr int kFfmaThreads = 256;
constexpr int kFfmaPitch = kRedTile + 1;  // transposed tiles [D][65]: conflict-free stores

template <int D>
constexpr size_t ffma_smem_bytes() {
  return (2 * D * kFfmaPitch + kRedTile) * sizeof(float);
}

// 64 keys from row0 on, as fp32, transposed: dst[e * kFfmaPitch + key]; zeros past N.
template <typename T, int D>
__device__ __forceinline__ void load_transposed(const T* kr, int row0, int N, float* dst) {
  for (int e = threadIdx.x; e < kRedTile * D; e += kFfmaThreads) {
    const int key = e / D, c = e - key * D;
    const int j = row0 + key;
    dst[c * kFfmaPitch + key] = j < N ? to_float(kr[int64_t(j) * D + c]) : 0.f;
  }
}

// Block (head r, row tile): thread (tx, ty) owns rows ty*4 + 0..3 and columns tx + 16*0..3 of
// each tile; the 16 lanes with one ty reduce together.
template <typename T, int D>
__global__ void __launch_bounds__(kFfmaThreads)
    gram_ffma_kernel(const T* __restrict__ k, const float* __restrict__ inv, int N, int Np,
                     float threshold, float* __restrict__ rowsum, int* __restrict__ last,
                     float* __restrict__ last_c) {
  extern __shared__ float smem_f[];
  float* sA = smem_f;                     // [D][kFfmaPitch]
  float* sB = sA + D * kFfmaPitch;        // [D][kFfmaPitch]
  float* sInv = sB + D * kFfmaPitch;      // [kRedTile]
  const int64_t r = blockIdx.x;
  const int i0 = blockIdx.y * kRedTile;
  const T* kr = k + r * N * D;
  const float* inv_r = inv + r * Np;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  load_transposed<T, D>(kr, i0, N, sA);
  RowState st[4];
  float inv_i[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) inv_i[a] = inv_r[i0 + ty * 4 + a];

  for (int j0 = 0; j0 < Np; j0 += kRedTile) {
    __syncthreads();  // the previous tile is no longer read
    load_transposed<T, D>(kr, j0, N, sB);
    if (threadIdx.x < kRedTile) sInv[threadIdx.x] = inv_r[j0 + threadIdx.x];
    __syncthreads();
    float acc[4][4] = {};
#pragma unroll 8
    for (int e = 0; e < D; ++e) {
      float a[4], b[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        a[x] = sA[e * kFfmaPitch + ty * 4 + x];
        b[x] = sB[e * kFfmaPitch + tx + 16 * x];
      }
#pragma unroll
      for (int x = 0; x < 4; ++x) {
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(a[x], b[y], acc[x][y]);
      }
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) {
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        visit(st[x], acc[x][y], inv_i[x], sInv[tx + 16 * y], i0 + ty * 4 + x, j0 + tx + 16 * y,
              threshold);
      }
    }
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    reduce_lanes<16>(st[x]);
    const int i = i0 + ty * 4 + x;
    if (tx == 0 && i < N) store_row(st[x], r * N + i, rowsum, last, last_c);
  }
}

// ---- Tensor-core path (bf16 / fp16 keys, d % 16 == 0) -----------------------------------------

constexpr int kMmaThreads = 128;  // 4 warps x 16 rows

template <int D>
constexpr int mma_pitch() { return D + 8; }  // 16-byte row padding: conflict-free ldmatrix

template <int D>
constexpr size_t mma_smem_bytes() {
  return 3 * kRedTile * mma_pitch<D>() * 2 + 2 * kRedTile * sizeof(float);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = fill ? 16 : 0;  // 0: write zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&frag)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(addr));
}

// acc += A (16x16, row) * B (16x8, col), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 64 keys from row0 on into dst [64][pitch] (zeros past N), and their 64 inv values.
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(const T* kr, const float* inv_r, int row0, int N,
                                                T* dst, float* dst_inv) {
  constexpr int kChunks = D * 2 / 16;  // 16-byte chunks per key
  constexpr int kPer = 16 / 2;         // elements per chunk
  for (int e = threadIdx.x; e < kRedTile * kChunks; e += kMmaThreads) {
    const int key = e / kChunks, c = e - key * kChunks;
    const int j = row0 + key;
    const bool in = j < N;
    cp_async16(dst + key * mma_pitch<D>() + c * kPer, kr + int64_t(in ? j : 0) * D + c * kPer, in);
  }
  if (dst_inv != nullptr && threadIdx.x < kRedTile / 4) {
    cp_async16(dst_inv + threadIdx.x * 4, inv_r + row0 + threadIdx.x * 4, true);
  }
}

// Block (head r, row tile of 64): warp w owns rows 16w..16w+15, keeps their A fragments in
// registers, and walks the column tiles, double-buffered through cp.async. Accumulator layout of
// m16n8k16: lane (g = lane/4, t = lane%4) holds rows g and g+8, columns 2t and 2t+1 of each n8
// chunk; the 4 lanes of one g reduce together.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads)
    gram_mma_kernel(const T* __restrict__ k, const float* __restrict__ inv, int N, int Np,
                    float threshold, float* __restrict__ rowsum, int* __restrict__ last,
                    float* __restrict__ last_c) {
  constexpr int P = mma_pitch<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);                   // [64][P]
  T* sB = sA + kRedTile * P;                                // [2][64][P]
  float* sInv = reinterpret_cast<float*>(sB + 2 * kRedTile * P);  // [2][64]
  const int64_t r = blockIdx.x;
  const int i0 = blockIdx.y * kRedTile;
  const T* kr = k + r * N * D;
  const float* inv_r = inv + r * Np;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  load_tile_async<T, D>(kr, inv_r, i0, N, sA, nullptr);
  load_tile_async<T, D>(kr, inv_r, 0, N, sB, sInv);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t a[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(a[kk], sA + (warp * 16 + (lane & 15)) * P + kk * 16 + (lane >> 4) * 8);
  }
  const int row_lo = i0 + warp * 16 + g, row_hi = row_lo + 8;
  const float inv_lo = inv_r[row_lo], inv_hi = inv_r[row_hi];
  RowState lo, hi;

  const int tiles = Np / kRedTile;
  for (int tile = 0; tile < tiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < tiles) {
      load_tile_async<T, D>(kr, inv_r, (tile + 1) * kRedTile, N, sB + (buf ^ 1) * kRedTile * P,
                            sInv + (buf ^ 1) * kRedTile);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* b = sB + buf * kRedTile * P;
    float acc[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {  // two n8 chunks per ldmatrix.x4
        uint32_t bf[4];
        ldmatrix_x4(bf, b + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * P + kk * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_16816<T>(acc[2 * np], a[kk], bf[0], bf[1]);
        mma_16816<T>(acc[2 * np + 1], a[kk], bf[2], bf[3]);
      }
    }
    const float* iv = sInv + buf * kRedTile;
    const int j0 = tile * kRedTile;
#pragma unroll
    for (int nc = 0; nc < 8; ++nc) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int cl = nc * 8 + 2 * t + q;
        const float inv_j = iv[cl];
        visit(lo, acc[nc][q], inv_lo, inv_j, row_lo, j0 + cl, threshold);
        visit(hi, acc[nc][2 + q], inv_hi, inv_j, row_hi, j0 + cl, threshold);
      }
    }
    __syncthreads();  // buffer `buf` is refilled at the next iteration
  }
  reduce_lanes<4>(lo);
  reduce_lanes<4>(hi);
  if (t == 0 && row_lo < N) store_row(lo, r * N + row_lo, rowsum, last, last_c);
  if (t == 0 && row_hi < N) store_row(hi, r * N + row_hi, rowsum, last, last_c);
}

// ---- Finalize ---------------------------------------------------------------------------------

constexpr int kFinalThreads = 1024;

// Block-wide reduction helpers for kFinalThreads threads; scratch: 32 floats of shared memory.
template <bool IsMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  x = IsMax ? warp_max(x) : warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kFinalThreads / 32 ? scratch[lane] : (IsMax ? -INFINITY : 0.f);
  x = IsMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch is reused by the next call
  return x;
}

// One block per head: raw = rowsum minus the exempted entries, R = softmax over valid slots of
// raw / |V|.
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const float* __restrict__ inv, int N, int Np, float* __restrict__ rowsum,
                    const int* __restrict__ last, const float* __restrict__ last_c,
                    float* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float* inv_r = inv + r * Np;
  float* raw = rowsum + r * N;
  float* out_r = out + r * N;
  for (int j = threadIdx.x; j < N; j += kFinalThreads) {
    const int m = last[r * N + j];
    if (inv_r[j] >= 0.f && m >= 0) atomicAdd(raw + m, -last_c[r * N + j]);
  }
  __syncthreads();
  float count = 0.f, mx = -INFINITY;
  for (int j = threadIdx.x; j < N; j += kFinalThreads) {
    if (inv_r[j] >= 0.f) {
      count += 1.f;
      mx = fmaxf(mx, __ldcg(raw + j));
    }
  }
  count = block_reduce<false>(count, scratch);
  mx = block_reduce<true>(mx, scratch);
  if (count == 0.f) {
    for (int j = threadIdx.x; j < N; j += kFinalThreads) out_r[j] = 0.f;
    return;
  }
  const float inv_temp = 1.f / count;
  float sum = 0.f;
  for (int j = threadIdx.x; j < N; j += kFinalThreads) {
    if (inv_r[j] >= 0.f) sum += expf((__ldcg(raw + j) - mx) * inv_temp);
  }
  sum = block_reduce<false>(sum, scratch);
  const float inv_sum = 1.f / sum;
  for (int j = threadIdx.x; j < N; j += kFinalThreads) {
    out_r[j] = inv_r[j] >= 0.f ? expf((__ldcg(raw + j) - mx) * inv_temp) * inv_sum : 0.f;
  }
}

// ---- Launcher ---------------------------------------------------------------------------------

// k [rows, N, D] contiguous, pos [rows, N] int32 contiguous -> out [rows, N] fp32.
// Workspaces: inv [rows, Np] with Np = redundancy_padded_len(N); rowsum, last_c [rows, N] fp32;
// last [rows, N] int32. rows <= 2^31 - 1, ceil(N / 64) <= 65535.
template <typename T, int D>
cudaError_t redundancy_scores(const T* k, const int* pos, int64_t rows, int N, float threshold,
                              float* inv, float* rowsum, int* last, float* last_c, float* out,
                              cudaStream_t stream) {
  if (rows == 0 || N == 0) return cudaSuccess;
  const int Np = static_cast<int>(redundancy_padded_len(N));
  const int64_t warps = rows * Np;
  inv_norm_kernel<T, D><<<ceil_div(warps * 32, 256), 256, 0, stream>>>(k, pos, rows, N, Np, inv);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(Np / kRedTile));
  cudaError_t err;
  if constexpr (std::is_same_v<T, float> || D % 16 != 0) {
    constexpr size_t smem = ffma_smem_bytes<D>();
    err = cudaFuncSetAttribute(gram_ffma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    gram_ffma_kernel<T, D><<<grid, kFfmaThreads, smem, stream>>>(k, inv, N, Np, threshold,
                                                                 rowsum, last, last_c);
  } else {
    constexpr size_t smem = mma_smem_bytes<D>();
    err = cudaFuncSetAttribute(gram_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    gram_mma_kernel<T, D><<<grid, kMmaThreads, smem, stream>>>(k, inv, N, Np, threshold, rowsum,
                                                               last, last_c);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finalize_kernel<<<static_cast<unsigned>(rows), kFinalThreads, 0, stream>>>(inv, N, Np, rowsum,
                                                                             last, last_c, out);
  return cudaGetLastError();
}

}  // namespace gkv::kernels
