// lifetime_attention forward: causal attention where key j is visible to query i iff
// j <= i < death[j], FlashAttention-2 style. A block owns one query tile of one query head and
// streams the key tiles [0, diagonal] through shared memory (double-buffered cp.async) with an
// online softmax; visibility comes from death on the fly, key tiles nobody in the query tile
// sees are skipped, fully visible ones skip the per-element mask.
// Two paths: tensor cores (bf16/fp16, head_dim a multiple of 32: mma.sync m16n8k16, fp32
// accumulators, 16 query rows per warp) and a plain FFMA path (fp32 at full precision, and the
// tiny head dims; 4 threads per query row). No torch headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/lifetime_attention_common.cuh"

namespace gkv::kernels::lifetime {

// Problem sizes; tensors are contiguous: q/out [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T],
// lse [B,Hq,T].
struct Shape {
  int B, Hq, Hkv, T;
};

// The tensor-core path is taken for bf16/fp16 with head_dim 32, 64 or 128 (the tiny head dims
// are cheap enough on the FFMA path).
template <typename T, int D>
constexpr bool use_tensor_cores = !std::is_same_v<T, float> && D % 32 == 0;

// Key tile of each path; the death statistics are computed at this granularity.
template <typename T, int D>
constexpr int key_tile = use_tensor_cores<T, D> ? 64 : 32;

// Workspace of the death statistics (int2 per (b, h, key tile)), for any path.
inline int64_t stats_elems(const Shape& s) {
  return static_cast<int64_t>(s.B) * s.Hkv * cdiv(s.T, 32);
}

// ------------------------------------------------------------------------- tensor-core forward

// Warps per tensor-core block. Each warp owns 16 rows, so 8 warps make the stationary tile 128
// rows: every key/value byte a block streams from L2 then serves 128 queries (64 would make
// the forward L2-bandwidth-bound at long T). Small head dims keep 4 (smaller, more blocks).
template <int D>
constexpr int tc_warps = D >= 64 ? 8 : 4;

template <typename T, int D>
struct FwdTC {
  static constexpr int kWarps = tc_warps<D>;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = 16 * kWarps;  // queries per block
  static constexpr int BN = key_tile<T, D>;  // keys per tile
  static constexpr int LD = D + 8;        // padded row: conflict-free ldmatrix
  static constexpr size_t kSmem = (BM + 4 * BN) * LD * sizeof(T) + 2 * BN * sizeof(int32_t);
};

// A tensor-core query block (forward and dQ; C: its FwdTC or DqTC): BM query rows [m0, m0 + BM)
// of one query head, the last rows in the first blocks, and the key tiles it walks: those up to
// the diagonal that a query of the block still sees, double-buffered through cp.async.
template <typename T, int D, typename C>
struct TcQueryBlock {
  static constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  int m0, m_last, n_end;
  int64_t bhq, bh;  // (b, query head) and (b, KV head)
  const T* k_bh;
  const T* v_bh;
  const int32_t* death_bh;
  const int2* stats_bh;

  __device__ __forceinline__ TcQueryBlock(const T* k, const T* v, const int32_t* death,
                                          const int2* stats, const Shape& s) {
    m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest rows first
    const int flat = blockIdx.y, b = flat / s.Hq, h = (flat % s.Hq) / (s.Hq / s.Hkv);
    bhq = flat;
    bh = static_cast<int64_t>(b) * s.Hkv + h;
    k_bh = k + bh * s.T * D;
    v_bh = v + bh * s.T * D;
    death_bh = death + bh * s.T;
    stats_bh = stats + bh * cdiv(s.T, BN);
    m_last = min(m0 + BM, s.T) - 1;
    n_end = m_last / BN + 1;  // causal: tiles past the diagonal are invisible
  }

  // The first key tile from n on that some query of the block sees (n_end if none).
  __device__ __forceinline__ int next_tile(int n) const {
    while (n < n_end && stats_bh[n].y <= m0) ++n;
    return n;
  }

  // Key tile n of K, V and the deaths into buffer `stage` (asynchronous; the caller commits).
  __device__ __forceinline__ void load_kv(T* sK, T* sV, int32_t* sDeath, int n, int stage,
                                          int T_len, int tid) const {
    load_rows_async<T, BN, D, LD, C::kThreads>(sK + stage * BN * LD, k_bh, n * BN, T_len, tid);
    load_rows_async<T, BN, D, LD, C::kThreads>(sV + stage * BN * LD, v_bh, n * BN, T_len, tid);
    load_vec_async<int32_t, BN, C::kThreads>(sDeath + stage * BN, death_bh, n * BN, T_len, tid);
  }
};

// One block per (query tile of BM rows, b * Hq + query head).
// q/out [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T], stats [B*Hkv, T/BN] -> lse [B,Hq,T]
template <typename T, int D>
__global__ void __launch_bounds__(FwdTC<T, D>::kThreads)
    fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const int32_t* __restrict__ death, const int2* __restrict__ stats,
                  T* __restrict__ out, float* __restrict__ lse, Shape s, float scale_log2) {
  using C = FwdTC<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * LD;       // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;   // [2][BN][LD]
  int32_t* sDeath = reinterpret_cast<int32_t*>(sV + 2 * BN * LD);  // [2][BN]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t4 = lane % 4;
  const TcQueryBlock<T, D, C> blk(k, v, death, stats, s);
  const int m0 = blk.m0, m_last = blk.m_last, n_end = blk.n_end;
  const int64_t bhq = blk.bhq;

  load_rows_async<T, BM, D, LD, C::kThreads>(sQ, q + bhq * s.T * D, m0, s.T, tid);
  cp_async_commit();
  int n = blk.next_tile(0);
  if (n < n_end) blk.load_kv(sK, sV, sDeath, n, 0, s.T, tid);
  cp_async_commit();

  float acc[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int r0 = m0 + warp * 16 + g;  // this thread's rows: r0 and r0 + 8
  uint32_t qf[D / 16][4];
  cp_async_wait<1>();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], frag_a_ptr(sQ, LD, warp * 16, kk * 16, lane));
  }

  for (int stage = 0; n < n_end; stage ^= 1) {
    const int nn = blk.next_tile(n + 1);
    if (nn < n_end) blk.load_kv(sK, sV, sDeath, nn, stage ^ 1, s.T, tid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_s = sK + stage * BN * LD;
    const T* v_s = sV + stage * BN * LD;
    const int32_t* d_s = sDeath + stage * BN;

    float sc[BN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) mma_nk_tile<T, BN>(sc, qf[kk], k_s, LD, kk, lane);
    const int2 st = blk.stats_bh[n];
    const bool full = (n + 1) * BN - 1 <= m0 && st.x > m_last;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = r0 + (e / 2) * 8, jj = nt * 8 + 2 * t4 + (e % 2), j = n * BN + jj;
        const bool vis = full || (j <= i && i < d_s[jj]);
        sc[nt][e] = vis ? sc[nt][e] * scale_log2 : -INFINITY;
      }
    }
    // Online softmax over the two rows; the 4 threads of a quad share a row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // nothing visible yet: keep exp2 finite
      const float alpha = exp2f(row_max[r] - base);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        sc[nt][2 * r] = exp2f(sc[nt][2 * r] - base);
        sc[nt][2 * r + 1] = exp2f(sc[nt][2 * r + 1] - base);
        sum += sc[nt][2 * r] + sc[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;  // per-thread partial; reduced over the quad at the end
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][2 * r] *= alpha;
        acc[dn][2 * r + 1] *= alpha;
      }
    }
    // acc += P V, P straight from the accumulators.
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      uint32_t pf[4];
      acc_as_a<T, BN>(sc, kt, pf);
      mma_kn_tile<T, D>(acc, pf, v_s, LD, kt, lane);
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
    n = nn;
  }
  cp_async_wait<0>();  // no copy may outlive the block

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = r0 + r * 8;
    if (i >= s.T) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees nothing gives 0
    T* o = out + (static_cast<int64_t>(bhq) * s.T + i) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const uint32_t packed = pack2<T>(acc[dn][2 * r] * inv, acc[dn][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(o + dn * 8 + 2 * t4) = packed;
    }
    if (t4 == 0) {
      lse[static_cast<int64_t>(bhq) * s.T + i] =
          sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------- FFMA forward

// 4 threads per query row, each owning the head-dim columns c = t4 + 4 * e.
template <int D>
struct Simt {
  static constexpr int kThreads = 128;
  static constexpr int R = kThreads / 4;  // rows per block
  static constexpr int BN = 32;           // streamed tile
  static constexpr int E = D / 4;         // columns per thread
  static_assert(D % 4 == 0, "head_dim must be a multiple of 4");
};

// Tile rows [r0, r0 + BN) of a [n_rows, D] matrix into fp32 shared memory, zeros past n_rows.
template <typename T, int D, int BN>
__device__ __forceinline__ void load_rows_f32(float* s, const T* g, int r0, int n_rows, int tid,
                                              int n_threads) {
  for (int c = tid; c < BN * D; c += n_threads) {
    const int r = c / D;
    s[c] = r0 + r < n_rows ? to_float(g[static_cast<int64_t>(r0) * D + c]) : 0.f;
  }
}

// Sum over the 4 threads of a quad.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A SIMT query block (forward and dQ): R query rows of one query head, the last rows in the
// first blocks; a quad of threads (lane t4 of it) takes row i.
template <int D>
struct SimtQueryBlock {
  int tid, t4, m0, i, m_last;
  int64_t bh, row;  // (b, KV head) and (b, query head, i)
  const int2* stats_bh;

  __device__ __forceinline__ SimtQueryBlock(const int2* stats, const Shape& s) {
    using C = Simt<D>;
    tid = threadIdx.x;
    t4 = tid % 4;
    m0 = (gridDim.x - 1 - blockIdx.x) * C::R;
    i = m0 + tid / 4;
    const int bhq = blockIdx.y, b = bhq / s.Hq, h = (bhq % s.Hq) / (s.Hq / s.Hkv);
    bh = static_cast<int64_t>(b) * s.Hkv + h;
    row = static_cast<int64_t>(bhq) * s.T + i;
    stats_bh = stats + bh * cdiv(s.T, C::BN);
    m_last = min(m0 + C::R, s.T) - 1;
  }

  // Key tile n of K, V (as floats) and its deaths into shared memory; keys past T read as 0.
  template <typename T>
  __device__ __forceinline__ void load_key_tile(float* sK, float* sV, int32_t* sDeath, const T* k,
                                                const T* v, const int32_t* death, int n,
                                                const Shape& s) const {
    using C = Simt<D>;
    load_rows_f32<T, D, C::BN>(sK, k + bh * s.T * D, n * C::BN, s.T, tid, C::kThreads);
    load_rows_f32<T, D, C::BN>(sV, v + bh * s.T * D, n * C::BN, s.T, tid, C::kThreads);
    if (tid < C::BN) sDeath[tid] = n * C::BN + tid < s.T ? death[bh * s.T + n * C::BN + tid] : 0;
  }
};

// One block per (query tile of R rows, b * Hq + query head).
// q/out [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T], stats [B*Hkv, T/BN] -> lse [B,Hq,T]
template <typename T, int D>
__global__ void __launch_bounds__(Simt<D>::kThreads)
    fwd_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const int32_t* __restrict__ death, const int2* __restrict__ stats,
                    T* __restrict__ out, float* __restrict__ lse, Shape s, float scale_log2) {
  using C = Simt<D>;
  constexpr int BN = C::BN, E = C::E;
  __shared__ float sK[BN * D], sV[BN * D];
  __shared__ int32_t sDeath[BN];
  const SimtQueryBlock<D> blk(stats, s);
  const int t4 = blk.t4, m0 = blk.m0, i = blk.i;
  const int64_t row = blk.row;

  float qr[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qr[e] = i < s.T ? to_float(q[row * D + t4 + 4 * e]) : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int n = 0; n <= blk.m_last / BN; ++n) {
    if (blk.stats_bh[n].y <= m0) continue;  // every key of the tile is gone before m0
    __syncthreads();
    blk.load_key_tile(sK, sV, sDeath, k, v, death, n, s);
    __syncthreads();
    float sc[BN];
    float mx = m;
#pragma unroll
    for (int jj = 0; jj < BN; ++jj) {
      float part = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) part += qr[e] * sK[jj * D + t4 + 4 * e];
      part = quad_sum(part);
      const int j = n * BN + jj;
      sc[jj] = j <= i && i < sDeath[jj] ? part * scale_log2 : -INFINITY;
      mx = fmaxf(mx, sc[jj]);
    }
    const float base = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m - base);
    m = mx;
    l *= alpha;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= alpha;
#pragma unroll
    for (int jj = 0; jj < BN; ++jj) {
      const float p = exp2f(sc[jj] - base);
      l += p;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += p * sV[jj * D + t4 + 4 * e];
    }
  }
  if (i >= s.T) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) out[row * D + t4 + 4 * e] = from_float<T>(acc[e] * inv);
  if (t4 == 0) lse[row] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// ----------------------------------------------------------------------------------- launcher

// out [B,Hq,T,D] and lse [B,Hq,T] from q [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T];
// stats: workspace of stats_elems(s) int2. All contiguous; B*Hq <= 65535.
template <typename T, int D>
cudaError_t forward(const T* q, const T* k, const T* v, const int32_t* death, T* out, float* lse,
                    int2* stats, Shape s, float scale, cudaStream_t stream) {
  if (static_cast<int64_t>(s.B) * s.Hq == 0 || s.T == 0) return cudaSuccess;
  if (static_cast<int64_t>(s.B) * s.Hq > 65535) return cudaErrorInvalidConfiguration;
  constexpr int BN = key_tile<T, D>;
  cudaError_t err = launch_tile_stats(death, stats, static_cast<int64_t>(s.B) * s.Hkv, s.T, BN,
                                      stream);
  if (err != cudaSuccess) return err;
  const float scale_log2 = scale * kLog2e;
  if constexpr (use_tensor_cores<T, D>) {
    using C = FwdTC<T, D>;
    err = cudaFuncSetAttribute(fwd_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(C::kSmem));
    if (err != cudaSuccess) return err;
    const dim3 grid(cdiv(s.T, C::BM), s.B * s.Hq);
    fwd_tc_kernel<T, D><<<grid, C::kThreads, C::kSmem, stream>>>(q, k, v, death, stats, out,
                                                                 lse, s, scale_log2);
  } else {
    using C = Simt<D>;
    const dim3 grid(cdiv(s.T, C::R), s.B * s.Hq);
    fwd_simt_kernel<T, D><<<grid, C::kThreads, 0, stream>>>(q, k, v, death, stats, out, lse, s,
                                                            scale_log2);
  }
  return cudaGetLastError();
}

}  // namespace gkv::kernels::lifetime
