// Key-redundancy score R (reference section 2.2) for gkv::redundancy_scores. Three kernels:
//   1. inv_norm: per slot 1 / (||k|| + 1e-6) in fp32, or NaN for an empty slot (pos < 0) and for
//      the padding slots [N, Np) of the tile grid, so one array carries norm and validity (a NaN
//      makes every c with that slot NaN, which fails every "> threshold" test). Each block also
//      sums inv_j k_j over its valid slots: the parts of S = sum_j inv_j k_j.
//   2. gram: the row sums need no Gram matrix, as they are linear in the keys:
//      sum_{j != i} c_ij = inv_i (k_i . S) - inv_i^2 ||k_i||^2 over valid j, taken per row from
//      S. The Gram matrix c_ij = (k_i . k_j) * inv_i * inv_j, c_ii = 0, in 64-column tiles, is
//      needed only for the exemptions: per row i, the largest valid j with c_ij > threshold (with
//      that c). As c is symmetric, that row maximum is the column exemption m*(j) of the method,
//      found by a parallel max-reduction, not a sequential scan.
//      bf16/fp16 keys with d % 16 == 0 use tensor cores (mma.sync m16n8k16 on the raw keys, fp32
//      accumulation: the products of two 16-bit values are exact, so c agrees with an fp32
//      computation to rounding) over one triangle only: the block of rows [i0, i0 + 128) walks
//      the columns from i0 on and hands every tile right of its rows to those columns too
//      (c_ji = c_ij), through an integer atomic max (independent of the blocks' order).
//      Its column range is cut into chunks spread over blocks to fill the GPU. fp32 keys and
//      d = 8 use FFMA over the whole matrix.
//      Carried exemptions (a cache between compressions): c_ij of two keys never changes, so the
//      exemptions of the slots [0, M) that survived the last compression, among themselves, are
//      still right unless the key they name was evicted. Then only the M..N-1 fresh rows walk
//      all the columns (the fresh pass: about (N - M) / (N / 2) of the triangle's work), and the
//      slots whose carried exemption was evicted and that no fresh row hit are listed and walk
//      the columns [0, M) (the listed pass); a fresh row's hit beats any carried one, as it is
//      later. The fresh pass also writes every slot's row sum.
//   3. finalize: per (b, h), merge the chunks, the handed-on column parts and the carried
//      exemptions, scatter-subtract the exempted entries, then the masked softmax with
//      temperature |V|; 0 at empty slots, all 0 when no slot is valid.
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

// Lanes per slot of inv_norm: one 16-byte chunk of the key each (a key is at most 512 bytes).
template <typename T, int D>
constexpr int inv_norm_lanes() {
  return D * int(sizeof(T)) / 16;
}

constexpr int kInvNormThreads = 256;
constexpr int kInvNormSlots = 4;  // slots per lane group: their loads are in flight together

// Slots of a head that one inv_norm block takes.
template <typename T, int D>
constexpr int inv_norm_block_slots() {
  return kInvNormThreads / inv_norm_lanes<T, D>() * kInvNormSlots;
}

// inv_norm blocks per head of Np slots: the parts of its key sum S.
template <typename T, int D>
inline int key_sum_parts(int Np) {
  return ceil_div(Np, inv_norm_block_slots<T, D>());
}

// Block (head r, part y) of k [rows, N, D] (16-byte aligned), pos [rows, N] int32: inv [rows,
// Np] for its slots of [0, Np), and its part of S, sum_parts [rows, key_sum_parts, D] fp32: the
// sum of inv_j k_j over its valid slots, in a fixed order (deterministic). A group of
// inv_norm_lanes() lanes per slot, one 16-byte chunk each; group g takes slots g, g + groups,
// ..., so that a warp's load reads whole keys side by side, and issues all their loads before it
// reduces. No early exit: the whole warp shuffles.
template <typename T, int D>
__global__ void __launch_bounds__(kInvNormThreads)
    inv_norm_kernel(const T* __restrict__ k, const int* __restrict__ pos, int N, int Np,
                    float* __restrict__ inv, float* __restrict__ sum_parts) {
  constexpr int kLanes = inv_norm_lanes<T, D>();
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kGroups = kInvNormThreads / kLanes;
  static_assert(D % kVec == 0 && kLanes >= 1 && kLanes <= 32 && 32 % kLanes == 0,
                "bad inv_norm lane split");
  __shared__ float parts[kGroups * D];  // each group's sum of inv_j k_j
  const int group = threadIdx.x / kLanes, sub = threadIdx.x % kLanes;
  const int64_t r = blockIdx.x;
  const int first = blockIdx.y * inv_norm_block_slots<T, D>() + group;
  // The keys are loaded before pos is known: a load that waited for pos would add a round trip.
  uint4 v[kInvNormSlots];
#pragma unroll
  for (int s = 0; s < kInvNormSlots; ++s) {
    const int j = first + s * kGroups;
    v[s] = j < N ? reinterpret_cast<const uint4*>(k + (r * N + j) * D)[sub]
                 : make_uint4(0, 0, 0, 0);
  }
  float acc[kVec] = {};
#pragma unroll
  for (int s = 0; s < kInvNormSlots; ++s) {
    const int j = first + s * kGroups;
    const T* e = reinterpret_cast<const T*>(&v[s]);
    float ss = 0.f;
#pragma unroll
    for (int x = 0; x < kVec; ++x) ss = fmaf(to_float(e[x]), to_float(e[x]), ss);
#pragma unroll
    for (int off = 1; off < kLanes; off <<= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const bool valid = j < N && pos[r * N + j] >= 0;
    const float inv_j = 1.f / (sqrtf(ss) + 1e-6f);
    if (j < Np && sub == 0) inv[r * Np + j] = valid ? inv_j : __int_as_float(0x7fc00000);
    if (valid) {
#pragma unroll
      for (int x = 0; x < kVec; ++x) acc[x] = fmaf(inv_j, to_float(e[x]), acc[x]);
    }
  }
#pragma unroll
  for (int x = 0; x < kVec; ++x) parts[group * D + sub * kVec + x] = acc[x];
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kInvNormThreads) {
    float t = 0.f;
    for (int g = 0; g < kGroups; ++g) t += parts[g * D + d];
    sum_parts[(r * gridDim.y + blockIdx.y) * D + d] = t;
  }
}

// S of head r into s[0 .. D) (shared memory), from its `parts` parts in ascending order; the
// caller synchronises before reading it.
template <int D>
__device__ __forceinline__ void load_key_sum(const float* sum_parts, int64_t r, int parts,
                                             float* s, int threads) {
  for (int d = threadIdx.x; d < D; d += threads) {
    float t = 0.f;
    for (int p = 0; p < parts; ++p) t += sum_parts[(r * parts + p) * D + d];
    s[d] = t;
  }
}

// Row i's sum of c_ij over valid j != i, from dot = k_i . S and self = k_i . k_i; 0 for an empty
// row (inv NaN).
__device__ __forceinline__ float row_sum_from_key_sum(float inv_i, float dot, float self) {
  return inv_i >= 0.f ? inv_i * dot - inv_i * inv_i * self : 0.f;
}

// Exemption state of one row of the Gram pass (and, in the triangle pass, of a column part).
struct RowState {
  int last = -1;       // largest valid j with c_ij > threshold, -1 if none
  float last_c = 0.f;  // c at that j (the mma path: unscaled by one of the norms until the end)
};

// Folds c_ij into row i's state; columns arrive in ascending j within a thread.
__device__ __forceinline__ void visit(RowState& s, float dot, float inv_i, float inv_j, int i,
                                      int j, float threshold) {
  if (!(inv_j >= 0.f)) return;  // empty slot or past N (NaN)
  const float c = i == j ? 0.f : dot * inv_i * inv_j;
  if (c > threshold) {
    s.last = j;
    s.last_c = c;
  }
}

// Adds another part of the same row (or column) to s: the larger index wins.
__device__ __forceinline__ void merge(RowState& s, int last, float last_c) {
  if (last > s.last) {
    s.last = last;
    s.last_c = last_c;
  }
}

// Merges into s the state `send` of lane (lane ^ xor_mask).
__device__ __forceinline__ void merge_from_lane(RowState& s, const RowState& send, int xor_mask) {
  const int last = __shfl_xor_sync(0xffffffffu, send.last, xor_mask);
  const float last_c = __shfl_xor_sync(0xffffffffu, send.last_c, xor_mask);
  merge(s, last, last_c);
}

// Combines the states of the lanes (xor distances < width) that share a row.
template <int Width>
__device__ __forceinline__ void reduce_lanes(RowState& s) {
#pragma unroll
  for (int off = 1; off < Width; off <<= 1) merge_from_lane(s, RowState(s), off);
}

__device__ __forceinline__ void store_row(const RowState& s, int64_t at, int* last, float* last_c) {
  last[at] = s.last;
  last_c[at] = s.last_c;
}

// ---- FFMA path (fp32 keys, or d not a multiple of 16) -----------------------------------------

constexpr int kFfmaThreads = 256;
constexpr int kFfmaPitch = kRedTile + 1;  // transposed tiles [D][65]: conflict-free stores

template <int D>
constexpr size_t ffma_smem_bytes() {
  return (2 * D * kFfmaPitch + kRedTile + D) * sizeof(float);
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

// Block (head r, row tile): the row sums of its 64 rows from S; the exemptions over the whole
// row: thread (tx, ty) owns rows ty*4 + 0..3 and columns tx + 16*0..3 of each tile; the 16 lanes
// with one ty reduce together.
template <typename T, int D>
__global__ void __launch_bounds__(kFfmaThreads)
    gram_ffma_kernel(const T* __restrict__ k, const float* __restrict__ inv,
                     const float* __restrict__ sum_parts, int parts, int N, int Np,
                     float threshold, float* __restrict__ rowsum, int* __restrict__ last,
                     float* __restrict__ last_c) {
  extern __shared__ float smem_f[];
  float* sA = smem_f;                     // [D][kFfmaPitch]
  float* sB = sA + D * kFfmaPitch;        // [D][kFfmaPitch]
  float* sInv = sB + D * kFfmaPitch;      // [kRedTile]
  float* sS = sInv + kRedTile;            // [D]
  const int64_t r = blockIdx.x;
  const int i0 = blockIdx.y * kRedTile;
  const T* kr = k + r * N * D;
  const float* inv_r = inv + r * Np;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  load_transposed<T, D>(kr, i0, N, sA);
  load_key_sum<D>(sum_parts, r, parts, sS, kFfmaThreads);
  __syncthreads();
  if (threadIdx.x < kRedTile && i0 + int(threadIdx.x) < N) {
    const int row = threadIdx.x;
    float dot = 0.f, self = 0.f;
    for (int e = 0; e < D; ++e) {
      const float x = sA[e * kFfmaPitch + row];
      dot = fmaf(x, sS[e], dot);
      self = fmaf(x, x, self);
    }
    rowsum[r * N + i0 + row] = row_sum_from_key_sum(inv_r[i0 + row], dot, self);
  }
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
    if (tx == 0 && i < N) store_row(st[x], r * N + i, last, last_c);
  }
}

// ---- Tensor-core path (bf16 / fp16 keys, d % 16 == 0) -----------------------------------------

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
// Rows per warp: two m16 tiles, so every B fragment read from shared memory feeds two mma (half
// the shared-memory traffic of one m16 tile per warp, which capped the tensor cores).
constexpr int kWarpRows = 32;
constexpr int kMmaRows = kWarpRows * kMmaWarps;       // rows per block = the two 64-key buffers
constexpr int kRowBlockTiles = kMmaRows / kRedTile;  // column tiles a block's own rows span
constexpr int kMmaMinBlocks = 4;                     // blocks per SM: caps registers at 128
// Chunks of a row block's column range: blocks of one row block walk disjoint chunks and write
// partial row states, merged by finalize; the first chunk's block writes the row sums. They fill
// the GPU when heads x row blocks is small.
constexpr int kMaxSplits = 8;
// Slots per head on CUDA: every (row block, chunk) of a head then fits the grid's y (< 41,000
// items at 2^20 slots with chunks of >= tiles / kMaxSplits).
constexpr int64_t kRedMaxSlots = int64_t(1) << 20;

template <int D>
constexpr int mma_pitch() { return D + 8; }  // 16-byte row padding: conflict-free ldmatrix

// Which rows a block of the tensor-core pass takes, and which column tiles it walks.
enum class GramRows {
  // No carried exemptions: row block rb (rows [128 rb, 128 rb + 128)) walks the columns from its
  // own first tile on and hands every tile right of its rows to those columns (c_ji = c_ij); the
  // blocks of its first chunk write its rows' sums.
  triangle,
  // Exemptions carried for the slots [0, M): the rows [M, N) (the fresh ones) walk every column.
  // A column j < M takes their hits: a fresh row is later than every slot of [0, M), so such a
  // hit is j's exemption. Row block 0 also writes every slot's row sum, tile by tile.
  fresh,
  // The slots of [0, M) whose carried exemption is unknown and that no fresh row hit (listed per
  // head, ascending) walk the columns [0, M) for theirs.
  listed,
};

// Column tiles a fresh or listed block walks (in chunks of `per`).
__host__ __device__ __forceinline__ int walked_tiles(GramRows mode, int Np, int M) {
  return mode == GramRows::fresh ? Np / kRedTile : (M + kRedTile - 1) / kRedTile;
}

// Two 64-key buffers (the 128 A rows pass through them first), two 64-float inv tiles, the
// column parts of one tile per warp (row, c), S and the block's row slots.
template <int D>
constexpr size_t mma_smem_bytes() {
  return 2 * kRedTile * mma_pitch<D>() * 2 + 2 * kRedTile * sizeof(float) +
         2 * kMmaWarps * kRedTile * sizeof(float) + D * sizeof(float) + kMmaRows * sizeof(int);
}

// Chunks of `per` column tiles that row block rb walks: the tiles from its own first one on.
__host__ __device__ __forceinline__ int triangle_chunks(int rb, int tiles, int per) {
  return (tiles - rb * kRowBlockTiles + per - 1) / per;
}

// Cuts threadIdx into (key, 16-byte chunk) pairs of n_keys keys; copy(key, chunk) issues one.
template <int D, typename Copy>
__device__ __forceinline__ void for_key_chunks(int n_keys, Copy copy) {
  constexpr int kChunks = D * 2 / 16;  // 16-byte chunks per key
  for (int e = threadIdx.x; e < n_keys * kChunks; e += kMmaThreads) copy(e / kChunks, e % kChunks);
}

// 64 keys from row0 on into dst [64][pitch] (zeros past N) and their 64 inv values from row0 on
// (inside the padded [0, Np) range).
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(const T* kr, int row0, int N, T* dst,
                                                const float* inv_r, float* dst_inv) {
  for_key_chunks<D>(kRedTile, [&](int key, int c) {
    const int j = row0 + key;
    const bool in = j < N;
    cp_async16(dst + key * mma_pitch<D>() + c * 8, kr + int64_t(in ? j : 0) * D + c * 8, in);
  });
  if (threadIdx.x < kRedTile / 4) {
    cp_async16(dst_inv + threadIdx.x * 4, inv_r + row0 + threadIdx.x * 4, true);
  }
}

// The block's 128 row slots (slots[x], -1: none, zeros) into dst [128][pitch].
template <typename T, int D>
__device__ __forceinline__ void load_rows_async(const T* kr, const int* slots, T* dst) {
  for_key_chunks<D>(kMmaRows, [&](int key, int c) {
    const int j = slots[key];
    cp_async16(dst + key * mma_pitch<D>() + c * 8, kr + int64_t(j >= 0 ? j : 0) * D + c * 8,
               j >= 0);
  });
}

// The four rows a lane owns in the mma path (rows g and g + 8 of the warp's two m16 tiles), in
// ascending order, with their constants and row states. Row a = 2m + h is the block's row
// warp * 32 + 16m + 8h + g.
struct LaneRows {
  int row[4];    // slot, -1 for none
  float inv[4];  // 1 / ||k_i||: NaN for an empty slot or none
  float thr[4];  // threshold / inv_i: c_ij > threshold is tested as dot * inv_j > thr
  RowState state[4];

  // Whether one of the lane's rows is a column of the tile [j0, j0 + 64).
  __device__ __forceinline__ bool in_tile(int j0) const {
    bool in = false;
#pragma unroll
    for (int x = 0; x < 4; ++x) in |= row[x] >= j0 && row[x] < j0 + kRedTile;
    return in;
  }
};

// Folds one accumulator (row a of the lane, column j). A row's hit stores dot * inv_j, unscaled
// by inv_i until the end. Column state (Cols: a tile right of the block's rows, where c_ji =
// c_ij): a hit stores row i with dot * inv_j, unscaled by inv_i until it is handed on. Diag: the
// tile may hold i == j, whose c is 0.
template <bool Diag, bool Cols>
__device__ __forceinline__ void fold(LaneRows& rows, int a, RowState& col, float dot, float inv_j,
                                     int j) {
  RowState& s = rows.state[a];
  float cj = dot * inv_j;
  if (Diag && rows.row[a] == j) cj = 0.f;  // an empty row never hits (thr is NaN)
  const bool hit = cj > rows.thr[a];
  if (hit) {
    s.last = j;
    s.last_c = cj;
  }
  if constexpr (Cols) {
    if (hit) {
      col.last = rows.row[a];
      col.last_c = cj;
    }
  }
}

// Folds NC n8 chunks of the warp's two m16 tiles, columns j0 .. j0 + 8 * NC - 1 (iv: their inv
// values), in ascending column order within the thread and ascending row order within a column;
// col[2 * nc + q] is the column part of the lane's column nc * 8 + 2t + q.
template <bool Diag, bool Cols, int NC>
__device__ __forceinline__ void fold_tile(const float (&acc)[2][NC][4], const float* iv, int j0,
                                          int t, LaneRows& rows, RowState (&col)[2 * NC]) {
#pragma unroll
  for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int cl = nc * 8 + 2 * t + q;
      const float inv_j = iv[cl];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        fold<Diag, Cols>(rows, a, col[2 * nc + q], acc[a >> 1][nc][2 * (a & 1) + q], inv_j,
                         j0 + cl);
      }
    }
  }
}

// Whether some c_ij of the warp's NC n8 chunks (iv: their columns' inv) passes a row's
// threshold, c_ii included: when none does, which is most tiles of keys without near-copies,
// the fold and the column exchange are skipped (a multiply and a compare per entry instead of
// the bookkeeping). A NaN (empty slot, no row) never counts.
template <int NC>
__device__ __forceinline__ bool warp_may_hit(const float (&acc)[2][NC][4], const float* iv, int t,
                                             const LaneRows& rows) {
  bool hit = false;
#pragma unroll
  for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float inv_j = iv[nc * 8 + 2 * t + q];
#pragma unroll
      for (int a = 0; a < 4; ++a) hit |= acc[a >> 1][nc][2 * (a & 1) + q] * inv_j > rows.thr[a];
    }
  }
  return __any_sync(0xffffffffu, hit);
}

// Exchanges the upper or lower half of `col` with lane (lane ^ Xor) and merges the half kept.
template <int Xor, int Half>
__device__ __forceinline__ void scatter_half(RowState (&col)[8], int lane) {
  const bool upper = (lane & Xor) != 0;
#pragma unroll
  for (int x = 0; x < Half; ++x) {
    const RowState keep = upper ? col[x + Half] : col[x];
    const RowState send = upper ? col[x] : col[x + Half];
    col[x] = keep;
    merge_from_lane(col[x], send, Xor);
  }
}

// Column parts of a warp's 32-column half tile: lane (g, t) holds 8 columns over its 4 rows.
// Three exchanges between the lanes of one t (xor 16, 8, 4) each hand over half the columns
// left, so lane (g, t) ends with the warp's part of its column index g, which is column
// (g >> 1) * 8 + 2t + (g & 1) of the half: 7 exchanges where a full reduction takes 24.
__device__ __forceinline__ RowState reduce_scatter_columns(RowState (&col)[8], int lane) {
  scatter_half<16, 4>(col, lane);
  scatter_half<8, 2>(col, lane);
  scatter_half<4, 1>(col, lane);
  return col[0];
}

// After a tile right of the block's rows: threads 0..63 merge the four warps' column parts
// (ascending rows) and hand them to the columns: the last row with a hit, with its c scaled by
// that row's inv, packed as (row + 1) << 32 | bits of c for an atomic max.
__device__ __forceinline__ void hand_on_columns(const int* s_last, const float* s_c,
                                                const float* inv_r, int j0, int N,
                                                unsigned long long* col_last) {
  const int cl = threadIdx.x, j = j0 + cl;
  if (cl >= kRedTile || j >= N) return;
  if (!(inv_r[j] >= 0.f)) return;  // empty slot: finalize never reads it
  RowState s{s_last[cl], s_c[cl]};
#pragma unroll
  for (int w = 1; w < kMmaWarps; ++w) merge(s, s_last[w * kRedTile + cl], s_c[w * kRedTile + cl]);
  if (s.last >= 0) {
    atomicMax(col_last + j, (static_cast<unsigned long long>(s.last + 1) << 32) |
                                __float_as_uint(s.last_c * inv_r[s.last]));
  }
}

// Row sums of the lane's four rows (LaneRows order) from their A fragments and S (shared
// memory): each lane takes its 32 elements of a row, the four lanes of a row add up.
template <typename T, int D>
__device__ __forceinline__ void lane_row_sums(const uint32_t (&a)[2][D / 16][4], const float* sS,
                                              int t, const LaneRows& rows, float (&sums)[4]) {
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const int m = x >> 1, h = x & 1;
    float dot = 0.f, self = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // k = 16 kk + 8 half + 2t, +1
        const T* e = reinterpret_cast<const T*>(&a[m][kk][2 * half + h]);
        const float* sk = sS + kk * 16 + half * 8 + 2 * t;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const float v = to_float(e[q]);
          dot = fmaf(v, sk[q], dot);
          self = fmaf(v, v, self);
        }
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      dot += __shfl_xor_sync(0xffffffffu, dot, off);
      self += __shfl_xor_sync(0xffffffffu, self, off);
    }
    sums[x] = row_sum_from_key_sum(rows.inv[x], dot, self);
  }
}

// Row sums of the 64 keys of a column tile (b [64][pitch] in shared memory, iv their inv) from S
// into rowsum [j0, j0 + 64) below N: two threads per key, half the key each.
template <typename T, int D>
__device__ __forceinline__ void tile_row_sums(const T* b, const float* iv, const float* sS, int j0,
                                              int N, float* rowsum) {
  static_assert(kMmaThreads == 2 * kRedTile, "two threads per key");
  constexpr int kHalf = D / 2, kVec = 8;  // 16-byte reads
  const int key = threadIdx.x >> 1, part = threadIdx.x & 1;
  const T* e = b + key * mma_pitch<D>() + part * kHalf;
  const float* s = sS + part * kHalf;
  float dot = 0.f, self = 0.f;
#pragma unroll
  for (int c = 0; c < kHalf / kVec; ++c) {
    const uint4 chunk = reinterpret_cast<const uint4*>(e)[c];
    const T* v = reinterpret_cast<const T*>(&chunk);
#pragma unroll
    for (int x = 0; x < kVec; ++x) {
      const float f = to_float(v[x]);
      dot = fmaf(f, s[c * kVec + x], dot);
      self = fmaf(f, f, self);
    }
  }
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  self += __shfl_xor_sync(0xffffffffu, self, 1);
  const int j = j0 + key;
  if (part == 0 && j < N) rowsum[j] = row_sum_from_key_sum(iv[key], dot, self);
}

template <typename T>
struct GramArgs {
  const T* k;               // [rows, N, D]
  const float* inv;         // [rows, Np]
  const float* sum_parts;   // [rows, parts, D]
  int parts, N, Np;
  int M;                    // fresh, listed: slots with carried exemptions
  float threshold;
  int per;                  // column tiles per chunk
  const int* listed;        // listed: [rows, M], the first listed_count[r] of head r
  const int* listed_count;  // [rows]
  float* rowsum;            // [rows, N]
  int* last;                // [splits, rows, N]
  float* last_c;            // [splits, rows, N]
  unsigned long long* col_last;  // [rows, N]
};

// Block (head r = blockIdx.x, item blockIdx.y = (row block rb, chunk); GramRows says which rows
// and columns). Warp w owns the block's rows 32w..32w+31 as two m16 tiles and keeps their A
// fragments in registers (loaded once through the B buffers), then walks the chunk's column
// tiles, double-buffered through cp.async, in two halves of 32 columns (fewer accumulator
// registers, same B traffic). Accumulator layout of m16n8k16: lane (g = lane/4, t = lane%4)
// holds rows g and g+8, columns 2t and 2t+1 of each n8 chunk; the 4 lanes of one g reduce
// together. The partial row states go to chunk `chunk` of last / last_c [splits, rows, N]; the
// column parts of tiles handed to their columns to col_last [rows, N].
template <typename T, int D, GramRows Mode>
__global__ void __launch_bounds__(kMmaThreads, kMmaMinBlocks)
    gram_mma_kernel(const GramArgs<T> p) {
  constexpr int P = mma_pitch<D>();
  constexpr int kHalfChunks = kRedTile / 16;  // n8 chunks per 32-column half
  static_assert(kMmaThreads == kMmaRows, "one thread per row slot");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sB = reinterpret_cast<T*>(smem_raw);                         // [2][64][P]
  float* sInv = reinterpret_cast<float*>(sB + 2 * kRedTile * P);  // [2][64]
  int* sColLast = reinterpret_cast<int*>(sInv + 2 * kRedTile);    // [warps][64]
  float* sColC = reinterpret_cast<float*>(sColLast + kMmaWarps * kRedTile);
  float* sS = sColC + kMmaWarps * kRedTile;                       // [D]
  int* sRows = reinterpret_cast<int*>(sS + D);                    // [128]
  const int64_t r = blockIdx.x;
  const int N = p.N, Np = p.Np, M = p.M, tiles = Np / kRedTile;
  int rb = 0, chunk = blockIdx.y, tile_begin, tile_end;
  if constexpr (Mode == GramRows::triangle) {
    while (chunk >= triangle_chunks(rb, tiles, p.per)) chunk -= triangle_chunks(rb++, tiles, p.per);
    tile_begin = rb * kRowBlockTiles + chunk * p.per;
    tile_end = min(tile_begin + p.per, tiles);
  } else {
    const int walk = walked_tiles(Mode, Np, M), chunks = (walk + p.per - 1) / p.per;
    rb = blockIdx.y / chunks;
    chunk = blockIdx.y % chunks;
    tile_begin = chunk * p.per;
    tile_end = min(tile_begin + p.per, walk);
    // The grid covers every slot of [0, M) being listed: most listed blocks have none.
    if (Mode == GramRows::listed && rb * kMmaRows >= p.listed_count[r]) return;
  }
  const T* kr = p.k + r * N * D;
  const float* inv_r = p.inv + r * Np;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  int slot;
  if constexpr (Mode == GramRows::listed) {
    const int at = rb * kMmaRows + threadIdx.x;
    slot = at < p.listed_count[r] ? p.listed[r * M + at] : -1;
  } else {
    slot = (Mode == GramRows::fresh ? M : 0) + rb * kMmaRows + threadIdx.x;
    if (slot >= N) slot = -1;
  }
  sRows[threadIdx.x] = slot;
  __syncthreads();
  load_rows_async<T, D>(kr, sRows, sB);
  cp_async_commit();
  const bool sums_from_rows = Mode == GramRows::triangle && chunk == 0;
  const bool sums_from_columns = Mode == GramRows::fresh && rb == 0;
  if (sums_from_rows || sums_from_columns) {
    load_key_sum<D>(p.sum_parts, r, p.parts, sS, kMmaThreads);
  }
  cp_async_wait<0>();
  __syncthreads();
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
  load_tile_async<T, D>(kr, tile_begin * kRedTile, N, sB, inv_r, sInv);
  cp_async_commit();

  // inv_i > 0 for a valid row; an empty row or none (NaN) never hits.
  LaneRows rows;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    rows.row[x] = sRows[warp * kWarpRows + (x >> 1) * 16 + (x & 1) * 8 + g];
    rows.inv[x] = rows.row[x] >= 0 ? inv_r[rows.row[x]] : __int_as_float(0x7fc00000);
    rows.thr[x] = p.threshold / rows.inv[x];
  }
  if (sums_from_rows) {
    float sums[4];
    lane_row_sums<T, D>(a, sS, t, rows, sums);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      if (t == 0 && rows.row[x] >= 0) p.rowsum[r * N + rows.row[x]] = sums[x];
    }
  }
  const int first_right = (rb + 1) * kRowBlockTiles;  // triangle: tiles right of the rows
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int buf = (tile - tile_begin) & 1;
    if (tile + 1 < tile_end) {
      load_tile_async<T, D>(kr, (tile + 1) * kRedTile, N, sB + (buf ^ 1) * kRedTile * P, inv_r,
                            sInv + (buf ^ 1) * kRedTile);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* b = sB + buf * kRedTile * P;
    const int j0 = tile * kRedTile;
    const float* iv = sInv + buf * kRedTile;
    // Warp-uniform: one of the warp's rows is a column of this tile (c_ii = 0).
    const bool diag = __any_sync(0xffffffffu, rows.in_tile(j0));
    bool cols = false;  // block-uniform: the tile's columns take the rows' hits
    if constexpr (Mode == GramRows::triangle) cols = tile >= first_right;
    if constexpr (Mode == GramRows::fresh) cols = j0 < M;
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
      const float* iv_half = iv + half * 32;
      const int jh = j0 + half * 32;
      // The lane's entry of the warp's column parts: column (g >> 1) * 8 + 2t + (g & 1).
      const int at = warp * kRedTile + half * 32 + (g >> 1) * 8 + 2 * t + (g & 1);
      if (!warp_may_hit(acc, iv_half, t, rows)) {
        if (cols) sColLast[at] = -1;
        continue;
      }
      RowState col[2 * kHalfChunks];
      if (diag && cols) {
        fold_tile<true, true>(acc, iv_half, jh, t, rows, col);
      } else if (diag) {
        fold_tile<true, false>(acc, iv_half, jh, t, rows, col);
      } else if (cols) {
        fold_tile<false, true>(acc, iv_half, jh, t, rows, col);
      } else {
        fold_tile<false, false>(acc, iv_half, jh, t, rows, col);
      }
      if (cols) {
        const RowState part = reduce_scatter_columns(col, lane);
        sColLast[at] = part.last;
        sColC[at] = part.last_c;
      }
    }
    if (sums_from_columns) tile_row_sums<T, D>(b, iv, sS, j0, N, p.rowsum + r * N);
    __syncthreads();  // buffer `buf` is refilled at the next iteration; the column parts are in
    if (cols) hand_on_columns(sColLast, sColC, inv_r, j0, N, p.col_last + r * N);
  }
  const int64_t out0 = (chunk * int64_t(gridDim.x) + r) * N;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    RowState& s = rows.state[x];
    reduce_lanes<4>(s);
    s.last_c *= rows.inv[x];
    if (t == 0 && rows.row[x] >= 0) store_row(s, out0 + rows.row[x], p.last, p.last_c);
  }
}

// Row blocks x chunks of one head for chunks of `per` tiles.
inline int64_t triangle_items(int row_blocks, int tiles, int per) {
  int64_t items = 0;
  for (int rb = 0; rb < row_blocks; ++rb) items += triangle_chunks(rb, tiles, per);
  return items;
}

// Items (blocks per head) of a pass over N slots, M of them carried, in chunks of `per` tiles.
inline int64_t gram_items(GramRows mode, int N, int M, int per) {
  const int tiles = ceil_div(N, kRedTile);
  const int chunks = ceil_div(walked_tiles(mode, tiles * kRedTile, M), per);
  switch (mode) {
    case GramRows::triangle: return triangle_items(ceil_div(N, kMmaRows), tiles, per);
    case GramRows::fresh: return int64_t(ceil_div(N - M, kMmaRows)) * chunks;
    case GramRows::listed: return int64_t(ceil_div(M, kMmaRows)) * chunks;
  }
  return 0;
}

// The carried slots a pass over N slots uses: none when none is fresh (every row then is
// scanned anyway) or when the listed grid would pass the grid's y limit.
inline int carried_slots_used(int N, int M) {
  if (M <= 0 || M >= N) return 0;
  return gram_items(GramRows::listed, N, M, 1) <= 65535 ? M : 0;
}

// Chunk count of row block 0 for the mma pass (each chunk ceil(tiles / splits) tiles): minimises
// the tiles per SM slot (a block's A load and stores counted as one more tile) plus one chunk for
// the tail, over split counts whose chunks are all non-empty. M: carried_slots_used.
inline int redundancy_choose_splits(int64_t rows, int N, int M, int64_t slots) {
  const int tiles = ceil_div(N, kRedTile);
  int64_t row_tiles = 0;  // tiles walked per head, summed over its row blocks
  if (M == 0) {
    for (int rb = 0; rb < ceil_div(N, kMmaRows); ++rb) row_tiles += tiles - rb * kRowBlockTiles;
  } else {
    row_tiles = int64_t(ceil_div(N - M, kMmaRows)) * tiles;
  }
  int best = 1;
  int64_t best_cost = -1;
  for (int s = 1; s <= kMaxSplits && s <= tiles; ++s) {
    const int per = ceil_div(tiles, s);
    if (ceil_div(tiles, per) != s) continue;  // some chunk would be empty
    const int64_t items = gram_items(M == 0 ? GramRows::triangle : GramRows::fresh, N, M, per);
    const int64_t work = rows * (row_tiles + items);
    const int64_t cost = (work + slots - 1) / slots + per;
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

// Whether a carried exemption of slot j < M is known: -1 (no later similar key), or a valid slot
// of [0, M) other than j. Anything else (-2: its key was evicted) is unknown and scanned again.
__device__ __forceinline__ bool carried_known(int carried, int j, int M, const float* inv_r) {
  return carried == -1 || (carried >= 0 && carried < M && carried != j && inv_r[carried] >= 0.f);
}

// Whether the listed pass scans slot j < M: valid, unknown carried exemption, no fresh row's hit.
__device__ __forceinline__ bool needs_listing(int j, int M, const float* inv_r,
                                              const int* carried_r,
                                              const unsigned long long* col_last_r) {
  return inv_r[j] >= 0.f && col_last_r[j] == 0 && !carried_known(carried_r[j], j, M, inv_r);
}

// One block per head: the slots needs_listing picks, ascending, into listed [rows, M] and their
// count into listed_count [rows].
__global__ void __launch_bounds__(kFinalThreads)
    list_unknown_kernel(const float* __restrict__ inv, const int* __restrict__ carried,
                        const unsigned long long* __restrict__ col_last, int N, int Np, int M,
                        int* __restrict__ listed, int* __restrict__ listed_count) {
  __shared__ int warp_counts[kFinalThreads / 32];
  const int64_t r = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int written = 0;
  for (int base = 0; base < M; base += kFinalThreads) {
    const int j = base + threadIdx.x;
    const bool pick = j < M && needs_listing(j, M, inv + r * Np, carried + r * M, col_last + r * N);
    const unsigned ballot = __ballot_sync(0xffffffffu, pick);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = written + __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < kFinalThreads / 32; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (pick) listed[r * M + before] = j;
    written += total;
    __syncthreads();  // warp_counts is rewritten
  }
  if (threadIdx.x == 0) listed_count[r] = written;
}

// c_ij of two valid slots, from their keys (16-byte reads) and inv, as the mma pass scales it.
template <typename T, int D>
__device__ __forceinline__ float slot_cosine(const T* kr, const float* inv_r, int i, int j) {
  constexpr int kVec = 16 / int(sizeof(T));
  const uint4* ki = reinterpret_cast<const uint4*>(kr + int64_t(i) * D);
  const uint4* kj = reinterpret_cast<const uint4*>(kr + int64_t(j) * D);
  float dot = 0.f;
#pragma unroll 4
  for (int c = 0; c < D / kVec; ++c) {
    const uint4 a = ki[c], b = kj[c];
    const T* x = reinterpret_cast<const T*>(&a);
    const T* y = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) dot = fmaf(to_float(x[e]), to_float(y[e]), dot);
  }
  return dot * inv_r[j] * inv_r[i];
}

template <typename T>
struct FinalizeArgs {
  const T* k;             // [rows, N, D]
  const float* inv;       // [rows, Np]
  int N, Np;
  int M;                  // carried slots (carried_slots_used), 0 for none
  const int* carried;     // [rows, M]
  int splits;             // chunks per row block (triangle: of row block 0)
  float* rowsum;          // [rows, N], becomes raw
  const int* last;        // [splits, rows, N]
  const float* last_c;    // [splits, rows, N]
  const unsigned long long* col_last;  // [rows, N]; nullptr on the FFMA path
  int* exempt;            // [rows, N] the exemption m*(j) of every slot (-1: none), or nullptr
  float* out;             // [rows, N]
};

// One block per head. Slot j's exemption: without carried slots, from the highest chunk of row
// j with a hit (chunks cover ascending column ranges) or else, with column parts (the triangle
// pass), the hit handed on from the rows before j's row block, which all lie left of it. With
// carried slots: a fresh j from its row's chunks; a carried j from a fresh row's hit, else its
// carried exemption (c recomputed from the keys) when known, else its listed row's chunks.
// raw = rowsum minus the exempted entries, R = softmax over valid slots of raw / |V|.
template <typename T, int D>
__global__ void __launch_bounds__(kFinalThreads) finalize_kernel(const FinalizeArgs<T> p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int N = p.N, Np = p.Np, M = p.M;
  const int64_t split_stride = int64_t(gridDim.x) * N;
  const int tiles = Np / kRedTile, per = (tiles + p.splits - 1) / p.splits;
  const float* inv_r = p.inv + r * Np;
  float* raw = p.rowsum + r * N;
  float* out_r = p.out + r * N;
  // The highest of row j's first `chunks` chunks with a hit.
  const auto from_chunks = [&](int j, int chunks, int& m, float& c) {
    for (int sp = chunks - 1; sp >= 0 && m < 0; --sp) {
      const int64_t at = sp * split_stride + r * N + j;
      m = p.last[at];
      c = p.last_c[at];
    }
  };
  const auto from_column = [&](int j, int& m, float& c) {
    const unsigned long long packed = p.col_last[r * N + j];
    if (packed == 0) return;
    m = static_cast<int>(packed >> 32) - 1;
    c = __uint_as_float(static_cast<unsigned>(packed));
  };
  for (int j = threadIdx.x; j < N; j += kFinalThreads) {
    int m = -1;
    float c = 0.f;
    if (inv_r[j] >= 0.f) {
      if (M == 0) {
        const bool triangle = p.col_last != nullptr;
        from_chunks(j, triangle ? triangle_chunks(j / kMmaRows, tiles, per) : p.splits, m, c);
        if (m < 0 && triangle) from_column(j, m, c);
      } else if (j >= M) {
        from_chunks(j, ceil_div(walked_tiles(GramRows::fresh, Np, M), per), m, c);
      } else {
        from_column(j, m, c);  // a fresh row's hit is later than any carried one
        const int carried = p.carried[r * M + j];
        if (m < 0 && carried_known(carried, j, M, inv_r)) {
          m = carried;
          if (m >= 0) c = slot_cosine<T, D>(p.k + r * N * D, inv_r, m, j);
        } else if (m < 0) {
          from_chunks(j, ceil_div(walked_tiles(GramRows::listed, Np, M), per), m, c);
        }
      }
      if (m >= 0) atomicAdd(raw + m, -c);
    }
    if (p.exempt != nullptr) p.exempt[r * N + j] = m;
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

// The carried slots the launcher uses for rows heads of N slots, M carried (0 on the FFMA path,
// which scans whole rows anyway); size the workspace with it.
template <typename T, int D>
int redundancy_carried_used(int N, int M) {
  return redundancy_uses_mma<T, D>() ? carried_slots_used(N, M) : 0;
}

// Chunks per row block the launcher will run with for rows heads of N slots, M carried
// (redundancy_carried_used), on the current device (1 on the FFMA path); size the workspace
// with it.
template <typename T, int D>
cudaError_t redundancy_splits(int64_t rows, int N, int M, int* splits) {
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
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, gram_mma_kernel<T, D, GramRows::triangle>, kMmaThreads, mma_smem_bytes<D>());
      if (err != cudaSuccess) return err;
      per_sm = per_sm > 0 ? per_sm : 1;
      per_sm_cache.store(per_sm, std::memory_order_relaxed);
    }
    *splits = redundancy_choose_splits(rows, N, M, int64_t(sms) * per_sm);
  }
  return cudaSuccess;
}

// Floats of workspace for rows heads of N slots, M carried (redundancy_carried_used) and
// `splits` chunks: inv [rows, Np], the parts of S [rows, key_sum_parts, D], on the mma path the
// column parts col_last (uint64) [rows, N], rowsum [rows, N], last_c (fp32) and last (int32),
// each [splits, rows, N], then with carried slots listed [rows, M] and listed_count [rows].
template <typename T, int D>
int64_t redundancy_workspace_floats(int64_t rows, int64_t N, int M, int splits) {
  const int64_t Np = redundancy_padded_len(N);
  const int64_t column_parts = redundancy_uses_mma<T, D>() ? 2 * rows * N : 0;
  const int64_t lists = M > 0 ? rows * (M + 1) : 0;
  return rows * Np + rows * key_sum_parts<T, D>(static_cast<int>(Np)) * D + column_parts +
         rows * N + 2 * int64_t(splits) * rows * N + lists;
}

template <typename T, int D, GramRows Mode>
cudaError_t launch_gram(const GramArgs<T>& args, int64_t rows, cudaStream_t stream) {
  const int64_t items = gram_items(Mode, args.N, args.M, args.per);
  if (items == 0) return cudaSuccess;
  constexpr size_t smem = mma_smem_bytes<D>();  // < 48 KB: no opt-in needed
  gram_mma_kernel<T, D, Mode><<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(items)),
                                kMmaThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

// k [rows, N, D] contiguous and 16-byte aligned, pos [rows, N] int32 contiguous -> out [rows, N]
// fp32 and, unless exempt is nullptr, exempt [rows, N] int32: each slot's exemption m*(j), -1
// for none or an empty slot. carried [rows, M0] int32 (M0 <= N, nullptr when M0 = 0): the
// exemptions of slots [0, M0) among the slots [0, M0) alone, as an earlier call returned them
// with the slots compacted (-2 where it is no longer known); M = redundancy_carried_used(N, M0).
// splits from redundancy_splits<T, D>(rows, N, M); workspace: redundancy_workspace_floats<T,
// D>(rows, N, M, splits) floats, 8-byte aligned. rows <= 2^31 - 1, N <= kRedMaxSlots.
template <typename T, int D>
cudaError_t redundancy_scores(const T* k, const int* pos, int64_t rows, int N, int M,
                              const int* carried, int carried_stride, float threshold, int splits,
                              float* workspace, float* out, int* exempt, cudaStream_t stream) {
  if (rows == 0 || N == 0) return cudaSuccess;
  const int Np = static_cast<int>(redundancy_padded_len(N));
  const int tiles = Np / kRedTile;
  if (N > kRedMaxSlots || splits < 1 || splits > kMaxSplits || splits > tiles ||
      (!redundancy_uses_mma<T, D>() && splits != 1) || M != redundancy_carried_used<T, D>(N, M) ||
      (M > 0 && (carried == nullptr || carried_stride != M))) {
    return cudaErrorInvalidValue;
  }
  const int parts = key_sum_parts<T, D>(Np);
  float* inv = workspace;
  float* sum_parts = inv + rows * Np;
  // Np is a multiple of 64 and D of 8: the uint64 column parts stay 8-byte aligned.
  unsigned long long* col_last = nullptr;
  float* rowsum = sum_parts + rows * parts * D;
  if constexpr (redundancy_uses_mma<T, D>()) {
    col_last = reinterpret_cast<unsigned long long*>(rowsum);
    rowsum = reinterpret_cast<float*>(col_last + rows * N);
  }
  float* last_c = rowsum + rows * N;
  int* last = reinterpret_cast<int*>(last_c + splits * rows * N);
  int* listed = last + splits * rows * N;
  int* listed_count = listed + rows * M;
  inv_norm_kernel<T, D><<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(parts)),
                          kInvNormThreads, 0, stream>>>(k, pos, N, Np, inv, sum_parts);
  cudaError_t err;
  if constexpr (!redundancy_uses_mma<T, D>()) {
    constexpr size_t smem = ffma_smem_bytes<D>();
    err = cudaFuncSetAttribute(gram_ffma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(N, kRedTile)));
    gram_ffma_kernel<T, D><<<grid, kFfmaThreads, smem, stream>>>(
        k, inv, sum_parts, parts, N, Np, threshold, rowsum, last, last_c);
  } else {
    err = cudaMemsetAsync(col_last, 0, rows * N * sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return err;
    GramArgs<T> args{k,         inv,  sum_parts, parts,        N,      Np,     M,
                     threshold, ceil_div(tiles, splits), listed, listed_count, rowsum, last,
                     last_c,    col_last};
    if (M == 0) {
      err = launch_gram<T, D, GramRows::triangle>(args, rows, stream);
    } else {
      err = launch_gram<T, D, GramRows::fresh>(args, rows, stream);
      if (err != cudaSuccess) return err;
      list_unknown_kernel<<<static_cast<unsigned>(rows), kFinalThreads, 0, stream>>>(
          inv, carried, col_last, N, Np, M, listed, listed_count);
      err = launch_gram<T, D, GramRows::listed>(args, rows, stream);
    }
    if (err != cudaSuccess) return err;
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const FinalizeArgs<T> fin{k,   inv,  N,        Np,       M,        carried, splits,
                            rowsum, last, last_c, col_last, exempt, out};
  finalize_kernel<T, D><<<static_cast<unsigned>(rows), kFinalThreads, 0, stream>>>(fin);
  return cudaGetLastError();
}

}  // namespace gkv::kernels
