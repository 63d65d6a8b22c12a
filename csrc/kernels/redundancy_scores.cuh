// Key-redundancy score R (reference section 2.2) for gkv::redundancy_scores. Three kernels:
//   1. inv_norm: per slot 1 / (||k|| + 1e-6) in fp32, or NaN for an empty slot (pos < 0) and for
//      the padding slots [N, Np) of the tile grid, so one array carries norm and validity (a NaN
//      makes every c with that slot NaN, which fails every "> threshold" test).
//   2. gram: one pass over the Gram matrix. A block owns 64 (FFMA) or 128 (mma) rows and walks
//      64-column tiles; c_ij = (k_i . k_j) * inv_i * inv_j, c_ii = 0. Per row i it keeps the
//      sum of c_ij over valid j and the largest valid j with c_ij > threshold (with that c). As c
//      is symmetric, that row maximum is the column exemption m*(j) of the method, found by a
//      parallel max-reduction, not a sequential scan. bf16/fp16 keys with d % 16 == 0 use tensor
//      cores (mma.sync m16n8k16 on the raw keys, fp32 accumulation: the products of two 16-bit
//      values are exact, so c agrees with an fp32 computation to rounding), with the columns
//      split over up to kMaxSplits blocks per row tile to fill the GPU; fp32 keys and d = 8 use
//      FFMA over all columns.
//   3. finalize: per (b, h), merge the column splits, scatter-subtract the exempted entries, then
//      the masked softmax with temperature |V|; 0 at empty slots, all 0 when no slot is valid.
// No torch headers: raw pointers, sizes, a stream, a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/ptx.cuh"

namespace gkv::kernels {

constexpr int kRedTile = 64;  // rows and columns of a Gram tile

// Slots of the inv_norm workspace per head: N rounded up to the tile.
inline int64_t redundancy_padded_len(int64_t n) { return (n + kRedTile - 1) / kRedTile * kRedTile; }

// Lanes per slot of inv_norm: one 16-byte chunk of the key each (a power of two, <= 32).
template <typename T, int D>
constexpr int inv_norm_lanes() {
  constexpr int chunks = D * int(sizeof(T)) / 16;
  return chunks < 32 ? chunks : 32;
}

// k [rows, N, D] (16-byte aligned), pos [rows, N] int32 -> inv [rows, Np] fp32. A group of
// inv_norm_lanes() lanes per slot, 16-byte loads. No early exit: the whole warp shuffles.
template <typename T, int D>
__global__ void inv_norm_kernel(const T* __restrict__ k, const int* __restrict__ pos, int64_t rows,
                                int N, int Np, float* __restrict__ inv) {
  constexpr int kLanes = inv_norm_lanes<T, D>();
  constexpr int kVec = 16 / int(sizeof(T));
  static_assert(D % kVec == 0 && kLanes >= 1 && 32 % kLanes == 0, "bad inv_norm lane split");
  const int64_t slot = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kLanes;
  const int sub = threadIdx.x % kLanes;
  const bool in_range = slot < rows * Np;
  const int64_t r = slot / Np;
  const int j = static_cast<int>(slot - r * Np);
  const bool valid = in_range && j < N && pos[r * N + j] >= 0;
  float ss = 0.f;
  if (valid) {
    const uint4* key = reinterpret_cast<const uint4*>(k + (r * N + j) * D);
    for (int c = sub; c < D / kVec; c += kLanes) {
      const uint4 v = key[c];
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int x = 0; x < kVec; ++x) {
        const float f = to_float(e[x]);
        ss = fmaf(f, f, ss);
      }
    }
  }
#pragma unroll
  for (int off = 1; off < kLanes; off <<= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (in_range && sub == 0) {
    inv[slot] = valid ? 1.f / (sqrtf(ss) + 1e-6f) : __int_as_float(0x7fc00000);
  }
}

// Running per-row state of the Gram pass.
struct RowState {
  float sum = 0.f;     // sum of c_ij over valid j (the mma path scales by inv_i at the end)
  int last = -1;       // largest valid j with c_ij > threshold, -1 if none
  float last_c = 0.f;  // c at that j (the mma path: c / inv_i until the end)
};

// Folds c_ij into row i's state; columns arrive in ascending j within a thread.
__device__ __forceinline__ void visit(RowState& s, float dot, float inv_i, float inv_j, int i,
                                      int j, float threshold) {
  if (!(inv_j >= 0.f)) return;  // empty slot or past N (NaN)
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

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
// Rows per warp: two m16 tiles, so every B fragment read from shared memory feeds two mma (half
// the shared-memory traffic of one m16 tile per warp, which capped the tensor cores).
constexpr int kWarpRows = 32;
constexpr int kMmaRows = kWarpRows * kMmaWarps;  // rows per block = the two 64-key buffers
constexpr int kMmaMinBlocks = 3;                 // blocks per SM: caps registers at 168
// Column splits of the Gram pass: blocks of one row tile that walk disjoint column ranges and
// write partial row states, merged by finalize. They fill the last wave of a small grid
// (32 heads x 17 row tiles = 544 blocks is 2.06 waves of 264 on an H100 without them).
constexpr int kMaxSplits = 8;

template <int D>
constexpr int mma_pitch() { return D + 8; }  // 16-byte row padding: conflict-free ldmatrix

// Two 64-key buffers (the 128 A rows pass through them first) and two 64-float inv tiles.
template <int D>
constexpr size_t mma_smem_bytes() {
  return 2 * kRedTile * mma_pitch<D>() * 2 + 2 * kRedTile * sizeof(float);
}




// n_keys keys from row0 on into dst [n_keys][pitch] (zeros past N); with dst_inv, also the 64
// inv values from row0 on (inside the padded [0, Np) range).
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(const T* kr, int row0, int n_keys, int N, T* dst,
                                                const float* inv_r, float* dst_inv) {
  constexpr int kChunks = D * 2 / 16;  // 16-byte chunks per key
  constexpr int kPer = 16 / 2;         // elements per chunk
  for (int e = threadIdx.x; e < n_keys * kChunks; e += kMmaThreads) {
    const int key = e / kChunks, c = e - key * kChunks;
    const int j = row0 + key;
    const bool in = j < N;
    cp_async16(dst + key * mma_pitch<D>() + c * kPer, kr + int64_t(in ? j : 0) * D + c * kPer, in);
  }
  if (dst_inv != nullptr && threadIdx.x < kRedTile / 4) {
    cp_async16(dst_inv + threadIdx.x * 4, inv_r + row0 + threadIdx.x * 4, true);
  }
}

// Folds one accumulator of the mma path into its row state. Both the row sum and the candidate
// c are kept unscaled by inv_i (scaled once at the end): the sum takes dot * w_j (w_j = inv_j,
// 0 for an empty slot), the threshold test compares dot * inv_j (NaN for an empty slot or past
// N) with threshold / inv_i. Diag: the tile may hold i == j, whose c is 0.
template <bool Diag>
__device__ __forceinline__ void fold(RowState& s, float dot, float thr_i, float inv_j, float w_j,
                                     int i, int j) {
  float cj = dot * inv_j;
  if (Diag && i == j) {
    cj = 0.f;
    w_j = 0.f;
  }
  s.sum = fmaf(dot, w_j, s.sum);
  if (cj > thr_i) {
    s.last = j;
    s.last_c = cj;
  }
}

// Folds NC n8 chunks of the warp's two m16 tiles, columns j0 .. j0 + 8 * NC - 1 (iv: their inv
// values), in ascending column order within the thread; each column's inv is read once for the
// four rows of the thread.
template <bool Diag, int NC>
__device__ __forceinline__ void fold_tile(const float (&acc)[2][NC][4], const float* iv, int j0,
                                          int t, const int (&row_lo)[2], const float (&thr_lo)[2],
                                          const float (&thr_hi)[2], RowState (&lo)[2],
                                          RowState (&hi)[2]) {
#pragma unroll
  for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int cl = nc * 8 + 2 * t + q;
      const float inv_j = iv[cl];
      const float w_j = fmaxf(inv_j, 0.f);  // NaN -> 0
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        fold<Diag>(lo[m], acc[m][nc][q], thr_lo[m], inv_j, w_j, row_lo[m], j0 + cl);
        fold<Diag>(hi[m], acc[m][nc][2 + q], thr_hi[m], inv_j, w_j, row_lo[m] + 8, j0 + cl);
      }
    }
  }
}

// Block (head r = blockIdx.x, 128 rows from blockIdx.y, column split blockIdx.z): warp w owns
// rows 32w..32w+31 as two m16 tiles and keeps their A fragments in registers (loaded once
// through the B buffers), then walks its split's column tiles, double-buffered through
// cp.async, in two halves of 32 columns (fewer accumulator registers, same B traffic).
// Accumulator layout of m16n8k16: lane (g = lane/4, t = lane%4) holds rows g and g+8, columns 2t
// and 2t+1 of each n8 chunk; the 4 lanes of one g reduce together. The partial row states go
// to split blockIdx.z of rowsum / last / last_c [splits, rows, N].
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads, kMmaMinBlocks)
    gram_mma_kernel(const T* __restrict__ k, const float* __restrict__ inv, int N, int Np,
                    float threshold, int tiles_per_split, float* __restrict__ rowsum,
                    int* __restrict__ last, float* __restrict__ last_c) {
  constexpr int P = mma_pitch<D>();
  constexpr int kHalfChunks = kRedTile / 16;  // n8 chunks per 32-column half
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sB = reinterpret_cast<T*>(smem_raw);                         // [2][64][P]
  float* sInv = reinterpret_cast<float*>(sB + 2 * kRedTile * P);  // [2][64]
  const int64_t r = blockIdx.x;
  const int i0 = blockIdx.y * kMmaRows;
  const int tile_begin = blockIdx.z * tiles_per_split;
  const int tile_end = min(tile_begin + tiles_per_split, Np / kRedTile);
  const T* kr = k + r * N * D;
  const float* inv_r = inv + r * Np;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  load_tile_async<T, D>(kr, i0, kMmaRows, N, sB, nullptr, nullptr);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int wrow0 = i0 + warp * kWarpRows;
  uint32_t a[2][D / 16][4];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      ldmatrix_x4(a[m][kk],
                  sB + (warp * kWarpRows + m * 16 + (lane & 15)) * P + kk * 16 + (lane >> 4) * 8);
    }
  }
  __syncthreads();  // the buffers now take column tiles
  if (tile_begin < tile_end) {
    load_tile_async<T, D>(kr, tile_begin * kRedTile, kRedTile, N, sB, inv_r, sInv);
  }
  cp_async_commit();

  // c_ij > threshold is tested as c_ij / inv_i > threshold / inv_i: one multiply per element.
  // inv_i > 0 for a valid row; an empty row (NaN) or a row past N (0) is never stored.
  int row_lo[2];
  float inv_lo[2], inv_hi[2], thr_lo[2], thr_hi[2];
  RowState lo[2], hi[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    row_lo[m] = wrow0 + m * 16 + g;
    inv_lo[m] = row_lo[m] < N ? inv_r[row_lo[m]] : 0.f;
    inv_hi[m] = row_lo[m] + 8 < N ? inv_r[row_lo[m] + 8] : 0.f;
    thr_lo[m] = threshold / inv_lo[m];
    thr_hi[m] = threshold / inv_hi[m];
  }
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int buf = (tile - tile_begin) & 1;
    if (tile + 1 < tile_end) {
      load_tile_async<T, D>(kr, (tile + 1) * kRedTile, kRedTile, N, sB + (buf ^ 1) * kRedTile * P,
                            inv_r, sInv + (buf ^ 1) * kRedTile);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* b = sB + buf * kRedTile * P;
    const int j0 = tile * kRedTile;
    const float* iv = sInv + buf * kRedTile;
    // Warp-uniform: the diagonal i == j crosses this warp's 32 x 64 tile.
    const bool diag = j0 + kRedTile > wrow0 && j0 < wrow0 + kWarpRows;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float acc[2][kHalfChunks][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kHalfChunks / 2; ++np) {  // two n8 chunks per ldmatrix.x4
          uint32_t bf[4];
          ldmatrix_x4(bf, b + (half * 32 + np * 16 + (lane >> 4) * 8 + (lane & 7)) * P +
                              kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma_m16n8k16<T>(acc[m][2 * np], a[m][kk], bf[0], bf[1]);
            mma_m16n8k16<T>(acc[m][2 * np + 1], a[m][kk], bf[2], bf[3]);
          }
        }
      }
      if (diag) {
        fold_tile<true>(acc, iv + half * 32, j0 + half * 32, t, row_lo, thr_lo, thr_hi, lo, hi);
      } else {
        fold_tile<false>(acc, iv + half * 32, j0 + half * 32, t, row_lo, thr_lo, thr_hi, lo, hi);
      }
    }
    __syncthreads();  // buffer `buf` is refilled at the next iteration
  }
  const int64_t out0 = (blockIdx.z * int64_t(gridDim.x) + r) * N;
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    reduce_lanes<4>(lo[m]);
    reduce_lanes<4>(hi[m]);
    lo[m].sum *= inv_lo[m];
    lo[m].last_c *= inv_lo[m];
    hi[m].sum *= inv_hi[m];
    hi[m].last_c *= inv_hi[m];
    if (t == 0 && row_lo[m] < N) store_row(lo[m], out0 + row_lo[m], rowsum, last, last_c);
    if (t == 0 && row_lo[m] + 8 < N) store_row(hi[m], out0 + row_lo[m] + 8, rowsum, last, last_c);
  }
}

// Column splits for the mma pass: minimises (waves of blocks) x (tiles per block + 1, the +1
// for the A load and the stores), over split counts whose splits are all non-empty.
inline int redundancy_choose_splits(int64_t row_blocks, int tiles, int64_t slots) {
  int best = 1;
  int64_t best_cost = -1;
  for (int s = 1; s <= kMaxSplits && s <= tiles; ++s) {
    const int per = ceil_div(tiles, s);
    if (ceil_div(tiles, per) != s) continue;  // some split would be empty
    const int64_t waves = (row_blocks * s + slots - 1) / slots;
    const int64_t cost = waves * (per + 1);
    if (best_cost < 0 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
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

// One block per head: merges the column splits (the sums into split 0; the exemption from the
// highest split with a hit, as splits cover ascending column ranges), raw = rowsum minus the
// exempted entries, R = softmax over valid slots of raw / |V|. rowsum, last, last_c:
// [splits, rows, N].
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const float* __restrict__ inv, int N, int Np, int splits,
                    float* __restrict__ rowsum, const int* __restrict__ last,
                    const float* __restrict__ last_c, float* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t split_stride = int64_t(gridDim.x) * N;
  const float* inv_r = inv + r * Np;
  float* raw = rowsum + r * N;
  float* out_r = out + r * N;
  if (splits > 1) {
    for (int j = threadIdx.x; j < N; j += kFinalThreads) {
      float s = raw[j];
      for (int sp = 1; sp < splits; ++sp) s += raw[sp * split_stride + j];
      raw[j] = s;
    }
    __syncthreads();  // the scatter below may hit any slot's merged sum
  }
  for (int j = threadIdx.x; j < N; j += kFinalThreads) {
    if (!(inv_r[j] >= 0.f)) continue;
    for (int sp = splits - 1; sp >= 0; --sp) {
      const int64_t at = sp * split_stride + r * N + j;
      const int m = last[at];
      if (m >= 0) {
        atomicAdd(raw + m, -last_c[at]);
        break;
      }
    }
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

template <typename T, int D>
constexpr bool redundancy_uses_mma() {
  return !std::is_same_v<T, float> && D % 16 == 0;
}

// Column splits the launcher will run with for rows heads of N slots on the current device (1 on
// the FFMA path); size the workspace with it.
template <typename T, int D>
cudaError_t redundancy_splits(int64_t rows, int N, int* splits) {
  *splits = 1;
  if constexpr (redundancy_uses_mma<T, D>()) {
    if (rows == 0 || N == 0) return cudaSuccess;
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    // Blocks per SM depend on the kernel and the architecture only: asked once per process, off
    // the host path of later calls (a GPU of another architecture in the same process may get a
    // worse split count, never a wrong result).
    static std::atomic<int> per_sm_cache{0};
    int per_sm = per_sm_cache.load(std::memory_order_relaxed);
    if (per_sm == 0) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gram_mma_kernel<T, D>,
                                                          kMmaThreads, mma_smem_bytes<D>());
      if (err != cudaSuccess) return err;
      per_sm = per_sm > 0 ? per_sm : 1;
      per_sm_cache.store(per_sm, std::memory_order_relaxed);
    }
    const int tiles = static_cast<int>(redundancy_padded_len(N) / kRedTile);
    *splits = redundancy_choose_splits(rows * ceil_div(N, kMmaRows), tiles, int64_t(sms) * per_sm);
  }
  return cudaSuccess;
}

// Floats of workspace for rows heads of N slots and `splits` column splits: inv [rows, Np],
// then rowsum, last_c (fp32) and last (int32), each [splits, rows, N].
inline int64_t redundancy_workspace_floats(int64_t rows, int64_t N, int splits) {
  return rows * redundancy_padded_len(N) + 3 * int64_t(splits) * rows * N;
}

// k [rows, N, D] contiguous and 16-byte aligned, pos [rows, N] int32 contiguous -> out [rows, N]
// fp32. splits from redundancy_splits<T, D>; workspace: redundancy_workspace_floats(rows, N,
// splits) floats. rows <= 2^31 - 1, ceil(N / 64) <= 65535.
template <typename T, int D>
cudaError_t redundancy_scores(const T* k, const int* pos, int64_t rows, int N, float threshold,
                              int splits, float* workspace, float* out, cudaStream_t stream) {
  if (rows == 0 || N == 0) return cudaSuccess;
  const int Np = static_cast<int>(redundancy_padded_len(N));
  const int tiles = Np / kRedTile;
  if (splits < 1 || splits > kMaxSplits || splits > tiles ||
      (!redundancy_uses_mma<T, D>() && splits != 1)) {
    return cudaErrorInvalidValue;
  }
  float* inv = workspace;
  float* rowsum = inv + rows * Np;
  float* last_c = rowsum + splits * rows * N;
  int* last = reinterpret_cast<int*>(last_c + splits * rows * N);
  const int64_t inv_threads = rows * Np * inv_norm_lanes<T, D>();
  inv_norm_kernel<T, D><<<ceil_div(inv_threads, 256), 256, 0, stream>>>(k, pos, rows, N, Np, inv);
  cudaError_t err;
  if constexpr (!redundancy_uses_mma<T, D>()) {
    constexpr size_t smem = ffma_smem_bytes<D>();
    err = cudaFuncSetAttribute(gram_ffma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(N, kRedTile)));
    gram_ffma_kernel<T, D><<<grid, kFfmaThreads, smem, stream>>>(k, inv, N, Np, threshold,
                                                                 rowsum, last, last_c);
  } else {
    constexpr size_t smem = mma_smem_bytes<D>();  // < 48 KB: no opt-in needed
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(N, kMmaRows)),
                    static_cast<unsigned>(splits));
    gram_mma_kernel<T, D><<<grid, kMmaThreads, smem, stream>>>(
        k, inv, N, Np, threshold, ceil_div(tiles, splits), rowsum, last, last_c);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finalize_kernel<<<static_cast<unsigned>(rows), kFinalThreads, 0, stream>>>(
      inv, N, Np, splits, rowsum, last, last_c, out);
  return cudaGetLastError();
}

}  // namespace gkv::kernels
