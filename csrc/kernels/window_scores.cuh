// The G-KV local score S of the candidate keys (gkv::window_scores), in two passes over K.
//
// Logit tiles of the stats pass (and of the FFMA score pass): a block holds, in shared memory, a
// tile of kWsRows query rows (the G heads of a run of window queries: row r is query i0 + r / G
// of head h*G + r % G) and a tile of kWsKeys keys, and computes their logits (in log2 units:
// q . k * scale * log2 e) in one of two ways:
//   - tensor cores (bf16/fp16, d in {16, 32, 64, 128}): the tiles stay 16-bit; each of the 8
//     warps computes a 16 x 32 block with mma.sync.m16n8k16 (fp32 accumulators), scaled in fp32.
//   - FFMA (fp32, and d = 8): the tiles are fp32 with q pre-scaled, and each of the 256 threads
//     computes a 4 x 4 block (rows ty + 16a, keys tx + 16u) from 16-byte shared-memory reads.
//   1. stats: grid (B*Hkv*query chunks, key splits): per query row, the max and sum of exp2 over
//      the visible slots of one key split (query i sees j <= N-W+i with pos[j] >= 0). Tensor
//      cores: each lane keeps its rows' running statistics in registers while the next key tile
//      streams in (cp.async double buffer). FFMA: the logits go through shared memory and four
//      threads of a row keep a quarter of the key tile each; both merge the parts at the end.
//   2. lse:   one thread per query row merges the splits into its log-sum-exp.
//   3. score: grid (B*Hkv*groups of score_tiles candidate tiles): recomputes the logits of each
//      group's tiles of kWsKeys candidates against every window query, p = exp2(logit - lse),
//      max over the group, mean over the window; the queries are loaded once per group of tiles.
//      Tensor cores: the query rows stay in registers as mma B fragments, a query's group padded
//      to a power of two so that its max is taken in registers and by shuffles, and the keys
//      stream through a cp.async double buffer. FFMA: the probabilities go through shared
//      memory, with up to resident_q query tiles kept there.
// An empty slot's key may hold NaN: the FFMA score pass never loads it, the tensor-core stats
// pass masks its logits before any arithmetic, and in the tensor-core score pass it stays in its
// own key's column, written as 0. A query that sees nothing has lse = -inf and contributes 0.
#pragma once

#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/decode_attention.cuh"  // unpack_vec16, kLog2e
#include "kernels/ptx.cuh"

namespace gkv::kernels {

struct WindowScoresParams {
  const void* q;           // [B, Hq, W, d] contiguous
  const void* k;           // [B, Hkv, N, d], d contiguous, other strides in k_stride
  const int32_t* pos;      // [B, Hkv, N], strides in pos_stride
  int64_t k_stride[3];     // elements, for dims B, Hkv, N (16-byte multiples)
  int64_t pos_stride[3];
  int B, Hq, Hkv, W, N;
  float scale;
  float* out;              // [B, Hkv, N - W] contiguous
  int win_tile;            // window queries per row tile: G * win_tile <= kWsRows
  int num_splits;          // key splits of the stats pass
  int split_len;           // keys per split, a multiple of kWsKeys
  int score_tiles;         // candidate tiles per block of the score pass
  int resident_q;          // query tiles in shared memory at once in the score pass
  float* part_m;           // [B, Hq, W, num_splits] max logit (log2 units)
  float* part_l;           // [B, Hq, W, num_splits] sum of exp2(logit - max)
  float* lse;              // [B, Hq, W] log2-unit log-sum-exp, -inf when nothing is visible
};

constexpr int kWsKeys = 64;    // keys per tile
constexpr int kWsRows = 64;    // query rows per tile; G <= kWsRows
constexpr int kWsThreads = 256;
constexpr int kWsWarps = kWsThreads / 32;
constexpr int kWsMaxResidentQ = 4;  // query tiles of the score pass in shared memory at once
constexpr int kWsMaxScoreTiles = 8;

// Shared memory (byte offsets): the K tile, `q_tiles` Q tiles, the fp32 logit/probability tile,
// the per-row lse of the Q tiles and the per-key pos. The tiles are fp32 with rows padded by 4
// floats (conflict-free 16-byte reads) on the FFMA path, 16-bit with rows padded by 8 elements
// (the 8 rows of an ldmatrix hit 8 different 16-byte bank groups) on the tensor-core path.
template <typename T, int D, bool kMma>
struct WsSmem {
  using Elem = std::conditional_t<kMma, T, float>;
  static constexpr int kLd = kMma ? D + 8 : D + 4;  // elements per tile row
  static constexpr int kSLd = kWsKeys + 1;
  static constexpr size_t kKs = 0;
  static constexpr size_t kQs = kKs + size_t(kWsKeys) * kLd * sizeof(Elem);
  static constexpr size_t kQTile = size_t(kWsRows) * kLd * sizeof(Elem);
  __host__ __device__ static constexpr size_t ss(int q_tiles) { return kQs + q_tiles * kQTile; }
  __host__ __device__ static constexpr size_t lse(int q_tiles) {
    return ss(q_tiles) + size_t(kWsRows) * kSLd * sizeof(float);
  }
  __host__ __device__ static constexpr size_t pos(int q_tiles) {
    return lse(q_tiles) + size_t(q_tiles) * kWsRows * sizeof(float);
  }
  __host__ __device__ static constexpr size_t bytes(int q_tiles) {
    return pos(q_tiles) + kWsKeys * sizeof(int);
  }
  static_assert(!kMma || (D % 16 == 0 && sizeof(T) == 2), "tensor-core path: 16-bit, d % 16 == 0");
};

// The block's view of its shared memory, with q_tiles Q tiles (qs and lse hold them in order).
template <typename T, int D, bool kMma>
struct WsTiles {
  using S = WsSmem<T, D, kMma>;
  typename S::Elem* ks;
  typename S::Elem* qs;
  float* ss;
  float* lse;
  int* pos;
  __device__ WsTiles(unsigned char* smem, int q_tiles)
      : ks(reinterpret_cast<typename S::Elem*>(smem + S::kKs)),
        qs(reinterpret_cast<typename S::Elem*>(smem + S::kQs)),
        ss(reinterpret_cast<float*>(smem + S::ss(q_tiles))),
        lse(reinterpret_cast<float*>(smem + S::lse(q_tiles))),
        pos(reinterpret_cast<int*>(smem + S::pos(q_tiles))) {}
};

// Stores 16 bytes holding kVec elements of T into a tile: as they are (tensor-core path) or as
// floats times `mul` (FFMA path). raw is all zeros for an empty slot or row.
template <typename T, bool kMma, typename Elem>
__device__ __forceinline__ void ws_store_vec(Elem* dst, uint4 raw, float mul) {
  if constexpr (kMma) {
    *reinterpret_cast<uint4*>(dst) = raw;
  } else {
    constexpr int kVec = 16 / sizeof(T);
    float f[kVec];
    unpack_vec16<T>(raw, f);
#pragma unroll
    for (int e = 0; e < kVec; e += 4)
      *reinterpret_cast<float4*>(dst + e) =
          make_float4(f[e] * mul, f[e + 1] * mul, f[e + 2] * mul, f[e + 3] * mul);
  }
}

// Keys j0 .. j0+nk-1 of (b, h) into the K tile (live ones only; the rest are 0) and their pos
// (-1 past nk).
template <typename T, int D, bool kMma>
__device__ void ws_load_keys(const WindowScoresParams& p, int b, int h, int j0, int nk,
                             typename WsSmem<T, D, kMma>::Elem* ks, int* spos) {
  constexpr int kVec = 16 / sizeof(T), kPerKey = D / kVec, kLd = WsSmem<T, D, kMma>::kLd;
  const int32_t* pb = p.pos + b * p.pos_stride[0] + h * p.pos_stride[1];
  for (int c = threadIdx.x; c < kWsKeys; c += blockDim.x)
    spos[c] = c < nk ? pb[(j0 + c) * p.pos_stride[2]] : -1;
  __syncthreads();
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  for (int idx = threadIdx.x; idx < kWsKeys * kPerKey; idx += blockDim.x) {
    const int c = idx / kPerKey, vv = idx % kPerKey;
    const uint4 raw = spos[c] >= 0
        ? __ldg(reinterpret_cast<const uint4*>(kb + (j0 + c) * p.k_stride[2] + vv * kVec))
        : make_uint4(0, 0, 0, 0);
    ws_store_vec<T, kMma>(ks + c * kLd + vv * kVec, raw, 1.f);
  }
}

// Window queries i0 .. i0+nw-1 of the G heads of KV head h into a Q tile of tile_rows rows: row
// r is head g = r % gp of query il = r / gp (gp >= G rows per query; rows with g >= G or il >= nw
// are 0), scaled into log2 units on the FFMA path. With lse != nullptr, also each row's lse.
template <typename T, int D, bool kMma>
__device__ void ws_load_queries(const WindowScoresParams& p, int b, int h, int i0, int nw, int gp,
                                int tile_rows, typename WsSmem<T, D, kMma>::Elem* qs, float* slse) {
  constexpr int kVec = 16 / sizeof(T), kPerRow = D / kVec, kLd = WsSmem<T, D, kMma>::kLd;
  const int G = p.Hq / p.Hkv;
  const float qscale = p.scale * kLog2e;
  for (int idx = threadIdx.x; idx < tile_rows * kPerRow; idx += blockDim.x) {
    const int r = idx / kPerRow, vv = idx % kPerRow, g = r % gp, il = r / gp;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (g < G && il < nw) {
      const int64_t row = (int64_t(b) * p.Hq + h * G + g) * p.W + i0 + il;
      raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + row * D + vv * kVec));
    }
    ws_store_vec<T, kMma>(qs + r * kLd + vv * kVec, raw, qscale);
  }
  if (slse != nullptr) {
    for (int r = threadIdx.x; r < gp * nw; r += blockDim.x) {
      if (r % gp < G) slse[r] = p.lse[(int64_t(b) * p.Hq + h * G + r % gp) * p.W + i0 + r / gp];
    }
  }
}

// Tensor-core tiles: warp w computes the 16 query rows r0 = 16 (w % 4) .. +15 against the 32 keys
// c0 = 32 (w / 4) .. +31. Its C fragments s[nt][e] hold row r0 + gr + 8 (e / 2), key
// c0 + 8 nt + 2 tq + e % 2 (gr = lane / 4, tq = lane % 4).
struct WsWarpTile {
  int r0, c0, gr, tq, lane;
  __device__ WsWarpTile() {
    static_assert(kWsRows == 64 && kWsKeys == 64 && kWsWarps == 8, "4 x 2 warps of 16 x 32");
    lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    r0 = (warp & 3) * 16, c0 = (warp >> 2) * 32, gr = lane >> 2, tq = lane & 3;
  }
  __device__ int row(int e) const { return r0 + gr + 8 * (e >> 1); }
  __device__ int key(int nt, int e) const { return c0 + 8 * nt + 2 * tq + (e & 1); }
};

// The warp's logits in log2 units (fp32 products scaled in fp32, as the FFMA path and the CPU
// kernel do): s[nt][e] as in WsWarpTile. qs and ks: 16-bit tiles with rows of kLd elements.
template <typename T, int D, int kLd>
__device__ __forceinline__ void ws_warp_logits(const WindowScoresParams& p, const WsWarpTile& w,
                                               const T* qs, const T* ks, float (&s)[4][4]) {
  const int lane = w.lane;
  // Fragment layouts as in decode_split_mma_kernel: K stored [key][d] is the B operand [n][k].
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t qa[4];
    ldmatrix_x4(qa, qs + (w.r0 + (lane & 8) + (lane & 7)) * kLd + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      uint32_t kf[4];
      ldmatrix_x4(kf, ks + (w.c0 + 16 * pair + ((lane >> 4) << 3) + (lane & 7)) * kLd + kk * 16 +
                          (lane & 8));
      mma_m16n8k16<T>(s[2 * pair], qa, kf[0], kf[1]);
      mma_m16n8k16<T>(s[2 * pair + 1], qa, kf[2], kf[3]);
    }
  }
  const float scale_log2 = p.scale * kLog2e;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
  }
}

// FFMA path: calls emit(r, c, logit) for every query row r and key c of the kWsRows x kWsKeys
// tile, the logit in log2 units (q is pre-scaled); each thread emits 16 of them.
template <int D, typename Emit>
__device__ __forceinline__ void ws_ffma_tile_logits(const float* qs, const float* ks, Emit&& emit) {
  constexpr int kLd = WsSmem<float, D, false>::kLd;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[a][u] = 0.f;
  }
#pragma unroll 4
  for (int e = 0; e < D; e += 4) {
    float4 qv[4], kv[4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
      qv[a] = *reinterpret_cast<const float4*>(qs + (ty + 16 * a) * kLd + e);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      kv[u] = *reinterpret_cast<const float4*>(ks + (tx + 16 * u) * kLd + e);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float t = acc[a][u];
        t = fmaf(qv[a].x, kv[u].x, t);
        t = fmaf(qv[a].y, kv[u].y, t);
        t = fmaf(qv[a].z, kv[u].z, t);
        t = fmaf(qv[a].w, kv[u].w, t);
        acc[a][u] = t;
      }
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int u = 0; u < 4; ++u) emit(ty + 16 * a, tx + 16 * u, acc[a][u]);
  }
}

// What a block of the stats pass takes, from its grid position (B*Hkv*query chunks, key splits):
// the window queries i0 .. i0+nw-1 of KV head h of sample b (rows = G * nw query rows) against
// the slots begin .. end-1 of key split `split`.
struct WsStatsBlock {
  int G, b, h, split, i0, nw, rows, begin, end;
  __device__ explicit WsStatsBlock(const WindowScoresParams& p) {
    G = p.Hq / p.Hkv;
    const int qchunks = (p.W + p.win_tile - 1) / p.win_tile;
    const int bh = blockIdx.x / qchunks;
    b = bh / p.Hkv, h = bh % p.Hkv, split = blockIdx.y;
    i0 = (blockIdx.x % qchunks) * p.win_tile;
    nw = min(p.win_tile, p.W - i0);
    rows = G * nw;
    begin = split * p.split_len;
    // The last slot that a query of this chunk sees is N-W+i0+nw-1.
    end = min(min(begin + p.split_len, p.N), p.N - p.W + i0 + nw);
  }
};

// The stats pass on the FFMA path (fp32, d = 8).
template <typename T, int D>
__global__ void __launch_bounds__(kWsThreads) window_stats_ffma_kernel(const WindowScoresParams p) {
  constexpr bool kMma = false;
  extern __shared__ float4 ws_smem4[];
  using S = WsSmem<T, D, kMma>;
  const WsTiles<T, D, kMma> sm(reinterpret_cast<unsigned char*>(ws_smem4), 1);
  float* ss = sm.ss;
  const int* spos = sm.pos;
  const WsStatsBlock blk(p);
  const int G = blk.G, b = blk.b, h = blk.h, split = blk.split, i0 = blk.i0, nw = blk.nw;
  const int rows = blk.rows, begin = blk.begin, end = blk.end;

  ws_load_queries<T, D, kMma>(p, b, h, i0, nw, G, kWsRows, sm.qs, nullptr);
  // Row statistics without shuffles: thread (row, part) keeps a running max and sum of exp2 over
  // keys part * 16 .. part * 16 + 15 of every tile (a warp reads 32 rows at one column: no bank
  // conflicts); the four parts of a row merge once, at the end.
  constexpr int kParts = kWsThreads / kWsRows, kPartKeys = kWsKeys / kParts;
  const int row = threadIdx.x % kWsRows, part = threadIdx.x / kWsRows;
  float rm = -INFINITY, rl = 0.f;
  for (int j0 = begin; j0 < end; j0 += kWsKeys) {
    __syncthreads();  // the previous tile is consumed
    ws_load_keys<T, D, kMma>(p, b, h, j0, min(kWsKeys, end - j0), sm.ks, sm.pos);
    __syncthreads();
    ws_ffma_tile_logits<D>(sm.qs, sm.ks, [&](int r, int c, float x) {
      const int last = p.N - p.W + i0 + r / G;  // the last slot query row r sees
      const bool visible = r < rows && spos[c] >= 0 && j0 + c <= last;
      ss[r * S::kSLd + c] = visible ? x : -INFINITY;
    });
    __syncthreads();
    const float* xs = ss + row * S::kSLd + part * kPartKeys;
    float mx = rm;
#pragma unroll
    for (int c = 0; c < kPartKeys; ++c) mx = fmaxf(mx, xs[c]);
    if (mx != -INFINITY) {
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kPartKeys; ++c) sum += exp2f(xs[c] - mx);
      rl = rl * exp2f(rm - mx) + sum;
      rm = mx;
    }
  }
  __syncthreads();  // ss now takes the parts' statistics
  ss[part * kWsRows + row] = rm;
  ss[(kParts + part) * kWsRows + row] = rl;
  __syncthreads();
  if (part == 0 && row < rows) {
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < kParts; ++t) mx = fmaxf(mx, ss[t * kWsRows + row]);
    float sum = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int t = 0; t < kParts; ++t) {
        sum += ss[(kParts + t) * kWsRows + row] * exp2f(ss[t * kWsRows + row] - mx);
      }
    }
    const int64_t out_row = (int64_t(b) * p.Hq + h * G + row % G) * p.W + i0 + row / G;
    p.part_m[out_row * p.num_splits + split] = mx;
    p.part_l[out_row * p.num_splits + split] = sum;
  }
}

// Shared memory of window_stats_mma_kernel: the Q tile, two K tiles with their pos (a cp.async
// double buffer) and the row statistics that warps 4-7 hand to warps 0-3.
template <typename T, int D>
struct WsStatsMmaSmem {
  static constexpr int kLd = WsSmem<T, D, true>::kLd;
  static constexpr size_t kQs = 0;
  static constexpr size_t kKs = kQs + size_t(kWsRows) * kLd * sizeof(T);
  static constexpr size_t kPos = kKs + 2 * size_t(kWsKeys) * kLd * sizeof(T);
  static constexpr size_t kMerge = kPos + 2 * kWsKeys * sizeof(int);
  static constexpr size_t kBytes = kMerge + 2 * kWsRows * sizeof(float);
};

// Starts the copies of keys j0 .. j0+nk-1 of (b, h) and of their pos into one buffer. Keys past
// nk are zero-filled and must be masked by the caller (their pos reads 0); an empty slot's key
// is copied as it is (it may hold NaN) and is masked by its pos before any arithmetic.
template <typename T, int D, int kLd>
__device__ __forceinline__ void ws_copy_keys_async(const WindowScoresParams& p, int b, int h,
                                                   int j0, int nk, T* ks, int* spos) {
  constexpr int kVec = 16 / sizeof(T), kPerKey = D / kVec;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  for (int idx = threadIdx.x; idx < kWsKeys * kPerKey; idx += blockDim.x) {
    const int c = idx / kPerKey, vv = idx % kPerKey;
    const bool valid = c < nk;
    cp_async16(ks + c * kLd + vv * kVec, kb + int64_t(j0 + (valid ? c : 0)) * p.k_stride[2] + vv * kVec,
               valid);
  }
  if (threadIdx.x < kWsKeys) {
    const int c = threadIdx.x;
    const bool valid = c < nk;
    const int32_t* pb = p.pos + b * p.pos_stride[0] + h * p.pos_stride[1];
    cp_async4(spos + c, pb + int64_t(j0 + (valid ? c : 0)) * p.pos_stride[2], valid);
  }
}

// Row statistics (m: max logit, l: sum of exp2(logit - m)) with those of another part of the
// row merged in; a row with nothing visible stays (-inf, 0).
__device__ __forceinline__ void ws_merge_stats(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  l = l * exp2f(m - mx) + l2 * exp2f(m2 - mx);
  m = mx;
}

// The stats pass on tensor cores: the key tiles stream through a cp.async double buffer while
// the previous tile is scored, and each lane keeps the running statistics of its two rows over
// its keys in registers (the logits never go through shared memory). At the end the four lanes
// of a row merge by shuffles, then the two warps of a row through shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kWsThreads) window_stats_mma_kernel(const WindowScoresParams p) {
  using S = WsStatsMmaSmem<T, D>;
  extern __shared__ float4 ws_smem4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(ws_smem4);
  T* qs = reinterpret_cast<T*>(smem + S::kQs);
  T* ks = reinterpret_cast<T*>(smem + S::kKs);
  int* spos = reinterpret_cast<int*>(smem + S::kPos);
  float* merge = reinterpret_cast<float*>(smem + S::kMerge);
  const WsStatsBlock blk(p);
  const int G = blk.G, b = blk.b, h = blk.h, split = blk.split, i0 = blk.i0, nw = blk.nw;
  const int rows = blk.rows, begin = blk.begin, end = blk.end;
  const int tiles = end > begin ? (end - begin + kWsKeys - 1) / kWsKeys : 0;

  if (tiles > 0) ws_copy_keys_async<T, D, S::kLd>(p, b, h, begin, min(kWsKeys, end - begin), ks, spos);
  cp_async_commit();
  ws_load_queries<T, D, true>(p, b, h, i0, nw, G, kWsRows, qs, nullptr);  // while keys arrive

  const WsWarpTile w;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  int last[2];  // the last slot each of the lane's rows sees; -1: a padding row sees nothing
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int r = w.row(2 * x);
    last[x] = r < rows ? p.N - p.W + i0 + r / G : -1;
  }
  for (int t = 0; t < tiles; ++t) {
    const int j0 = begin + t * kWsKeys, buf = t & 1;
    if (t + 1 < tiles) {
      ws_copy_keys_async<T, D, S::kLd>(p, b, h, j0 + kWsKeys, min(kWsKeys, end - j0 - kWsKeys),
                                       ks + (buf ^ 1) * kWsKeys * S::kLd, spos + (buf ^ 1) * kWsKeys);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // tile t (and, the first time, the queries) is in shared memory
    float s[4][4];
    ws_warp_logits<T, D, S::kLd>(p, w, qs, ks + buf * kWsKeys * S::kLd, s);
    const int* pos_t = spos + buf * kWsKeys;
    const int nk = min(kWsKeys, end - j0);
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      float mx = m[x];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 2 * x; e < 2 * x + 2; ++e) {
          const int c = w.key(nt, e);
          const bool visible = c < nk && pos_t[c] >= 0 && j0 + c <= last[x];
          s[nt][e] = visible ? s[nt][e] : -INFINITY;
          mx = fmaxf(mx, s[nt][e]);
        }
      }
      if (mx != -INFINITY) {
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) sum += exp2f(s[nt][2 * x] - mx) + exp2f(s[nt][2 * x + 1] - mx);
        l[x] = l[x] * exp2f(m[x] - mx) + sum;
        m[x] = mx;
      }
    }
    __syncthreads();  // buffer `buf` is refilled by the next iteration's copies
  }
#pragma unroll
  for (int x = 0; x < 2; ++x) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[x], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[x], off);
      ws_merge_stats(m[x], l[x], m2, l2);
    }
  }
  const bool hands_on = w.c0 != 0;  // warps 4-7 (keys 32-63) hand their rows to warps 0-3
  if (hands_on && w.tq == 0) {
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      merge[w.row(2 * x)] = m[x];
      merge[kWsRows + w.row(2 * x)] = l[x];
    }
  }
  __syncthreads();
  if (!hands_on && w.tq == 0) {
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int r = w.row(2 * x);
      if (r >= rows) continue;
      ws_merge_stats(m[x], l[x], merge[r], merge[kWsRows + r]);
      const int64_t out_row = (int64_t(b) * p.Hq + h * G + r % G) * p.W + i0 + r / G;
      p.part_m[out_row * p.num_splits + split] = m[x];
      p.part_l[out_row * p.num_splits + split] = l[x];
    }
  }
}

// One thread per query row (b, hq, i): merges the key splits into the lse. static: a header.
static __global__ void window_lse_kernel(const WindowScoresParams p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(p.B) * p.Hq * p.W) return;
  const float* pm = p.part_m + row * p.num_splits;
  const float* pl = p.part_l + row * p.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, pm[s]);
  const float ms = mx == -INFINITY ? 0.f : mx;
  float lsum = 0.f;
  for (int s = 0; s < p.num_splits; ++s) lsum += pl[s] * exp2f(pm[s] - ms);
  p.lse[row] = lsum > 0.f ? ms + log2f(lsum) : -INFINITY;
}

// What a block of the score pass takes, from its grid position (B*Hkv*groups): the candidate
// tiles t_begin .. t_end-1 of KV head h of sample b, whose M = N - W scores start at out.
struct WsScoreBlock {
  int M, b, h, t_begin, t_end;
  float* out;
  __device__ explicit WsScoreBlock(const WindowScoresParams& p) {
    M = p.N - p.W;
    const int tiles = (M + kWsKeys - 1) / kWsKeys;
    const int groups = (tiles + p.score_tiles - 1) / p.score_tiles;
    const int bh = blockIdx.x / groups;
    b = bh / p.Hkv, h = bh % p.Hkv;
    t_begin = (blockIdx.x % groups) * p.score_tiles;
    t_end = min(t_begin + p.score_tiles, tiles);
    out = p.out + int64_t(bh) * M;
  }
};

// The score pass on the FFMA path (fp32, d = 8): the logits of a tile go through shared memory,
// then thread (key c, part) takes the max over the group and sums over window queries
// il = part mod 4.
template <typename T, int D>
__global__ void __launch_bounds__(kWsThreads) window_score_ffma_kernel(const WindowScoresParams p) {
  constexpr bool kMma = false;
  extern __shared__ float4 ws_smem4[];
  using S = WsSmem<T, D, kMma>;
  const WsTiles<T, D, kMma> sm(reinterpret_cast<unsigned char*>(ws_smem4), p.resident_q);
  float* ss = sm.ss;
  const int* spos = sm.pos;
  const int G = p.Hq / p.Hkv;
  const WsScoreBlock blk(p);
  const int M = blk.M, b = blk.b, h = blk.h, t_begin = blk.t_begin, t_end = blk.t_end;
  const int qchunks = (p.W + p.win_tile - 1) / p.win_tile;
  float* out = blk.out;
  constexpr int kParts = kWsThreads / kWsKeys;
  const int c_red = threadIdx.x % kWsKeys, part = threadIdx.x / kWsKeys;

  // Every window query sees every candidate. With more query tiles than fit at once (a long
  // window), each round of resident tiles adds its sums to out, the last one divides.
  for (int qc0 = 0; qc0 < qchunks; qc0 += p.resident_q) {
    const int nq = min(p.resident_q, qchunks - qc0);
    __syncthreads();  // the previous round's queries are consumed
    for (int r = 0; r < nq; ++r) {
      const int i0 = (qc0 + r) * p.win_tile;
      ws_load_queries<T, D, kMma>(p, b, h, i0, min(p.win_tile, p.W - i0), G, kWsRows,
                                  sm.qs + r * kWsRows * S::kLd, sm.lse + r * kWsRows);
    }
    for (int t = t_begin; t < t_end; ++t) {
      const int j0 = t * kWsKeys, nk = min(kWsKeys, M - j0);
      __syncthreads();  // the previous key tile and the parts' sums are consumed
      ws_load_keys<T, D, kMma>(p, b, h, j0, nk, sm.ks, sm.pos);
      float score = 0.f;
      for (int r = 0; r < nq; ++r) {
        const int nw = min(p.win_tile, p.W - (qc0 + r) * p.win_tile), rows = G * nw;
        const float* slse = sm.lse + r * kWsRows;
        __syncthreads();  // the tiles are loaded and the previous probabilities consumed
        ws_ffma_tile_logits<D>(sm.qs + r * kWsRows * S::kLd, sm.ks, [&](int row, int c, float x) {
          const float lse = row < rows ? slse[row] : -INFINITY;
          const bool visible = lse != -INFINITY && spos[c] >= 0;
          ss[row * S::kSLd + c] = visible ? exp2f(x - lse) : 0.f;
        });
        __syncthreads();
        for (int il = part; il < nw; il += kParts) {
          float best = 0.f;
          for (int g = 0; g < G; ++g) best = fmaxf(best, ss[(il * G + g) * S::kSLd + c_red]);
          score += best;
        }
      }
      __syncthreads();  // ss now takes the parts' sums
      ss[part * S::kSLd + c_red] = score;
      __syncthreads();
      if (threadIdx.x < nk) {
        float total = qc0 == 0 ? 0.f : out[j0 + threadIdx.x];
#pragma unroll
        for (int t2 = 0; t2 < kParts; ++t2) total += ss[t2 * S::kSLd + threadIdx.x];
        out[j0 + threadIdx.x] = qc0 + nq < qchunks ? total : total / p.W;
      }
    }
  }
}

// The score pass on tensor cores takes the window queries in rounds of kWsRoundRows rows. Row r
// of a round is head g = r % Gp of query r / Gp, the group padded to Gp, the power of two >= G
// (rows g >= G are zero and score nothing), so that a query's rows sit at aligned places in the
// mma fragments and its max over the group is taken in registers and by shuffles: no logit or
// probability goes through shared memory.
constexpr int kWsRoundRows = 128;
constexpr int kWsRowGroups = kWsRoundRows / 32;  // 32 query rows per warp

__host__ __device__ inline int ws_padded_group(int G) {
  int gp = 1;
  while (gp < G) gp <<= 1;
  return gp;
}

// Shared memory of window_score_mma_kernel: two K tiles with their pos (a cp.async double
// buffer; the round's Q rows pass through the two tiles first), the rows' lse and the row
// groups' sums per key.
template <typename T, int D>
struct WsScoreMmaSmem {
  static constexpr int kLd = WsSmem<T, D, true>::kLd;
  static constexpr size_t kKs = 0;
  static constexpr size_t kPos = kKs + 2 * size_t(kWsKeys) * kLd * sizeof(T);
  static constexpr size_t kLse = kPos + 2 * kWsKeys * sizeof(int);
  static constexpr size_t kRed = kLse + kWsRoundRows * sizeof(float);
  static constexpr size_t kBytes = kRed + kWsRowGroups * kWsKeys * sizeof(float);
  static_assert(kWsRoundRows == 2 * kWsKeys, "a round's Q rows fill the two K tiles");
};

// Block: (b, h) and a group of score_tiles candidate tiles. Warp w keeps the B fragments of
// query rows 32 (w / 2) .. +31 of the round (four n8 tiles) in registers and multiplies them by
// keys 32 (w % 2) .. +31 of each tile (two m16 tiles of A: K stored [key][d]). Lane (g8, t4)
// of a C fragment holds keys g8 and g8 + 8, rows 2 t4 and 2 t4 + 1 of each n8 tile: the rows
// of one query are pairs in a lane, then the lanes of one g8 (xor 1, 2), then n8 tiles, then
// row groups (warps), by Gp. An empty slot's key is copied as it is (it may hold NaN): the
// garbage stays in its own key's column, which is written as 0.
template <typename T, int D>
__global__ void __launch_bounds__(kWsThreads, 2)
    window_score_mma_kernel(const WindowScoresParams p) {
  using S = WsScoreMmaSmem<T, D>;
  constexpr int kLd = S::kLd;
  extern __shared__ float4 ws_smem4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(ws_smem4);
  T* ks = reinterpret_cast<T*>(smem + S::kKs);
  int* spos = reinterpret_cast<int*>(smem + S::kPos);
  float* slse = reinterpret_cast<float*>(smem + S::kLse);
  float* red = reinterpret_cast<float*>(smem + S::kRed);
  const int G = p.Hq / p.Hkv, gp = ws_padded_group(G);
  const WsScoreBlock blk(p);
  const int M = blk.M, b = blk.b, h = blk.h, t_begin = blk.t_begin, t_end = blk.t_end;
  float* out = blk.out;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_group = warp >> 1, key0 = (warp & 1) * 32;
  const int g8 = lane >> 2, t4 = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  const int n_per_query = min(4, max(1, gp / 8));          // n8 tiles of one query in a warp
  const int groups_per_query = max(1, gp / 32);            // row groups of one query
  const int round_queries = kWsRoundRows / gp;

  for (int i0 = 0; i0 < p.W; i0 += round_queries) {
    const int nw = min(round_queries, p.W - i0);
    cp_async_wait<0>();
    __syncthreads();  // the previous round's tiles are consumed
    ws_load_queries<T, D, true>(p, b, h, i0, nw, gp, kWsRoundRows, ks, nullptr);
    for (int r = threadIdx.x; r < kWsRoundRows; r += blockDim.x) {
      const int g = r % gp, il = r / gp;
      float lse = INFINITY;  // a padding row, or a query that sees nothing: probability 0
      if (g < G && il < nw) {
        const float x = p.lse[(int64_t(b) * p.Hq + h * G + g) * p.W + i0 + il];
        lse = x == -INFINITY ? INFINITY : x;
      }
      slse[r] = lse;
    }
    __syncthreads();
    uint32_t qf[D / 16][2][4];  // [kk][pair of n8 tiles]: b0, b1 of tile 2 pair, then 2 pair + 1
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        const int row = 32 * row_group + 16 * pair + ((lane >> 4) << 3) + (lane & 7);
        ldmatrix_x4(qf[kk][pair], ks + row * kLd + kk * 16 + (lane & 8));
      }
    }
    float lse[4][2];
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int q = 0; q < 2; ++q) lse[n][q] = slse[32 * row_group + 8 * n + 2 * t4 + q];
    }
    __syncthreads();  // the tiles now take keys
    ws_copy_keys_async<T, D, kLd>(p, b, h, t_begin * kWsKeys, min(kWsKeys, M - t_begin * kWsKeys),
                                  ks, spos);
    cp_async_commit();
    for (int t = t_begin; t < t_end; ++t) {
      const int buf = (t - t_begin) & 1, j0 = t * kWsKeys, nk = min(kWsKeys, M - j0);
      if (t + 1 < t_end) {
        ws_copy_keys_async<T, D, kLd>(p, b, h, j0 + kWsKeys, min(kWsKeys, M - j0 - kWsKeys),
                                      ks + (buf ^ 1) * kWsKeys * kLd, spos + (buf ^ 1) * kWsKeys);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();  // tile t is in shared memory
      const T* kt = ks + buf * kWsKeys * kLd;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        float acc[4][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ka[4];
          ldmatrix_x4(ka, kt + (key0 + 16 * m + (lane & 15)) * kLd + kk * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            const uint32_t(&b)[4] = qf[kk][n >> 1];
            mma_m16n8k16<T>(acc[n], ka, b[2 * (n & 1)], b[2 * (n & 1) + 1]);
          }
        }
#pragma unroll
        for (int x = 0; x < 2; ++x) {  // key key0 + 16 m + 8 x + g8
          float total = 0.f, query_max = 0.f;
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            const float p0 = exp2f(acc[n][2 * x] * scale_log2 - lse[n][0]);
            const float p1 = exp2f(acc[n][2 * x + 1] * scale_log2 - lse[n][1]);
            float v = gp >= 2 ? fmaxf(p0, p1) : p0 + p1;
            // Lanes t4 ^ off hold rows 2 off further: the same query below Gp rows, else the next.
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
              const float o = __shfl_xor_sync(0xffffffffu, v, off);
              v = 2 * off < gp ? fmaxf(v, o) : v + o;
            }
            query_max = (n & (n_per_query - 1)) == 0 ? v : fmaxf(query_max, v);
            if (((n + 1) & (n_per_query - 1)) == 0) total += query_max;
          }
          if (t4 == 0) red[row_group * kWsKeys + key0 + 16 * m + 8 * x + g8] = total;
        }
      }
      __syncthreads();  // the row groups' sums are in; buffer `buf` is refilled next
      if (threadIdx.x < nk) {
        const int c = threadIdx.x;
        float score = 0.f;
        for (int q0 = 0; q0 < kWsRowGroups; q0 += groups_per_query) {
          float best = 0.f;
          for (int r = q0; r < q0 + groups_per_query; ++r) best = fmaxf(best, red[r * kWsKeys + c]);
          score += best;
        }
        float total = (i0 == 0 ? 0.f : out[j0 + c]) + score;
        if (i0 + nw == p.W) total /= p.W;
        out[j0 + c] = spos[buf * kWsKeys + c] >= 0 ? total : 0.f;
      }
    }
  }
}

// Sets win_tile, num_splits, split_len, score_tiles and resident_q; needs G <= kWsRows.
inline cudaError_t window_scores_plan(WindowScoresParams& p) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int G = p.Hq / p.Hkv;
  p.win_tile = kWsRows / G < p.W ? kWsRows / G : p.W;
  const int64_t qchunks = (p.W + p.win_tile - 1) / p.win_tile;
  const int64_t blocks_per_split = int64_t(p.B) * p.Hkv * qchunks;
  // One wave of the stats pass (two blocks per SM fit), at least 4 key tiles per split.
  int64_t splits = 2 * int64_t(sms) / blocks_per_split;
  const int64_t max_splits = (p.N + 4 * kWsKeys - 1) / (4 * kWsKeys);
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  int64_t len = (p.N + splits - 1) / splits;
  len = (len + kWsKeys - 1) / kWsKeys * kWsKeys;
  p.split_len = static_cast<int>(len);
  p.num_splits = static_cast<int>((p.N + len - 1) / len);
  // The score pass: (FFMA) every query tile resident when they fit; enough candidate tiles per
  // block that the queries' loads are shared, while keeping about four blocks per SM, spread
  // evenly over the blocks of a head.
  p.resident_q = static_cast<int>(qchunks < kWsMaxResidentQ ? qchunks : kWsMaxResidentQ);
  const int64_t head_tiles = (p.N - p.W + kWsKeys - 1) / kWsKeys;
  const int64_t per_block = int64_t(p.B) * p.Hkv * head_tiles / (4 * int64_t(sms));
  const int64_t most =
      per_block < 1 ? 1 : (per_block > kWsMaxScoreTiles ? kWsMaxScoreTiles : per_block);
  const int64_t head_groups = (head_tiles + most - 1) / most;
  p.score_tiles =
      static_cast<int>(head_groups > 0 ? (head_tiles + head_groups - 1) / head_groups : 1);
  return cudaSuccess;
}

// Launches kernel(p) on kWsThreads threads with smem bytes of dynamic shared memory, up to
// max_smem allowed.
template <typename Kernel>
cudaError_t ws_launch(Kernel kernel, dim3 grid, size_t max_smem, size_t smem,
                      const WindowScoresParams& p, cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(max_smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kWsThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Runs the three passes; p comes from window_scores_plan with part_m, part_l, lse and out set;
// N - W >= 1. kMma: the tensor-core logits (16-bit T, D % 16 == 0).
template <typename T, int D, bool kMma>
cudaError_t window_scores_launch(const WindowScoresParams& p, cudaStream_t stream) {
  using S = WsSmem<T, D, kMma>;
  const unsigned qchunks = static_cast<unsigned>((p.W + p.win_tile - 1) / p.win_tile);
  const dim3 stats_grid(p.B * p.Hkv * qchunks, p.num_splits);
  cudaError_t err;
  if constexpr (kMma) {
    constexpr size_t smem = WsStatsMmaSmem<T, D>::kBytes;
    err = ws_launch(window_stats_mma_kernel<T, D>, stats_grid, smem, smem, p, stream);
  } else {
    err = ws_launch(window_stats_ffma_kernel<T, D>, stats_grid, S::bytes(1), S::bytes(1), p,
                    stream);
  }
  if (err != cudaSuccess) return err;
  const int64_t rows = int64_t(p.B) * p.Hq * p.W;
  window_lse_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t tiles = (p.N - p.W + kWsKeys - 1) / kWsKeys;
  const int64_t score_groups = (tiles + p.score_tiles - 1) / p.score_tiles;
  const dim3 score_grid(static_cast<unsigned>(p.B * p.Hkv * score_groups));
  if constexpr (kMma) {
    constexpr size_t smem = WsScoreMmaSmem<T, D>::kBytes;
    return ws_launch(window_score_mma_kernel<T, D>, score_grid, smem, smem, p, stream);
  } else {
    return ws_launch(window_score_ffma_kernel<T, D>, score_grid, S::bytes(kWsMaxResidentQ),
                     S::bytes(p.resident_q), p, stream);
  }
}

}  // namespace gkv::kernels
