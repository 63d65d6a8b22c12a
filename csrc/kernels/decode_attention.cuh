// Flash-decoding with GQA, empty-slot masking and optional score emission (gkv::decode_attention).
//
// Three launches on one stream:
//   1. split:   grid (B*Hkv*chunks, splits). A block takes one KV head, TG of its G query heads
//               (a "chunk"; TG = G whenever G <= 8, so K and V are read once for the whole GQA
//               group) and one range of slots. 4 warps stream the range with 16-byte cp.async
//               copies through a 3-stage per-thread ring in shared memory; a group of D/kVec
//               lanes shares one key. fp32 online softmax in log2 units; the block writes its
//               partial (max, sum, acc) per query head.
//   2. combine: grid B*Hq. Merges the partials into out, and into lse when emitting.
//   3. emit:    only with score_acc. The split kernel also stored every logit (fp32 scratch), so
//               this pass adds max_g exp2(logit - lse) into score_acc without re-reading K.
// Slots >= length are never read; empty slots (pos < 0) are masked before they reach a sum, so
// garbage or NaN in either cannot leak.
#pragma once

#include <cmath>
#include <type_traits>

#include "kernels/common.cuh"

namespace gkv::kernels {

struct DecodeAttentionParams {
  const void* q;            // [B, Hq, d] contiguous
  const void* k;            // [B, Hkv, C, d], d contiguous, other strides in k_stride
  const void* v;            // [B, Hkv, C, d], d contiguous, other strides in v_stride
  const int32_t* pos;       // [B, Hkv, C], strides in pos_stride
  int64_t k_stride[3];      // elements, for dims B, Hkv, C (16-byte multiples)
  int64_t v_stride[3];
  int64_t pos_stride[3];
  int B, Hq, Hkv, C, length;
  float scale;
  void* out;                // [B, Hq, d] contiguous, dtype of q
  float* score_acc;         // [B, Hkv, C] contiguous, or nullptr: no emission
  int num_splits;           // from decode_attention_plan
  int split_len;            // slots per split
  float* part_m;            // [B, Hq, num_splits] max logit (log2 units)
  float* part_l;            // [B, Hq, num_splits] sum of exp2(logit - max)
  float* part_acc;          // [B, Hq, num_splits, d] sum of exp2(logit - max) * v
  float* logits;            // [B, Hq, length] log2-unit logits, only when emitting
  float* lse;               // [B, Hq] log2-unit log-sum-exp, only when emitting
};

constexpr int kDecodeWarps = 4;
constexpr int kEmitThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D>
struct DecodeConfig {
  static constexpr int kVec = 16 / sizeof(T);          // elements per 16-byte load
  static constexpr int kTpk = D / kVec;                // lanes sharing one key
  static constexpr int kKpw = 32 / kTpk;               // keys per warp per load
  // Keys per lane per step, and steps of cp.async loads in flight: each warp keeps
  // (kStages - 1) * kKpw * kUnroll keys of K and V (4 KB for 16-bit d = 128) on their way to
  // shared memory while it computes, within 48 KB of static shared memory per block.
  static constexpr int kUnroll = 2;
  static constexpr int kStages = 3;
  static constexpr int kKeysPerStep = kDecodeWarps * kKpw * kUnroll;  // per block
  static_assert(D % kVec == 0 && kTpk >= 1 && kTpk <= 32, "head_dim must be 8..128 elements");
};

// Query heads per block: the largest of 8..1 dividing G, so one block covers a whole group of up
// to 8 heads and larger groups split into equal chunks.
inline int decode_tile_group(int G) {
  for (int tg = 8; tg > 1; --tg)
    if (G % tg == 0) return tg;
  return 1;
}

template <typename F>
void dispatch_tile_group(int tg, F&& f) {
  switch (tg) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

// Converts 16 bytes holding N elements of T to floats.
template <typename T, int N>
__device__ __forceinline__ void unpack_vec16(const uint4& raw, float (&dst)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte vector");
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = to_float(e[i]);
}

// Loads 16 bytes of T at ptr (16-byte aligned) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_vec16(const T* ptr, float (&dst)[N]) {
  unpack_vec16<T>(__ldg(reinterpret_cast<const uint4*>(ptr)), dst);
}

// Asynchronous global -> shared copies of 16 or 4 bytes; with valid = false nothing is read and
// the destination is zero-filled.
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
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T, int D, int TG>
__global__ void __launch_bounds__(kDecodeWarps * 32, 2)
    decode_split_kernel(const DecodeAttentionParams p) {
  using Cfg = DecodeConfig<T, D>;
  constexpr int kVec = Cfg::kVec, kTpk = Cfg::kTpk, kKpw = Cfg::kKpw, kU = Cfg::kUnroll;
  constexpr int kStages = Cfg::kStages;
  constexpr float kNegInf = -INFINITY;
  const int G = p.Hq / p.Hkv;
  const int chunks = G / TG;
  const int bh = blockIdx.x / chunks;  // chunks of one KV head are adjacent: they share K in L2
  const int chunk = blockIdx.x % chunks;
  const int split = blockIdx.y;
  const int b = bh / p.Hkv, h = bh % p.Hkv;
  const int hq0 = h * G + chunk * TG;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kl = lane / kTpk;  // which key of the warp's kKpw
  const int dl = lane % kTpk;  // which 16-byte slice of that key

  // q pre-scaled into log2 units: logit = (scale * log2 e) * q.k, softmax with exp2.
  float qr[TG][kVec];
  const T* qp = static_cast<const T*>(p.q) + (int64_t(b) * p.Hq + hq0) * D + dl * kVec;
#pragma unroll
  for (int g = 0; g < TG; ++g) {
    load_vec16(qp + g * D, qr[g]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) qr[g][e] *= p.scale * kLog2e;
  }

  float m[TG], l[TG], acc[TG][kVec];
#pragma unroll
  for (int g = 0; g < TG; ++g) {
    m[g] = kNegInf;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  const int begin = split * p.split_len;
  const int end = min(begin + p.split_len, p.length);
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1] + dl * kVec;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1] + dl * kVec;
  const int32_t* pb = p.pos + b * p.pos_stride[0] + h * p.pos_stride[1];
  float* lg = p.logits != nullptr ? p.logits + (int64_t(b) * p.Hq + hq0) * p.length : nullptr;

  // Each thread streams its own slices (its kU keys, its 16 bytes of each) through a private
  // ring of kStages shared-memory slots, so the pipeline needs no barrier: a thread only ever
  // reads what its own cp.async wrote. Slots past `end` are zero-filled and never used.
  __shared__ uint4 ring_k[kStages][kU][kDecodeWarps * 32];
  __shared__ uint4 ring_v[kStages][kU][kDecodeWarps * 32];
  __shared__ int32_t ring_pos[kStages][kU][kDecodeWarps * 32];
  constexpr int kWarpStep = kKpw * kU;                  // keys of one warp per step
  constexpr int kBlockStep = kDecodeWarps * kWarpStep;  // keys of the block per step
  auto step_start = [&](int t) { return begin + t * kBlockStep + warp * kWarpStep; };
  auto issue = [&](int t) {
    const int j0 = step_start(t);
    if (j0 < end) {
      const int slot = t % kStages;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int j = j0 + u * kKpw + kl;
        const bool ok = j < end;
        cp_async16(&ring_k[slot][u][threadIdx.x], ok ? kb + j * p.k_stride[2] : kb, ok);
        cp_async16(&ring_v[slot][u][threadIdx.x], ok ? vb + j * p.v_stride[2] : vb, ok);
        cp_async4(&ring_pos[slot][u][threadIdx.x], ok ? pb + j * p.pos_stride[2] : pb, ok);
      }
    }
    cp_async_commit();  // possibly empty: keeps one group per step for the wait below
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue(t);

  for (int t = 0; step_start(t) < end; ++t) {
    issue(t + kStages - 1);  // refills the slot that step t - 1 consumed
    cp_async_wait<kStages - 1>();  // step t has landed
    const int slot = t % kStages;
    const int j0 = step_start(t);
    // Empty slots (pos < 0) were loaded too and are masked here: their K and V never reach a sum.
    bool in_range[kU], live[kU];
    float kf[kU][kVec], vf[kU][kVec];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      in_range[u] = j0 + u * kKpw + kl < end;
      live[u] = in_range[u] && ring_pos[slot][u][threadIdx.x] >= 0;
      unpack_vec16<T>(ring_k[slot][u][threadIdx.x], kf[u]);
      unpack_vec16<T>(ring_v[slot][u][threadIdx.x], vf[u]);
    }
    float s[kU][TG];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int g = 0; g < TG; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(qr[g][e], kf[u][e], dot);
        s[u][g] = dot;
      }
    }
    // The kTpk lanes of a key each hold a partial dot product; butterfly-sum them.
#pragma unroll
    for (int off = kTpk / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
#pragma unroll
        for (int g = 0; g < TG; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int j = j0 + u * kKpw + kl;
#pragma unroll
      for (int g = 0; g < TG; ++g) {
        if (!live[u]) s[u][g] = kNegInf;
        // Lanes of a key take turns storing, so the G stores of a key come from different lanes.
        if (lg != nullptr && in_range[u] && dl == g % kTpk) lg[int64_t(g) * p.length + j] = s[u][g];
      }
    }
#pragma unroll
    for (int g = 0; g < TG; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < kU; ++u) mx = fmaxf(mx, s[u][g]);
      if (mx > m[g]) {  // rescale only when the running max grows
        const float corr = exp2f(m[g] - mx);
        l[g] *= corr;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] *= corr;
        m[g] = mx;
      }
      if (m[g] != kNegInf) {
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (live[u]) {  // a dead slot's v may be NaN: skip it rather than multiply by 0
            const float pu = exp2f(s[u][g] - m[g]);
            l[g] += pu;
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(pu, vf[u][e], acc[g][e]);
          }
        }
      }
    }
  }

  cp_async_wait<0>();  // the trailing (empty or unused) groups

  // Merge the kKpw key lanes of the warp (lanes that differ in the bits above kTpk).
#pragma unroll
  for (int off = kTpk; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < TG; ++g) {
      const float om = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float ol = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float mx = fmaxf(m[g], om);
      const float ms = mx == kNegInf ? 0.f : mx;  // both empty: keep zeros, avoid inf - inf
      const float c0 = exp2f(m[g] - ms), c1 = exp2f(om - ms);
      l[g] = l[g] * c0 + ol * c1;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float oa = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * c0 + oa * c1;
      }
      m[g] = mx;
    }
  }

  // Merge the warps through shared memory and write this split's partials.
  __shared__ float sm_m[kDecodeWarps][TG], sm_l[kDecodeWarps][TG];
  __shared__ float sm_acc[kDecodeWarps][TG][D];
  if (kl == 0) {
#pragma unroll
    for (int g = 0; g < TG; ++g) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sm_acc[warp][g][dl * kVec + e] = acc[g][e];
      if (dl == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < TG * D; i += blockDim.x) {
    const int g = i / D, e = i % D;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    const float ms = mx == kNegInf ? 0.f : mx;
    float a = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float c = exp2f(sm_m[w][g] - ms);
      a += sm_acc[w][g][e] * c;
      lsum += sm_l[w][g] * c;
    }
    const int64_t row = (int64_t(b) * p.Hq + hq0 + g) * p.num_splits + split;
    p.part_acc[row * D + e] = a;
    if (e == 0) {
      p.part_m[row] = mx;
      p.part_l[row] = lsum;
    }
  }
}

// One block per (b, query head), max(D, 32) threads: thread e < D owns output element e.
template <typename T, int D>
__global__ void decode_combine_kernel(const DecodeAttentionParams p) {
  const int64_t row = blockIdx.x;  // b * Hq + hq
  const int e = threadIdx.x;
  const float* pm = p.part_m + row * p.num_splits;
  const float* pl = p.part_l + row * p.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, pm[s]);
  const float ms = mx == -INFINITY ? 0.f : mx;
  float lsum = 0.f, a = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float c = exp2f(pm[s] - ms);
    lsum += pl[s] * c;
    if (e < D) a += p.part_acc[(row * p.num_splits + s) * D + e] * c;
  }
  // No live slot: lsum = 0, and the row is 0.
  if (e < D) static_cast<T*>(p.out)[row * D + e] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
  if (p.lse != nullptr && e == 0) p.lse[row] = lsum > 0.f ? ms + log2f(lsum) : -INFINITY;
}

// One thread per (b, KV head, slot < length): score_acc += max_g exp2(logit_g - lse_g).
// static: more than one .cu file includes this header.
static __global__ void decode_emit_kernel(const DecodeAttentionParams p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.B) * p.Hkv * p.length) return;
  const int j = static_cast<int>(idx % p.length);
  const int64_t bh = idx / p.length;
  const int b = static_cast<int>(bh / p.Hkv), h = static_cast<int>(bh % p.Hkv);
  if (p.pos[b * p.pos_stride[0] + h * p.pos_stride[1] + j * p.pos_stride[2]] < 0) return;
  const int G = p.Hq / p.Hkv;
  float best = 0.f;
  for (int g = 0; g < G; ++g) {
    const int64_t row = int64_t(b) * p.Hq + h * G + g;
    best = fmaxf(best, exp2f(p.logits[row * p.length + j] - p.lse[row]));
  }
  p.score_acc[bh * p.C + j] += best;
}

template <typename T, int D, int TG>
int decode_split_occupancy() {
  // Blocks of the split kernel per SM; a property of the compiled kernel, so computed once.
  static const int blocks = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_kernel<T, D, TG>,
                                                      kDecodeWarps * 32, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 1;
    }
    return n > 0 ? n : 1;
  }();
  return blocks;
}

// Picks the split of the slots: as many blocks as fit in one wave on the device, but at least
// max(2 steps, 64) slots per block so that the partials stay small next to the K/V bytes.
// Sets num_splits and split_len; needs B, Hq, Hkv, length >= 1.
template <typename T, int D>
cudaError_t decode_attention_plan(DecodeAttentionParams& p) {
  using Cfg = DecodeConfig<T, D>;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int G = p.Hq / p.Hkv;
  const int tg = decode_tile_group(G);
  int occupancy = 1;
  dispatch_tile_group(tg, [&](auto tile) {
    occupancy = decode_split_occupancy<T, D, decltype(tile)::value>();
  });
  const int64_t blocks_per_split = int64_t(p.B) * p.Hkv * (G / tg);
  const int64_t target = int64_t(sms) * occupancy;
  const int min_len = Cfg::kKeysPerStep * 2 > 64 ? Cfg::kKeysPerStep * 2 : 64;
  // Rounded down: a second, nearly empty wave would cost as much as the first.
  int64_t splits = target / blocks_per_split;
  const int64_t max_splits = (p.length + min_len - 1) / min_len;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  int64_t len = (p.length + splits - 1) / splits;
  len = (len + Cfg::kKeysPerStep - 1) / Cfg::kKeysPerStep * Cfg::kKeysPerStep;
  p.split_len = static_cast<int>(len);
  p.num_splits = static_cast<int>((p.length + len - 1) / len);
  return cudaSuccess;
}

// Runs the split, combine and (when p.score_acc) emit kernels. p comes from decode_attention_plan
// with every scratch pointer set; length >= 1.
template <typename T, int D>
cudaError_t decode_attention_launch(const DecodeAttentionParams& p, cudaStream_t stream) {
  const int G = p.Hq / p.Hkv;
  const int tg = decode_tile_group(G);
  dispatch_tile_group(tg, [&](auto tile) {
    constexpr int TG = decltype(tile)::value;
    const dim3 grid(static_cast<unsigned>(p.B * p.Hkv * (G / TG)),
                    static_cast<unsigned>(p.num_splits));
    decode_split_kernel<T, D, TG><<<grid, kDecodeWarps * 32, 0, stream>>>(p);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_combine_kernel<T, D><<<p.B * p.Hq, D > 32 ? D : 32, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.score_acc == nullptr) return err;
  const int64_t n = int64_t(p.B) * p.Hkv * p.length;
  decode_emit_kernel<<<static_cast<unsigned>((n + kEmitThreads - 1) / kEmitThreads),
                       kEmitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace gkv::kernels
