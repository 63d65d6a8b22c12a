// Pieces shared by the lifetime_attention forward and backward kernels: tensor-core fragments
// (mma.sync m16n8k16, ldmatrix), cp.async tile loads, and the per-key-tile death statistics that
// let a kernel skip tiles nobody sees. No torch headers.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B 16x8:  b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C 16x8:  c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// so two neighbouring C tiles of probabilities, packed to 16 bits, are an A fragment.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/ptx.cuh"

namespace gkv::kernels::lifetime {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ceil(a / b) for non-negative ints, in host and device code.
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------- statistics

// Per (b, h, key tile of `tile` keys): x = min death (0 for keys past T, so a partial tile never
// counts as fully visible), y = max death. A query tile [i0, i1] may skip the key tile when
// y <= i0, and needs no per-element mask when the tile ends at or before i0 and x > i1.
// death [B*Hkv, T] -> stats [B*Hkv, n_tiles]
__global__ void tile_stats_kernel(const int32_t* __restrict__ death, int2* __restrict__ stats,
                                  int64_t rows, int T, int tile, int n_tiles) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * n_tiles) return;
  const int64_t row = idx / n_tiles;
  const int j0 = static_cast<int>(idx % n_tiles) * tile;
  const int32_t* d = death + row * T;
  int lo = j0 + tile <= T ? INT32_MAX : 0, hi = INT32_MIN;
  for (int j = j0; j < min(j0 + tile, T); ++j) {
    lo = min(lo, d[j]);
    hi = max(hi, d[j]);
  }
  stats[idx] = make_int2(lo, hi);
}

inline cudaError_t launch_tile_stats(const int32_t* death, int2* stats, int64_t rows, int T,
                                     int tile, cudaStream_t stream) {
  const int n_tiles = cdiv(T, tile);
  const int64_t total = rows * n_tiles;
  if (total == 0) return cudaSuccess;
  tile_stats_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      death, stats, rows, T, tile, n_tiles);
  return cudaGetLastError();
}

// D_i = sum_c dO[i, c] * O[i, c] in fp32, one warp per row. dout/out [rows, D] -> delta [rows]
template <typename T, int D>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                             float* __restrict__ delta, int64_t rows) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float acc = 0.f;
  for (int c = lane; c < D; c += 32) {
    acc += to_float(dout[row * D + c]) * to_float(out[row * D + c]);
  }
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

// ---------------------------------------------------------------------- tensor-core primitives

// The lane's row address for the three ways a 16x16 block of a row-major shared tile `s` (row
// stride `ld` elements) is read; r0/c0 is the block's corner.
// A operand, rows = m, cols = k: r[0..3] = a[0..3].
template <typename T>
__device__ __forceinline__ const T* frag_a_ptr(const T* s, int ld, int r0, int c0, int lane) {
  return s + (r0 + (lane & 8) + (lane & 7)) * ld + c0 + ((lane >> 4) << 3);
}
// B operand stored [n][k] (rows = n): r[0..1] = b of n-tile r0, r[2..3] = b of n-tile r0 + 8.
template <typename T>
__device__ __forceinline__ const T* frag_b_nk_ptr(const T* s, int ld, int r0, int c0, int lane) {
  return s + (r0 + ((lane >> 4) << 3) + (lane & 7)) * ld + c0 + (lane & 8);
}
// B operand stored [k][n] (rows = k), read with .trans: r[0..1] = b of n-tile c0, r[2..3] of
// n-tile c0 + 8.
template <typename T>
__device__ __forceinline__ const T* frag_b_kn_ptr(const T* s, int ld, int r0, int c0, int lane) {
  return s + (r0 + (lane & 8) + (lane & 7)) * ld + c0 + ((lane >> 4) << 3);
}

// c[0 .. N/8) += A (one 16x16 fragment, k block kk) times the k block kk of a shared tile stored
// [N][k]: one k step of S = Q K^T-like products.
template <typename T, int N>
__device__ __forceinline__ void mma_nk_tile(float (&c)[N / 8][4], const uint32_t (&a)[4],
                                            const T* tile, int ld, int kk, int lane) {
#pragma unroll
  for (int nt = 0; nt < N / 16; ++nt) {
    uint32_t bf[4];
    ldmatrix_x4(bf, frag_b_nk_ptr(tile, ld, nt * 16, kk * 16, lane));
    mma_m16n8k16<T>(c[2 * nt], a, bf[0], bf[1]);
    mma_m16n8k16<T>(c[2 * nt + 1], a, bf[2], bf[3]);
  }
}

// Accumulator tiles 2kt and 2kt + 1 (fp32, 16 x 16 together) packed to T: the A fragment of the
// next product (P V-like), with no trip through shared memory.
template <typename T, int N>
__device__ __forceinline__ void acc_as_a(const float (&c)[N / 8][4], int kt, uint32_t (&a)[4]) {
  a[0] = pack2<T>(c[2 * kt][0], c[2 * kt][1]);
  a[1] = pack2<T>(c[2 * kt][2], c[2 * kt][3]);
  a[2] = pack2<T>(c[2 * kt + 1][0], c[2 * kt + 1][1]);
  a[3] = pack2<T>(c[2 * kt + 1][2], c[2 * kt + 1][3]);
}

// acc[0 .. D/8) += A (k block kt) times the rows [16 kt, 16 kt + 16) of a shared tile stored
// [k][D]: one k step of O += P V-like products.
template <typename T, int D>
__device__ __forceinline__ void mma_kn_tile(float (&acc)[D / 8][4], const uint32_t (&a)[4],
                                            const T* tile, int ld, int kt, int lane) {
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    uint32_t bf[4];
    ldmatrix_x4_trans(bf, frag_b_kn_ptr(tile, ld, kt * 16, dn * 16, lane));
    mma_m16n8k16<T>(acc[2 * dn], a, bf[0], bf[1]);
    mma_m16n8k16<T>(acc[2 * dn + 1], a, bf[2], bf[3]);
  }
}

// Rows [r0, r0 + R) of a row-major [n_rows, D] matrix into a shared tile with row stride LD;
// rows past n_rows read as 0 (so masked probabilities never meet garbage).
template <typename T, int R, int D, int LD, int kThreads>
__device__ __forceinline__ void load_rows_async(T* s, const T* g, int r0, int n_rows, int tid) {
  constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per row
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  for (int c = tid; c < R * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * kPer;
    const bool valid = r0 + r < n_rows;
    cp_async16(s + r * LD + col, g + static_cast<int64_t>(valid ? r0 + r : 0) * D + col, valid);
  }
}

// n values [i0, i0 + n) of a vector into shared memory; past `len` they read as 0.
template <typename V, int N, int kThreads>
__device__ __forceinline__ void load_vec_async(V* s, const V* g, int i0, int len, int tid) {
  static_assert(sizeof(V) == 4, "4-byte elements");
  for (int c = tid; c < N; c += kThreads) {
    const bool valid = i0 + c < len;
    cp_async4(s + c, g + (valid ? i0 + c : 0), valid);
  }
}

}  // namespace gkv::kernels::lifetime
