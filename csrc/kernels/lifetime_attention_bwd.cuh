// lifetime_attention backward (FlashAttention-2 formulas with D_i = rowsum(dO_i * O_i) and
// dS = P * (dP - D)), as two deterministic kernels instead of one with atomics:
//   dQ:    per query tile, stream the visible key tiles (like the forward) and accumulate dS K;
//   dK/dV: per key tile, stream the query tiles of all G heads of the group that can see it
//          (queries [j0, max death)) and accumulate P^T dO and dS^T Q in registers.
// Both recompute P from the forward's lse. Same two paths as the forward (tensor cores for
// bf16/fp16 with head_dim a multiple of 32, FFMA otherwise). No torch headers.
#pragma once

#include "kernels/lifetime_attention.cuh"

namespace gkv::kernels::lifetime {

// ----------------------------------------------------------------------------- tensor-core dQ

template <typename T, int D>
struct DqTC {
  static constexpr int kWarps = tc_warps<D>;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = 16 * kWarps;
  static constexpr int BN = key_tile<T, D>;
  static constexpr int LD = D + 8;
  static constexpr size_t kSmem = (2 * BM + 4 * BN) * LD * sizeof(T) + 2 * BN * sizeof(int32_t);
};

// One block per (query tile of BM rows, b * Hq + query head).
// q/dout/dq [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T], lse/delta [B,Hq,T]
template <typename T, int D>
__global__ void __launch_bounds__(DqTC<T, D>::kThreads)
    dq_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const T* __restrict__ dout, const int32_t* __restrict__ death,
                 const float* __restrict__ lse, const float* __restrict__ delta,
                 const int2* __restrict__ stats, T* __restrict__ dq, Shape s, float scale) {
  using C = DqTC<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;      // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;   // [2][BN][LD]
  int32_t* sDeath = reinterpret_cast<int32_t*>(sV + 2 * BN * LD);  // [2][BN]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t4 = lane % 4;
  const TcQueryBlock<T, D, C> blk(k, v, death, stats, s);
  const int m0 = blk.m0, m_last = blk.m_last, n_end = blk.n_end;
  const int64_t row0 = blk.bhq * s.T;
  const float scale_log2 = scale * kLog2e;

  load_rows_async<T, BM, D, LD, C::kThreads>(sQ, q + row0 * D, m0, s.T, tid);
  load_rows_async<T, BM, D, LD, C::kThreads>(sdO, dout + row0 * D, m0, s.T, tid);
  int n = blk.next_tile(0);
  if (n < n_end) blk.load_kv(sK, sV, sDeath, n, 0, s.T, tid);
  cp_async_commit();

  const int r0 = m0 + warp * 16 + g;  // rows r0, r0 + 8
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r0 + 8 * r;
    lse2[r] = i < s.T ? lse[row0 + i] * kLog2e : 0.f;
    dl[r] = i < s.T ? delta[row0 + i] : 0.f;
  }
  float acc[D / 8][4] = {};

  for (int stage = 0; n < n_end; stage ^= 1) {
    const int nn = blk.next_tile(n + 1);
    if (nn < n_end) blk.load_kv(sK, sV, sDeath, nn, stage ^ 1, s.T, tid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_s = sK + stage * BN * LD;
    const T* v_s = sV + stage * BN * LD;
    const int32_t* d_s = sDeath + stage * BN;

    float sc[BN / 8][4] = {}, dp[BN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qf[4], of[4];
      ldmatrix_x4(qf, frag_a_ptr(sQ, LD, warp * 16, kk * 16, lane));
      ldmatrix_x4(of, frag_a_ptr(sdO, LD, warp * 16, kk * 16, lane));
      mma_nk_tile<T, BN>(sc, qf, k_s, LD, kk, lane);
      mma_nk_tile<T, BN>(dp, of, v_s, LD, kk, lane);
    }
    const int2 st = blk.stats_bh[n];
    const bool full = (n + 1) * BN - 1 <= m0 && st.x > m_last;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, i = r0 + 8 * r, jj = nt * 8 + 2 * t4 + (e % 2), j = n * BN + jj;
        const bool vis = full || (j <= i && i < d_s[jj]);
        const float p = vis ? exp2f(sc[nt][e] * scale_log2 - lse2[r]) : 0.f;
        sc[nt][e] = p * (dp[nt][e] - dl[r]);  // dS
      }
    }
    // acc += dS K
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      uint32_t af[4];
      acc_as_a<T, BN>(sc, kt, af);
      mma_kn_tile<T, D>(acc, af, k_s, LD, kt, lane);
    }
    __syncthreads();
    n = nn;
  }
  cp_async_wait<0>();  // no copy may outlive the block, even when no tile was visible

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r0 + 8 * r;
    if (i >= s.T) continue;
    T* o = dq + (row0 + i) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(o + dn * 8 + 2 * t4) =
          pack2<T>(acc[dn][2 * r] * scale, acc[dn][2 * r + 1] * scale);
    }
  }
}

// -------------------------------------------------------------------------- tensor-core dK/dV

template <typename T, int D>
struct DkvTC {
  static constexpr int kWarps = tc_warps<D>;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BN = 16 * kWarps;  // keys per block: a whole number of stats tiles
  static constexpr int BM = D > 64 ? 32 : 64;  // streamed queries; 32 at D = 128 for registers
  static constexpr int LD = D + 8;
  static constexpr size_t kSmem =
      (2 * BN + 4 * BM) * LD * sizeof(T) + 4 * BM * sizeof(float);
  static_assert(BN % key_tile<T, D> == 0, "whole stats tiles per block");
};

// One block per (key tile of BN keys, b * Hkv + KV head).
// q/dout [B,Hq,T,D], k/v/dk/dv [B,Hkv,T,D], death [B,Hkv,T], lse/delta [B,Hq,T]
template <typename T, int D>
__global__ void __launch_bounds__(DkvTC<T, D>::kThreads)
    dkv_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const T* __restrict__ dout, const int32_t* __restrict__ death,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  const int2* __restrict__ stats, T* __restrict__ dk, T* __restrict__ dv,
                  Shape s, float scale) {
  using C = DkvTC<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;        // [2][BM][LD]
  T* sdO = sQ + 2 * BM * LD;   // [2][BM][LD]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // [2][BM]
  float* sDl = sLse + 2 * BM;                                 // [2][BM]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t4 = lane % 4;
  const int n_tile = blockIdx.x, n0 = n_tile * BN;
  const int bh_idx = blockIdx.y, b = bh_idx / s.Hkv, h = bh_idx % s.Hkv, G = s.Hq / s.Hkv;
  const int64_t bh = bh_idx;
  // Death statistics of the block's keys, from its key_tile-sized stats entries; entries past
  // the last one hold keys past T, which count as death 0 (never visible).
  constexpr int kPer = BN / key_tile<T, D>;
  const int n_stats = cdiv(s.T, key_tile<T, D>);
  int2 st = make_int2(INT32_MAX, INT32_MIN);
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int e = n_tile * kPer + u;
    const int2 x = e < n_stats ? stats[bh * n_stats + e] : make_int2(0, INT32_MIN);
    st = make_int2(min(st.x, x.x), max(st.y, x.y));
  }
  // Queries that can see a key of this tile: [n0, min(T, max death)).
  const int i_end = min(s.T, st.y);
  const int q_lo = n0 / BM, nq = i_end > n0 ? cdiv(i_end, BM) - q_lo : 0;
  const int total = G * nq;
  const float scale_log2 = scale * kLog2e;
  auto load_q = [&](int idx, int stage) {
    const int i0 = (q_lo + idx % nq) * BM;
    const int64_t row0 = (static_cast<int64_t>(b) * s.Hq + h * G + idx / nq) * s.T;
    load_rows_async<T, BM, D, LD, C::kThreads>(sQ + stage * BM * LD, q + row0 * D, i0, s.T, tid);
    load_rows_async<T, BM, D, LD, C::kThreads>(sdO + stage * BM * LD, dout + row0 * D, i0, s.T,
                                               tid);
    load_vec_async<float, BM, C::kThreads>(sLse + stage * BM, lse + row0, i0, s.T, tid);
    load_vec_async<float, BM, C::kThreads>(sDl + stage * BM, delta + row0, i0, s.T, tid);
  };

  if (total > 0) {
    load_rows_async<T, BN, D, LD, C::kThreads>(sK, k + bh * s.T * D, n0, s.T, tid);
    load_rows_async<T, BN, D, LD, C::kThreads>(sV, v + bh * s.T * D, n0, s.T, tid);
    load_q(0, 0);
  }
  cp_async_commit();

  const int j0 = n0 + warp * 16 + g;  // this thread's keys: j0 and j0 + 8
  int dj[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) dj[r] = j0 + 8 * r < s.T ? death[bh * s.T + j0 + 8 * r] : 0;
  float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};

  for (int idx = 0, stage = 0; idx < total; ++idx, stage ^= 1) {
    if (idx + 1 < total) load_q(idx + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* q_s = sQ + stage * BM * LD;
    const T* do_s = sdO + stage * BM * LD;
    const float* lse_s = sLse + stage * BM;
    const float* dl_s = sDl + stage * BM;
    const int i0 = (q_lo + idx % nq) * BM;

    // S^T = K Q^T and dP^T = V dO^T: rows = this warp's 16 keys, columns = the BM queries.
    float sc[BM / 8][4] = {}, dp[BM / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kf[4], vf[4];
      ldmatrix_x4(kf, frag_a_ptr(sK, LD, warp * 16, kk * 16, lane));
      ldmatrix_x4(vf, frag_a_ptr(sV, LD, warp * 16, kk * 16, lane));
      mma_nk_tile<T, BM>(sc, kf, q_s, LD, kk, lane);
      mma_nk_tile<T, BM>(dp, vf, do_s, LD, kk, lane);
    }
    const bool full = n0 + BN - 1 <= i0 && i0 + BM <= s.T && st.x > i0 + BM - 1;
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, j = j0 + 8 * r, ii = nt * 8 + 2 * t4 + (e % 2), i = i0 + ii;
        const bool vis = full || (j <= i && i < dj[r] && i < s.T);
        const float p = vis ? exp2f(sc[nt][e] * scale_log2 - lse_s[ii] * kLog2e) : 0.f;
        sc[nt][e] = p;                          // P^T
        dp[nt][e] = p * (dp[nt][e] - dl_s[ii]);  // dS^T
      }
    }
    // dV += P^T dO and dK += dS^T Q; the k dimension is the BM queries.
#pragma unroll
    for (int kt = 0; kt < BM / 16; ++kt) {
      uint32_t pf[4], sf[4];
      acc_as_a<T, BM>(sc, kt, pf);
      acc_as_a<T, BM>(dp, kt, sf);
      mma_kn_tile<T, D>(dv_acc, pf, do_s, LD, kt, lane);
      mma_kn_tile<T, D>(dk_acc, sf, q_s, LD, kt, lane);
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + 8 * r;
    if (j >= s.T) continue;
    const int64_t off = (bh * s.T + j) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(dk + off + dn * 8 + 2 * t4) =
          pack2<T>(dk_acc[dn][2 * r] * scale, dk_acc[dn][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv + off + dn * 8 + 2 * t4) =
          pack2<T>(dv_acc[dn][2 * r], dv_acc[dn][2 * r + 1]);
    }
  }
}

// ------------------------------------------------------------------------------------ FFMA dQ

// One block per (query tile of R rows, b * Hq + query head).
// q/dout/dq [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T], lse/delta [B,Hq,T]
template <typename T, int D>
__global__ void __launch_bounds__(Simt<D>::kThreads)
    dq_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const T* __restrict__ dout, const int32_t* __restrict__ death,
                   const float* __restrict__ lse, const float* __restrict__ delta,
                   const int2* __restrict__ stats, T* __restrict__ dq, Shape s, float scale) {
  using C = Simt<D>;
  constexpr int BN = C::BN, E = C::E;
  __shared__ float sK[BN * D], sV[BN * D];
  __shared__ int32_t sDeath[BN];
  const SimtQueryBlock<D> blk(stats, s);
  const int t4 = blk.t4, m0 = blk.m0, i = blk.i;
  const int64_t row = blk.row;
  const float scale_log2 = scale * kLog2e;

  float qr[E], dor[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qr[e] = i < s.T ? to_float(q[row * D + t4 + 4 * e]) : 0.f;
    dor[e] = i < s.T ? to_float(dout[row * D + t4 + 4 * e]) : 0.f;
    acc[e] = 0.f;
  }
  const float lse2 = i < s.T ? lse[row] * kLog2e : 0.f, dl = i < s.T ? delta[row] : 0.f;
  for (int n = 0; n <= blk.m_last / BN; ++n) {
    if (blk.stats_bh[n].y <= m0) continue;
    __syncthreads();
    blk.load_key_tile(sK, sV, sDeath, k, v, death, n, s);
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < BN; ++jj) {
      float sp = 0.f, dpp = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        sp += qr[e] * sK[jj * D + t4 + 4 * e];
        dpp += dor[e] * sV[jj * D + t4 + 4 * e];
      }
      sp = quad_sum(sp);
      dpp = quad_sum(dpp);
      const int j = n * BN + jj;
      const float p = j <= i && i < sDeath[jj] ? exp2f(sp * scale_log2 - lse2) : 0.f;
      const float ds = p * (dpp - dl);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += ds * sK[jj * D + t4 + 4 * e];
    }
  }
  if (i >= s.T) return;
#pragma unroll
  for (int e = 0; e < E; ++e) dq[row * D + t4 + 4 * e] = from_float<T>(acc[e] * scale);
}

// --------------------------------------------------------------------------------- FFMA dK/dV

// One block per (key tile of R keys, b * Hkv + KV head).
// q/dout [B,Hq,T,D], k/v/dk/dv [B,Hkv,T,D], death [B,Hkv,T], lse/delta [B,Hq,T]
template <typename T, int D>
__global__ void __launch_bounds__(Simt<D>::kThreads)
    dkv_simt_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ dout, const int32_t* __restrict__ death,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    const int2* __restrict__ stats, T* __restrict__ dk, T* __restrict__ dv,
                    Shape s, float scale) {
  using C = Simt<D>;
  constexpr int BM = C::BN, E = C::E;  // BM streamed queries; C::R keys per block
  static_assert(C::R == C::BN, "one stats entry per block");
  __shared__ float sQ[BM * D], sdO[BM * D], sLse[BM], sDl[BM];
  const int tid = threadIdx.x, t4 = tid % 4;
  const int n_tile = blockIdx.x, n0 = n_tile * C::R, j = n0 + tid / 4;
  const int bh_idx = blockIdx.y, b = bh_idx / s.Hkv, h = bh_idx % s.Hkv, G = s.Hq / s.Hkv;
  const int64_t bh = bh_idx, key = bh * s.T + j;
  const int i_end = min(s.T, stats[bh * cdiv(s.T, C::R) + n_tile].y);
  const int dj = j < s.T ? death[key] : 0;
  const float scale_log2 = scale * kLog2e;

  float kr[E], vr[E], dk_acc[E], dv_acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    kr[e] = j < s.T ? to_float(k[key * D + t4 + 4 * e]) : 0.f;
    vr[e] = j < s.T ? to_float(v[key * D + t4 + 4 * e]) : 0.f;
    dk_acc[e] = dv_acc[e] = 0.f;
  }
  for (int gi = 0; gi < G; ++gi) {
    const int64_t row0 = (static_cast<int64_t>(b) * s.Hq + h * G + gi) * s.T;
    for (int i0 = (n0 / BM) * BM; i0 < i_end; i0 += BM) {
      __syncthreads();
      load_rows_f32<T, D, BM>(sQ, q + row0 * D, i0, s.T, tid, C::kThreads);
      load_rows_f32<T, D, BM>(sdO, dout + row0 * D, i0, s.T, tid, C::kThreads);
      if (tid < BM) {
        sLse[tid] = i0 + tid < s.T ? lse[row0 + i0 + tid] * kLog2e : 0.f;
        sDl[tid] = i0 + tid < s.T ? delta[row0 + i0 + tid] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < BM; ++ii) {
        float sp = 0.f, dpp = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          sp += kr[e] * sQ[ii * D + t4 + 4 * e];
          dpp += vr[e] * sdO[ii * D + t4 + 4 * e];
        }
        sp = quad_sum(sp);
        dpp = quad_sum(dpp);
        const int i = i0 + ii;
        const float p = j <= i && i < dj && i < s.T ? exp2f(sp * scale_log2 - sLse[ii]) : 0.f;
        const float ds = p * (dpp - sDl[ii]);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          dv_acc[e] += p * sdO[ii * D + t4 + 4 * e];
          dk_acc[e] += ds * sQ[ii * D + t4 + 4 * e];
        }
      }
    }
  }
  if (j >= s.T) return;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    dk[key * D + t4 + 4 * e] = from_float<T>(dk_acc[e] * scale);
    dv[key * D + t4 + 4 * e] = from_float<T>(dv_acc[e]);
  }
}

// ----------------------------------------------------------------------------------- launcher

// dq [B,Hq,T,D], dk/dv [B,Hkv,T,D] from dout/q/out [B,Hq,T,D], k/v [B,Hkv,T,D], death [B,Hkv,T],
// lse [B,Hq,T]. Workspaces: delta [B,Hq,T] fp32, stats of stats_elems(s) int2. All contiguous;
// B*Hq <= 65535.
template <typename T, int D>
cudaError_t backward(const T* dout, const T* q, const T* k, const T* v, const int32_t* death,
                     const T* out, const float* lse, T* dq, T* dk, T* dv, float* delta,
                     int2* stats, Shape s, float scale, cudaStream_t stream) {
  if (static_cast<int64_t>(s.B) * s.Hq == 0 || s.T == 0) return cudaSuccess;
  if (static_cast<int64_t>(s.B) * s.Hq > 65535) return cudaErrorInvalidConfiguration;
  const int64_t rows = static_cast<int64_t>(s.B) * s.Hq * s.T;
  delta_kernel<T, D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(dout, out, delta,
                                                                                 rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  constexpr int BN = key_tile<T, D>;
  err = launch_tile_stats(death, stats, static_cast<int64_t>(s.B) * s.Hkv, s.T, BN, stream);
  if (err != cudaSuccess) return err;
  if constexpr (use_tensor_cores<T, D>) {
    using Q = DqTC<T, D>;
    using K = DkvTC<T, D>;
    err = cudaFuncSetAttribute(dq_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(Q::kSmem));
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(dkv_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(K::kSmem));
    if (err != cudaSuccess) return err;
    dq_tc_kernel<T, D><<<dim3(cdiv(s.T, Q::BM), s.B * s.Hq), Q::kThreads, Q::kSmem,
                         stream>>>(q, k, v, dout, death, lse, delta, stats, dq, s, scale);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    dkv_tc_kernel<T, D><<<dim3(cdiv(s.T, K::BN), s.B * s.Hkv), K::kThreads, K::kSmem,
                          stream>>>(q, k, v, dout, death, lse, delta, stats, dk, dv, s, scale);
  } else {
    using C = Simt<D>;
    dq_simt_kernel<T, D><<<dim3(cdiv(s.T, C::R), s.B * s.Hq), C::kThreads, 0, stream>>>(
        q, k, v, dout, death, lse, delta, stats, dq, s, scale);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    dkv_simt_kernel<T, D><<<dim3(cdiv(s.T, C::R), s.B * s.Hkv), C::kThreads, 0, stream>>>(
        q, k, v, dout, death, lse, delta, stats, dk, dv, s, scale);
  }
  return cudaGetLastError();
}

}  // namespace gkv::kernels::lifetime
