// Flash-decoding with GQA, empty-slot masking and optional score emission (gkv::decode_attention).
//
// Two launches on one stream:
//   1. split:   grid (B*Hkv*chunks, splits). A block takes one KV head, a chunk of its G query
//               heads and one range of slots, and writes its partial (max, sum, acc) per query
//               head. Two versions:
//               - tensor cores (bf16/fp16, d in {16, 32, 64, 128}; decode_split_mma_kernel): the
//                 chunk is up to 16 query heads, the rows of one m16 tile (padded with zero
//                 rows), so K and V are read once per group whenever G <= 16. Each of the 4 warps
//                 streams its own 16-key tiles through a private 3-stage cp.async ring;
//                 S = Q K^T and O += P V run on mma.sync.m16n8k16 with fp32 accumulators, the
//                 online softmax on the accumulator fragments.
//               - FFMA (fp32, and d = 8; decode_split_kernel): the chunk is TG <= 8 heads; a
//                 group of D/kVec lanes shares one key, 16-byte cp.async through a 3-stage
//                 per-thread ring.
//               Both keep the softmax in log2 units (exp2).
//   2. combine (+ emit): blocks [0, B*Hq) merge the partials of one query head into out (none
//               when there is one split: the split kernel then writes out itself). With
//               score_acc, the split kernel also stored every logit (fp32 scratch), and blocks
//               past B*Hq, one per (b, KV head, kEmitSlots slots), add max_g exp2(logit - lse)
//               into score_acc without re-reading K; each gets the lse of its G heads from the
//               partials itself, so both parts run in the same launch.
// Slots >= length are never read, nor slots >= *live_length when it is given (read on the device
// after the chain wait, so a graph replay sees the value of that moment; the planned splits then
// share the live slots). Empty slots (pos < 0) are masked before they reach a sum, so garbage
// or NaN in either cannot leak.
#pragma once

#include <cmath>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/ptx.cuh"

namespace gkv::kernels {

struct DecodeAttentionParams {
  const void* q;            // [B, Hq, d]: heads contiguous, batch stride q_batch_stride
  const void* k;            // [B, Hkv, C, d], d contiguous, other strides in k_stride
  const void* v;            // [B, Hkv, C, d], d contiguous, other strides in v_stride
  const int32_t* pos;       // [B, Hkv, C], strides in pos_stride
  int64_t q_batch_stride;   // elements (a 16-byte multiple)
  int64_t k_stride[3];      // elements, for dims B, Hkv, C (16-byte multiples)
  int64_t v_stride[3];
  int64_t pos_stride[3];
  int B, Hq, Hkv, C, length;
  float scale;
  void* out;                // [B, Hq, d] contiguous, dtype of q
  float* score_acc;         // [B, Hkv, C] contiguous, or nullptr: no emission
  const int64_t* live_length;  // [1]: slots from *live_length on count as empty; or nullptr
  int num_splits;           // from decode_attention_plan
  int split_len;            // slots per split
  float* part_m;            // [B, Hq, num_splits] max logit (log2 units)
  float* part_l;            // [B, Hq, num_splits] sum of exp2(logit - max)
  float* part_acc;          // [B, Hq, num_splits, d] sum of exp2(logit - max) * v
  float* logits;            // [B, Hq, length] log2-unit logits, only when emitting
};

constexpr int kDecodeWarps = 4;
constexpr int kCombineThreads = 128;  // >= every supported D
constexpr int kEmitSlots = 1024;      // slots per emit block
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

// Converts 16 bytes holding N elements of T to floats. Works on the four 32-bit words, so the
// caller's 16-byte load stays one vector load (also from shared memory).
template <typename T, int N>
__device__ __forceinline__ void unpack_vec16(const uint4 raw, float (&dst)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte vector");
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      dst[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      dst[2 * i] = __uint_as_float(w[i] << 16);
      dst[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      dst[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      dst[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
}

// Loads 16 bytes of T at ptr (16-byte aligned) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_vec16(const T* ptr, float (&dst)[N]) {
  unpack_vec16<T>(__ldg(reinterpret_cast<const uint4*>(ptr)), dst);
}

// The end of the slots read: length, cut to *live_length when given (clamped to [0, length]).
// Device memory, so only after chain_wait().
__device__ __forceinline__ int decode_end(const DecodeAttentionParams& p) {
  if (p.live_length == nullptr) return p.length;
  const int64_t live = *p.live_length;
  return live <= 0 ? 0 : (live < p.length ? static_cast<int>(live) : p.length);
}

// The slots [begin, end) of split `split`. With live_length, the planned number of splits shares
// the live slots evenly (in multiples of kStep, the block's keys per step), rather than the
// plan's length: the kernel lasts as long as its longest split.
template <int kStep>
__device__ __forceinline__ void decode_split_range(const DecodeAttentionParams& p, int split,
                                                   int& begin, int& end) {
  const int n = decode_end(p);
  int len = p.split_len;
  if (p.live_length != nullptr) {
    len = (n + p.num_splits - 1) / p.num_splits;
    len = (len + kStep - 1) / kStep * kStep;
  }
  begin = split * len;
  end = min(begin + len, n);
}

// Number of combine blocks: none when a single split holds every slot, since the split kernel
// then writes the output itself.
__host__ __device__ inline int64_t decode_combine_rows(const DecodeAttentionParams& p) {
  return p.num_splits == 1 ? 0 : int64_t(p.B) * p.Hq;
}

// Stores a split's result for element e of query head hq: its partials (max, sum, acc), or, when
// it is the only split, the output itself. The combine would weigh that split by exp2(0) = 1, so
// the bits are the same and its launch is saved. The max and sum are kept either way: the score
// emission reads them.
template <typename T, int D>
__device__ __forceinline__ void store_split(const DecodeAttentionParams& p, int b, int hq,
                                            int split, int e, float mx, float a, float lsum) {
  const int64_t row = (int64_t(b) * p.Hq + hq) * p.num_splits + split;
  if (p.num_splits == 1) {
    static_cast<T*>(p.out)[row * D + e] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
  } else {
    p.part_acc[row * D + e] = a;
  }
  if (e == 0) {
    p.part_m[row] = mx;
    p.part_l[row] = lsum;
  }
}

template <typename T, int D, int TG>
__global__ void __launch_bounds__(kDecodeWarps * 32, 2)
    decode_split_kernel(const DecodeAttentionParams p) {
  chain_wait();
  chain_release();
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
  const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + hq0 * D + dl * kVec;
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

  int begin, end;
  decode_split_range<Cfg::kKeysPerStep>(p, split, begin, end);
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
    store_split<T, D>(p, b, hq0 + g, split, e, mx, a, lsum);
  }
}

// ------------------------------------------------------------------ tensor-core split kernel
//
// Fragment layouts of mma.m16n8k16 (gr = lane / 4, tq = lane % 4):
//   A 16x16 (row-major): a[0] = (gr, 2tq..+1), a[1] = (gr+8, 2tq..), a[2] = (gr, 2tq+8..),
//                        a[3] = (gr+8, 2tq+8..)
//   B 16x8 (k x n):      b[0] = (k 2tq..2tq+1, n gr), b[1] = (k 2tq+8..+9, n gr)
//   C 16x8 (fp32):       c[0..1] = (gr, 2tq..2tq+1), c[2..3] = (gr+8, 2tq..2tq+1)
// so the two C tiles of S over 16 keys, packed to 16 bits, are the A fragment of P.

template <int D>
struct DecodeMmaConfig {
  static constexpr int kWarps = 4;
  static constexpr int kRows = 16;      // query heads per block: one m16 tile
  static constexpr int kKeys = 16;      // keys per warp step: one k16 step of P V
  static constexpr int kStages = 3;     // ring depth: 2 tiles of K and V in flight per warp
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row (16-bit elements)
  // K/V tile rows are unpadded, their 16-byte chunks XOR-swizzled by row (chunk c of row r at
  // c ^ (r & 7)): the 8 rows an ldmatrix reads hit 8 different bank groups, and the two rows a
  // warp-wide cp.async writes fill whole 128-byte lines. (With rows padded to D + 8, ncu counted
  // 1.5x the ideal L2 sectors and 3x the ideal shared-memory wavefronts for those copies.) The
  // swizzle needs 8+ chunks per row; d < 64 keeps the padding.
  static constexpr bool kSwizzle = kChunks >= 8;
  static constexpr int kLd = kSwizzle ? D : D + 8;  // elements per K/V tile row
  static constexpr int kQLd = D + 8;  // Q: padded, written once
  static constexpr int kBlockStep = kWarps * kKeys;  // keys of the block per step
  static constexpr int kTileBytes = kKeys * kLd * 2;
  static constexpr int kQBytes = kRows * kQLd * 2;
  static constexpr int kRingBytes = kWarps * kStages * 2 * kTileBytes;  // K and V tiles
  static constexpr int kPosBytes = kWarps * kStages * kKeys * 4;
  static constexpr int kSmemBytes = kQBytes + kRingBytes + kPosBytes;
  static_assert(D % 16 == 0 && D >= 16 && D <= 128, "tensor-core path: d in {16, 32, 64, 128}");
  static_assert(kKeys * kChunks % 32 == 0, "whole warp copies per tile");
  // The warp's final accumulators [kRows][D] fp32 reuse its own ring.
  static_assert(kRows * D * 4 <= kStages * 2 * kTileBytes, "merge buffer fits in the ring");
  // Element offset of 16-byte chunk `chunk` of row `row` in a K or V tile.
  __device__ static __forceinline__ int offset(int row, int chunk) {
    return row * kLd + ((kSwizzle ? chunk ^ (row & 7) : chunk) << 3);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(DecodeMmaConfig<D>::kWarps * 32, 2)
    decode_split_mma_kernel(const DecodeAttentionParams p) {
  chain_wait();
  chain_release();
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit only");
  using Cfg = DecodeMmaConfig<D>;
  constexpr int kWarps = Cfg::kWarps, kRows = Cfg::kRows, kKeys = Cfg::kKeys;
  constexpr int kStages = Cfg::kStages, kLd = Cfg::kLd, kQLd = Cfg::kQLd, kChunks = Cfg::kChunks;
  constexpr float kNegInf = -INFINITY;
  const int G = p.Hq / p.Hkv;
  const int chunks = (G + kRows - 1) / kRows;
  const int bh = blockIdx.x / chunks;  // chunks of one KV head are adjacent: they share K in L2
  const int chunk = blockIdx.x % chunks;
  const int split = blockIdx.y;
  const int b = bh / p.Hkv, h = bh % p.Hkv;
  const int rows = min(kRows, G - chunk * kRows);  // live rows of the m16 tile
  const int hq0 = h * G + chunk * kRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = lane >> 2, tq = lane & 3;

  extern __shared__ __align__(16) unsigned char decode_smem[];
  T* sq = reinterpret_cast<T*>(decode_smem);                                    // [kRows][kQLd]
  T* ring = reinterpret_cast<T*>(decode_smem + Cfg::kQBytes) +
            warp * kStages * 2 * kKeys * kLd;  // this warp's [kStages][K, V][kKeys][kLd]
  int32_t* ring_pos = reinterpret_cast<int32_t*>(decode_smem + Cfg::kQBytes + Cfg::kRingBytes) +
                      warp * kStages * kKeys;  // this warp's [kStages][kKeys]

  const float scale_log2 = p.scale * kLog2e;
  int begin, end;
  decode_split_range<Cfg::kBlockStep>(p, split, begin, end);
  const T* kb = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const int32_t* pb = p.pos + b * p.pos_stride[0] + h * p.pos_stride[1];
  float* lg = p.logits != nullptr ? p.logits + (int64_t(b) * p.Hq + hq0) * p.length : nullptr;

  // Warp `warp` takes tiles warp, warp + kWarps, ... of kKeys slots each. Slots past `end` are
  // zero-filled (K, V and pos), never read from memory and masked below.
  auto tile_start = [&](int t) { return begin + (t * kWarps + warp) * kKeys; };
  // A lane copies rows lane_row, lane_row + kRowStep, ... of a tile at column lane_col (to that
  // chunk's swizzled place in shared memory). Its source pointers start at the warp's first tile
  // and move by whole tiles and rows, so that a copy costs an add, not a 64-bit index product
  // (which made the loads outnumber the math).
  constexpr int kRowStep = 32 / kChunks;           // rows one warp-wide copy covers
  constexpr int kCopies = kKeys * kChunks / 32;    // copies of K (and of V) per lane per tile
  const int lane_row = lane / kChunks, lane_col = (lane % kChunks) * 8;
  const int64_t first_row = begin + warp * kKeys + lane_row;
  const T* k_lane = kb + first_row * p.k_stride[2] + lane_col;
  const T* v_lane = vb + first_row * p.v_stride[2] + lane_col;
  const int32_t* pos_lane = pb + (begin + warp * kKeys + lane % kKeys) * p.pos_stride[2];
  const int64_t k_row_step = kRowStep * p.k_stride[2], v_row_step = kRowStep * p.v_stride[2];
  constexpr int kTileStep = kWarps * kKeys;  // slots between a warp's tiles
  auto issue = [&](int t) {
    const int j0 = tile_start(t);
    if (j0 < end) {
      T* sk = ring + (t % kStages) * 2 * kKeys * kLd;
      T* sv = sk + kKeys * kLd;
      const T* gk = k_lane + int64_t(t) * kTileStep * p.k_stride[2];
      const T* gv = v_lane + int64_t(t) * kTileStep * p.v_stride[2];
      auto copy_rows = [&](auto whole_tile) {
#pragma unroll
        for (int i = 0; i < kCopies; ++i) {
          const bool ok = decltype(whole_tile)::value || j0 + lane_row + i * kRowStep < end;
          const int at = Cfg::offset(lane_row + i * kRowStep, lane % kChunks);
          cp_async16(sk + at, ok ? gk : kb, ok);
          cp_async16(sv + at, ok ? gv : vb, ok);
          gk += k_row_step;
          gv += v_row_step;
        }
      };
      if (j0 + kKeys <= end) {
        copy_rows(std::true_type{});
      } else {
        copy_rows(std::false_type{});
      }
      if (lane < kKeys) {
        const bool ok = j0 + lane < end;
        cp_async4(ring_pos + (t % kStages) * kKeys + lane,
                  ok ? pos_lane + int64_t(t) * kTileStep * p.pos_stride[2] : pb, ok);
      }
    }
    cp_async_commit();  // possibly empty: keeps one group per step for the wait below
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue(t);

  // Q rows of the chunk, loaded while the first K/V tiles are on their way; zero rows past
  // `rows`; unscaled: the logits are scaled in fp32 so that they match the FFMA path and the CPU
  // kernel to fp32 rounding.
  const T* qg = static_cast<const T*>(p.q) + b * p.q_batch_stride + hq0 * D;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kWarps * 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const uint4 val = r < rows ? __ldg(reinterpret_cast<const uint4*>(qg + r * D + col))
                               : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(sq + r * kQLd + col) = val;
  }
  __syncthreads();
  uint32_t qa[D / 16][4];  // A fragments of Q, one per k16 step over d
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qa[kk], sq + ((lane & 8) + (lane & 7)) * kQLd + kk * 16 + ((lane >> 4) << 3));
  }


  // Row state: this lane holds rows gr (index 0) and gr + 8 (index 1). m is the running max of
  // the row (same on the 4 lanes of a quad), l the lane's share of the row sum.
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  float o[D / 8][4];  // C fragments of O: n-tile nt covers d = nt*8 .. nt*8+7
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  for (int t = 0; tile_start(t) < end; ++t) {
    __syncwarp();            // every lane is done reading the stage that issue() refills
    issue(t + kStages - 1);  // refills the stage that step t - 1 consumed
    cp_async_wait<kStages - 1>();  // this lane's copies of step t have landed
    __syncwarp();                  // ... and everyone else's
    T* sk = ring + (t % kStages) * 2 * kKeys * kLd;
    T* sv = sk + kKeys * kLd;
    const int j0 = tile_start(t);
    const int32_t* sp = ring_pos + (t % kStages) * kKeys;
    // Bit r: slot j0 + r is in range / live (in range and pos >= 0).
    const bool my_in = lane < kKeys && j0 + lane < end;
    const unsigned in_mask = __ballot_sync(0xffffffffu, my_in);
    const unsigned live_mask = __ballot_sync(0xffffffffu, my_in && sp[lane % kKeys] >= 0);
    if (in_mask != live_mask) {
      // Empty slots were loaded and their V may be NaN, and 0 * NaN = NaN inside the mma: zero
      // those rows. (K needs nothing: a NaN key only spoils its own column of S, masked below.)
      const unsigned dead = in_mask & ~live_mask;
#pragma unroll
      for (int i = 0; i < kKeys * kChunks / 32; ++i) {
        const int c = lane + i * 32, r = c / kChunks;
        if ((dead >> r) & 1u) {
          *reinterpret_cast<uint4*>(sv + Cfg::offset(r, c % kChunks)) = make_uint4(0, 0, 0, 0);
        }
      }
      __syncwarp();
    }

    // S = Q K^T over the 16 keys: two n8 tiles (keys 0-7, 8-15). K is stored [key][d], i.e. the
    // B operand as [n][k]: matrices 0/1 = keys 0-7 at d 0-7 / 8-15, 2/3 = keys 8-15.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kf[4];
      ldmatrix_x4(kf, sk + Cfg::offset(((lane >> 4) << 3) + (lane & 7),  // keys 8-15: lanes 16+
                                       kk * 2 + ((lane >> 3) & 1)));
      mma_m16n8k16<T>(s[0], qa[kk], kf[0], kf[1]);
      mma_m16n8k16<T>(s[1], qa[kk], kf[2], kf[3]);
    }

    // Scale into log2 units, mask, emit the logits, and update the row max.
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * tq + (e & 1);
        const int row = gr + (e >> 1) * 8;
        float x = s[nt][e] * scale_log2;
        if (!((live_mask >> key) & 1u)) x = kNegInf;  // select, so a NaN logit cannot survive
        if (lg != nullptr && row < rows && ((in_mask >> key) & 1u))
          lg[int64_t(row) * p.length + j0 + key] = x;
        s[nt][e] = x;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
      }
    }
    float corr[2], ms[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // The 4 lanes of a quad hold the 16 keys of a row.
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float mx = fmaxf(m[i], tile_max[i]);
      ms[i] = mx == kNegInf ? 0.f : mx;  // nothing live yet: exp2(-inf - 0) = 0, no inf - inf
      corr[i] = exp2f(m[i] - ms[i]);     // m = -inf: 0, and l, o are still 0
      m[i] = mx;
      l[i] *= corr[i];
    }
    // P as the A fragment of the k16 step over these keys: a[0] = (gr, keys 0-7),
    // a[1] = (gr+8, keys 0-7), a[2] = (gr, keys 8-15), a[3] = (gr+8, keys 8-15).
    uint32_t pa[4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[e] = exp2f(s[nt][e] - ms[e >> 1]);
        l[e >> 1] += pr[e];
      }
      pa[nt * 2] = pack2<T>(pr[0], pr[1]);      // row gr, keys nt*8 + 2tq..
      pa[nt * 2 + 1] = pack2<T>(pr[2], pr[3]);  // row gr + 8
    }

    // O = O * corr + P V. Once the row maxima settle, corr is 1 on every lane and the D / 2
    // products per lane are skipped (x * 1 = x: the same bits).
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][0] *= corr[0];
        o[nt][1] *= corr[0];
        o[nt][2] *= corr[1];
        o[nt][3] *= corr[1];
      }
    }
    // V is stored [key][d], i.e. the B operand as [k][n], read transposed: matrices 0/1 = keys
    // 0-7 / 8-15 at d c0..c0+7, 2/3 the same at d c0+8..c0+15.
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) {
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, sv + Cfg::offset(lane & 15, nd * 2 + (lane >> 4)));
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        mma_m16n8k16<T>(o[nd * 2 + half], pa, vf[half * 2], vf[half * 2 + 1]);
      }
    }
  }
  cp_async_wait<0>();  // the trailing (empty or unused) groups
  __syncwarp();        // and every lane is done with the ring, which now holds the accumulators

  // Row sums: the quad's 4 shares.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  // Merge the warps through shared memory and write this split's partials.
  __shared__ float sm_m[kWarps][kRows], sm_l[kWarps][kRows];
  float* sacc = reinterpret_cast<float*>(ring);  // this warp's [kRows][D]
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const int col = nt * 8 + 2 * tq;
    *reinterpret_cast<float2*>(sacc + gr * D + col) = make_float2(o[nt][0], o[nt][1]);
    *reinterpret_cast<float2*>(sacc + (gr + 8) * D + col) = make_float2(o[nt][2], o[nt][3]);
  }
  if (tq == 0) {
    sm_m[warp][gr] = m[0];
    sm_m[warp][gr + 8] = m[1];
    sm_l[warp][gr] = l[0];
    sm_l[warp][gr + 8] = l[1];
  }
  __syncthreads();
  const float* acc_base = reinterpret_cast<const float*>(decode_smem + Cfg::kQBytes);
  constexpr int kWarpRing = kStages * 2 * kKeys * kLd;  // elements of T per warp ring
  for (int i = threadIdx.x; i < rows * D; i += kWarps * 32) {
    const int g = i / D, e = i % D;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    const float mz = mx == kNegInf ? 0.f : mx;
    float a = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = exp2f(sm_m[w][g] - mz);
      a += acc_base[w * (kWarpRing * int(sizeof(T)) / 4) + g * D + e] * c;
      lsum += sm_l[w][g] * c;
    }
    store_split<T, D>(p, b, hq0 + g, split, e, mx, a, lsum);
  }
}

// Number of emit blocks after the combine blocks: 0 without score emission.
inline int64_t decode_emit_blocks(const DecodeAttentionParams& p) {
  if (p.score_acc == nullptr) return 0;
  return int64_t(p.B) * p.Hkv * ((p.length + kEmitSlots - 1) / kEmitSlots);
}

// Dynamic shared memory of decode_combine_kernel: the split weights of a combine block, the lse
// of the group's heads in an emit block.
inline size_t decode_combine_smem(const DecodeAttentionParams& p) {
  const int G = p.Hq / p.Hkv;
  const int n = p.score_acc != nullptr && G > p.num_splits ? G : p.num_splits;
  return sizeof(float) * n;
}

// Sum of x over the block (kCombineThreads threads), returned to every thread. red: 4+ floats.
__device__ __forceinline__ float combine_block_sum(float x, float* red) {
  x = warp_sum(x);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineThreads / 32; ++w) s += red[w];
  __syncthreads();  // red is reused
  return s;
}
__device__ __forceinline__ float combine_block_max(float x, float* red) {
  x = warp_max(x);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  float m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kCombineThreads / 32; ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  return m;
}

// Grid decode_combine_rows(p) + decode_emit_blocks(p), kCombineThreads threads,
// decode_combine_smem(p) bytes of dynamic shared memory. Block x < rows: query head x; the
// threads first weigh the splits together (a split per thread, so no thread walks them all
// twice), then thread e < D owns output element e. Block x >= rows: emission for one (b, KV
// head) and kEmitSlots slots.
template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads)
    decode_combine_kernel(const DecodeAttentionParams p) {
  chain_wait();
  chain_release();
  static_assert(D <= kCombineThreads, "one thread per output element");
  extern __shared__ float combine_smem[];
  const int64_t rows = decode_combine_rows(p);
  if (blockIdx.x < rows) {
    __shared__ float red[kCombineThreads / 32];
    float* weight = combine_smem;  // [num_splits] exp2(part_m - max)
    const int64_t row = blockIdx.x;  // b * Hq + hq
    const float* pm = p.part_m + row * p.num_splits;
    const float* pl = p.part_l + row * p.num_splits;
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < p.num_splits; s += kCombineThreads) mx = fmaxf(mx, pm[s]);
    mx = combine_block_max(mx, red);
    const float ms = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f;
    for (int s = threadIdx.x; s < p.num_splits; s += kCombineThreads) {
      const float c = exp2f(pm[s] - ms);
      weight[s] = c;
      lsum += pl[s] * c;
    }
    lsum = combine_block_sum(lsum, red);  // its barriers also publish weight[]
    const int e = threadIdx.x;
    if (e >= D) return;
    const float* pa = p.part_acc + row * p.num_splits * D + e;
    float a = 0.f;
#pragma unroll 8
    for (int s = 0; s < p.num_splits; ++s) a += pa[int64_t(s) * D] * weight[s];
    // No live slot: lsum = 0, and the row is 0.
    static_cast<T*>(p.out)[row * D + e] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
    return;
  }
  // Emission: score_acc[b, h, j] += max_g exp2(logit_g - lse_g) over live slots j.
  float* emit_lse = combine_smem;  // [G] log2-unit log-sum-exp of the group's heads
  const int G = p.Hq / p.Hkv;
  const int per_row = (p.length + kEmitSlots - 1) / kEmitSlots;
  const int64_t eb = blockIdx.x - rows;
  const int64_t bh = eb / per_row;
  const int j_begin = static_cast<int>(eb % per_row) * kEmitSlots;
  const int j_end = min(j_begin + kEmitSlots, decode_end(p));  // the logits stored
  const int b = static_cast<int>(bh / p.Hkv), h = static_cast<int>(bh % p.Hkv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < G; g += kCombineThreads / 32) {  // a warp per head, lanes over splits
    const int64_t row = int64_t(b) * p.Hq + h * G + g;
    const float* pm = p.part_m + row * p.num_splits;
    const float* pl = p.part_l + row * p.num_splits;
    float mx = -INFINITY;
    for (int s = lane; s < p.num_splits; s += 32) mx = fmaxf(mx, pm[s]);
    mx = warp_max(mx);
    const float ms = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f;
    for (int s = lane; s < p.num_splits; s += 32) lsum += pl[s] * exp2f(pm[s] - ms);
    lsum = warp_sum(lsum);
    // A head with no live slot has no live j below either (live-ness is per KV head).
    if (lane == 0) emit_lse[g] = lsum > 0.f ? ms + log2f(lsum) : -INFINITY;
  }
  __syncthreads();
  const int32_t* pb = p.pos + b * p.pos_stride[0] + h * p.pos_stride[1];
  const float* lg = p.logits + (int64_t(b) * p.Hq + h * G) * p.length;
  for (int j = j_begin + threadIdx.x; j < j_end; j += kCombineThreads) {
    if (pb[j * p.pos_stride[2]] < 0) continue;
    float best = 0.f;
    for (int g = 0; g < G; ++g) best = fmaxf(best, exp2f(lg[int64_t(g) * p.length + j] - emit_lse[g]));
    p.score_acc[bh * p.C + j] += best;
  }
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

// Raises the dynamic shared-memory limit of the tensor-core kernel (it needs more than the
// default 48 KB at d = 128), and returns its blocks per SM (0: it cannot run).
template <typename T, int D>
int decode_split_mma_occupancy() {
  using Cfg = DecodeMmaConfig<D>;
  if (allow_dynamic_smem<decode_split_mma_kernel<T, D>>(Cfg::kSmemBytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  static const int blocks = [] {  // a property of the compiled kernel, so computed once
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_mma_kernel<T, D>,
                                                      Cfg::kWarps * 32,
                                                      Cfg::kSmemBytes) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 0;
    }
    return n;
  }();
  return blocks;
}

// Picks the split of the slots: as many blocks as fit in one wave on the device, but at least
// max(2 steps, 64) slots per block so that the partials stay small next to the K/V bytes.
// kMma picks the tensor-core split kernel (T 16-bit, D in {16, 32, 64, 128}).
// Sets num_splits and split_len; needs B, Hq, Hkv, length >= 1.
template <typename T, int D, bool kMma>
cudaError_t decode_attention_plan(DecodeAttentionParams& p) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int G = p.Hq / p.Hkv;
  int occupancy = 1, chunks = 1, step = 1;
  if constexpr (kMma) {
    occupancy = decode_split_mma_occupancy<T, D>();
    if (occupancy == 0) return cudaErrorInvalidConfiguration;  // shared memory over the limit
    chunks = (G + DecodeMmaConfig<D>::kRows - 1) / DecodeMmaConfig<D>::kRows;
    step = DecodeMmaConfig<D>::kBlockStep;
  } else {
    const int tg = decode_tile_group(G);
    dispatch_tile_group(tg, [&](auto tile) {
      occupancy = decode_split_occupancy<T, D, decltype(tile)::value>();
    });
    chunks = G / tg;
    step = DecodeConfig<T, D>::kKeysPerStep;
  }
  const int64_t blocks_per_split = int64_t(p.B) * p.Hkv * chunks;
  const int64_t target = int64_t(sms) * occupancy;
  const int min_len = step * 2 > 64 ? step * 2 : 64;
  // Rounded down: a second, nearly empty wave would cost as much as the first.
  int64_t splits = target / blocks_per_split;
  const int64_t max_splits = (p.length + min_len - 1) / min_len;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  int64_t len = (p.length + splits - 1) / splits;
  len = (len + step - 1) / step * step;
  p.split_len = static_cast<int>(len);
  p.num_splits = static_cast<int>((p.length + len - 1) / len);
  return cudaSuccess;
}

// Runs the split and the combine (+ emit, when p.score_acc) kernels. p comes from
// decode_attention_plan<T, D, kMma> with every scratch pointer set; length >= 1.
template <typename T, int D, bool kMma>
cudaError_t decode_attention_launch(const DecodeAttentionParams& p, cudaStream_t stream) {
  const int G = p.Hq / p.Hkv;
  if constexpr (kMma) {
    using Cfg = DecodeMmaConfig<D>;
    const dim3 grid(static_cast<unsigned>(p.B * p.Hkv * ((G + Cfg::kRows - 1) / Cfg::kRows)),
                    static_cast<unsigned>(p.num_splits));
    const cudaError_t err =
        launch_chained(decode_split_mma_kernel<T, D>, grid, Cfg::kWarps * 32, Cfg::kSmemBytes, stream, p);
    if (err != cudaSuccess) return err;
  } else {
    const int tg = decode_tile_group(G);
    cudaError_t err = cudaSuccess;
    dispatch_tile_group(tg, [&](auto tile) {
      constexpr int TG = decltype(tile)::value;
      const dim3 grid(static_cast<unsigned>(p.B * p.Hkv * (G / TG)),
                      static_cast<unsigned>(p.num_splits));
      err = launch_chained(decode_split_kernel<T, D, TG>, grid, kDecodeWarps * 32, 0, stream, p);
    });
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = decode_combine_rows(p) + decode_emit_blocks(p);
  if (blocks == 0) return cudaSuccess;
  return launch_chained(decode_combine_kernel<T, D>, static_cast<unsigned>(blocks), kCombineThreads,
                        decode_combine_smem(p), stream, p);
}

}  // namespace gkv::kernels
