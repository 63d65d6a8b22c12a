// gkv::decode_linear on CUDA: out = x W^T (+ bias) for the few rows of a decode step (M <= 64),
// where the product is a stream over the weight: every weight element is read once and used M
// times. No torch headers.
//
// Two chained launches:
//   1. decode_linear_kernel, grid (ceil(N / 64), splits): a block takes 64 weight rows (output
//      columns) and one range of K, walked in chunks of 64 through a 4-stage cp.async ring that
//      holds the weight chunk [64][64] and the x chunk [16*MT][64], both with their 16-byte
//      pieces XOR-swizzled by row. Up to 16 rows (MT = 1), each of the 4 warps takes one k16 step
//      of every chunk for all 64 columns and all rows (mma.sync.m16n8k16, fp32 accumulators); the
//      warps' sums meet in shared memory at the end, added in warp order. From 17 to 64 rows
//      (MT = 4) the 4 warps act as one warpgroup and run Hopper's wgmma straight from the ring
//      (sm_90a builds; others take the mma.sync path with 4 m16 tiles): no fragments pass
//      through registers and no sums meet in shared memory, which the mma.sync shape of 64 rows
//      paid for in registers (3 blocks an SM instead of 5) and bandwidth. With one split the
//      block writes out (bias added in fp32, one rounding); otherwise its fp32 partial.
//   2. decode_linear_reduce_kernel (splits > 1 only): out = sum of the partials in split order
//      (+ bias), one rounding. The order is fixed, so results do not depend on timing.
// Splitting K is for the narrow projections (N = 3584: 56 column tiles), which alone would leave
// most SMs idle. Before its chain wait, a block asks L2 for the first chunks of its weight rows;
// that overlaps the DRAM latency with the kernel before (safe even for a weight that kernel
// writes: L2 is where writes land, and the copies into shared memory come after the wait).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/ptx.cuh"

namespace gkv::kernels {

struct DecodeLinearParams {
  const void* x;         // [M, K]: K contiguous, rows x_row_stride apart
  const void* w;         // [N, K] contiguous
  const void* bias;      // [N], or nullptr
  void* out;             // [M, N] contiguous (dtype of x)
  float* partial;        // [num_splits, M, N] fp32 when num_splits > 1
  int64_t x_row_stride;  // elements
  int M, N, K;
  int num_splits;        // from decode_linear_plan
  int chunks_per_split;  // K chunks of DecodeLinearConfig::kChunkK per split
};

template <int MT>
struct DecodeLinearConfig {
  static constexpr int kWarps = 4;
  static constexpr int kTileN = 64;   // weight rows (output columns) per block
  static constexpr int kChunkK = 64;  // K per ring stage: 128-byte rows, 8 swizzled pieces
  static constexpr int kStages = 4;   // 3 chunks in flight while one is used
  static constexpr int kRowsX = 16 * MT;
  static constexpr int kStageElems = (kTileN + kRowsX) * kChunkK;
  static constexpr int kRingBytes = kStages * kStageElems * 2;
  static constexpr int kRedLd = kTileN + 8;  // fp32 per row of a warp's sums; padded for banks
  static constexpr int kRedBytes = kWarps * kRowsX * kRedLd * 4;
  static constexpr int kSmemBytes = kRingBytes > kRedBytes ? kRingBytes : kRedBytes;
  static_assert(kChunkK / 16 == kWarps, "one k16 step of each chunk per warp");
  // Element offset of 16-byte piece `piece` of row `row` of a stage tile: piece c of row r sits
  // at c ^ (r & 7), so the 8 rows an ldmatrix reads hit 8 bank groups and a warp's copies fill
  // whole 128-byte lines.
  __device__ static __forceinline__ int offset(int row, int piece) {
    return row * kChunkK + ((piece ^ (row & 7)) << 3);
  }
};

constexpr int kDecodeLinearMaxRows = 64;
constexpr int kDecodeLinearMinChunks = 4;  // K chunks per split, at least

// A block's sum for out[row, n]: its fp32 partial when K is split, else the output (bias added in
// fp32, one rounding).
template <typename T>
__device__ __forceinline__ void store_result(const DecodeLinearParams& p, int row, int n, float v) {
  if (p.num_splits > 1) {
    p.partial[(int64_t(blockIdx.y) * p.M + row) * p.N + n] = v;
  } else {
    if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[n]);
    static_cast<T*>(p.out)[int64_t(row) * p.N + n] = from_float<T>(v);
  }
}

// kWgmma (MT = 4): the wgmma shape of the header, weight rows as wgmma's M and the 64 x rows
// (zeros past M) as its N; without sm_90a in the build it runs the mma.sync path.
template <typename T, int MT, bool kWgmma = false>
__global__ void __launch_bounds__(DecodeLinearConfig<MT>::kWarps * 32)
    decode_linear_kernel(const DecodeLinearParams p) {
  using Cfg = DecodeLinearConfig<MT>;
  static_assert(!kWgmma || MT == 4, "wgmma takes all 64 x rows as its N");
  constexpr bool kUseWgmma = kWgmma && GKV_HAVE_WGMMA;
  constexpr int kTileN = Cfg::kTileN, kChunkK = Cfg::kChunkK, kStages = Cfg::kStages;
  constexpr int kThreads = Cfg::kWarps * 32;
  const int n0 = blockIdx.x * kTileN;
  const int chunks = (p.K + kChunkK - 1) / kChunkK;
  const int c_begin = blockIdx.y * p.chunks_per_split;
  const int c_end = min(chunks, c_begin + p.chunks_per_split);
  const T* w = static_cast<const T*>(p.w);
  const T* x = static_cast<const T*>(p.x);

  for (int i = threadIdx.x; i < kTileN * (kStages - 1); i += kThreads) {
    const int n = n0 + i % kTileN, c = c_begin + i / kTileN;
    if (n < p.N && c < c_end) {
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(w + int64_t(n) * p.K + c * kChunkK));
    }
  }
  chain_wait();
  chain_release();

  extern __shared__ __align__(16) unsigned char decode_linear_smem[];
  // [kStages][weight rows, x rows][kChunkK]; the wgmma swizzle needs 1024-byte aligned tiles
  // (every stage and both its tiles are whole 1024-byte multiples), hence the slack.
  unsigned char* smem = decode_linear_smem;
  if constexpr (kWgmma) {
    smem += (1024 - (static_cast<unsigned>(__cvta_generic_to_shared(smem)) & 1023)) & 1023;
  }
  T* ring = reinterpret_cast<T*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // A thread copies piece `piece` of rows copy_row, copy_row + kRowStep, ... of each stage tile.
  // Its source pointers start at chunk 0 of its first rows and move by whole rows and chunks, so
  // that a copy costs an add, not a 64-bit index product.
  const int piece = threadIdx.x % 8, copy_row = threadIdx.x / 8;
  constexpr int kRowStep = kThreads / 8;
  constexpr int kWeightCopies = kTileN / kRowStep, kXCopies = Cfg::kRowsX / kRowStep;
  const T* w_lane = w + int64_t(n0 + copy_row) * p.K + piece * 8;
  const T* x_lane = x + copy_row * p.x_row_stride + piece * 8;
  const int64_t w_row_step = int64_t(kRowStep) * p.K, x_row_step = kRowStep * p.x_row_stride;
  unsigned rows_in = 0;  // bit i: weight row copy_row + i * kRowStep exists; bit 16 + i: x row
#pragma unroll
  for (int i = 0; i < kWeightCopies; ++i) {
    rows_in |= unsigned(n0 + copy_row + i * kRowStep < p.N) << i;
  }
#pragma unroll
  for (int i = 0; i < kXCopies; ++i) {
    rows_in |= unsigned(copy_row + i * kRowStep < p.M) << (16 + i);
  }
  auto issue = [&](int c) {
    if (c < c_end) {
      T* sw = ring + ((c - c_begin) % kStages) * Cfg::kStageElems;
      T* sx = sw + kTileN * kChunkK;
      const bool k_in = c * kChunkK + piece * 8 < p.K;  // K % 8 == 0: a piece is all in or out
      const T* src = w_lane + c * kChunkK;
#pragma unroll
      for (int i = 0; i < kWeightCopies; ++i, src += w_row_step) {
        const bool ok = k_in && ((rows_in >> i) & 1u);
        cp_async16(sw + Cfg::offset(copy_row + i * kRowStep, piece), ok ? src : w, ok);
      }
      src = x_lane + c * kChunkK;
#pragma unroll
      for (int i = 0; i < kXCopies; ++i, src += x_row_step) {
        const bool ok = k_in && ((rows_in >> (16 + i)) & 1u);
        cp_async16(sx + Cfg::offset(copy_row + i * kRowStep, piece), ok ? src : x, ok);
      }
    }
    cp_async_commit();  // possibly empty: one group per chunk for the wait below
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(c_begin + s);

  if constexpr (kUseWgmma) {
    float acc[32] = {};  // rows: weight rows of the tile; columns: x rows (wgmma_m64n64k16)
    for (int c = c_begin; c < c_end; ++c) {
      cp_async_wait<kStages - 2>();
      fence_proxy_async_shared();  // this thread's landed copies, visible to the tensor cores
      __syncthreads();             // ... everyone's; chunk c - 1's wgmma finished below
      issue(c + kStages - 1);
      const uint32_t sw = static_cast<uint32_t>(
          __cvta_generic_to_shared(ring + ((c - c_begin) % kStages) * Cfg::kStageElems));
      const uint32_t sx = sw + kTileN * kChunkK * sizeof(T);
      wgmma_fence();
#pragma unroll
      for (int k16 = 0; k16 < kChunkK / 16; ++k16) {
        wgmma_m64n64k16<T>(acc, wgmma_desc_k_major_sw128(sw + 32 * k16),
                           wgmma_desc_k_major_sw128(sx + 32 * k16));
      }
      wgmma_commit();
      wgmma_wait<0>();  // the stage is refilled at the next chunk
    }
    cp_async_wait<0>();
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      const int n = n0 + 16 * warp + (lane >> 2) + 8 * ((e >> 1) & 1);
      const int row = 8 * (e >> 2) + 2 * (lane & 3) + (e & 1);
      if (n < p.N && row < p.M) store_result<T>(p, row, n, acc[e]);
    }
  } else {
    // acc[mt][nt]: the C fragment of rows mt*16.., columns nt*8.. of the tile.
    float acc[MT][kTileN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
      }
    }
    for (int c = c_begin; c < c_end; ++c) {
      cp_async_wait<kStages - 2>();  // this thread's copies of chunk c have landed
      __syncthreads();               // ... everyone's, and everyone is done with chunk c - 1
      issue(c + kStages - 1);        // refills the stage of chunk c - 1
      const T* sw = ring + ((c - c_begin) % kStages) * Cfg::kStageElems;
      const T* sx = sw + kTileN * kChunkK;
      // The weight is stored [n][k], the B operand as [n][k]: matrices 0/1 = rows 0-7 of a 16-row
      // group at k 0-7 / 8-15, 2/3 = rows 8-15.
      uint32_t wf[kTileN / 16][4];
#pragma unroll
      for (int g = 0; g < kTileN / 16; ++g) {
        ldmatrix_x4(wf[g], sw + Cfg::offset(g * 16 + ((lane >> 4) << 3) + (lane & 7),
                                            warp * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t xa[4];  // A fragment: rows 0-7 / 8-15 at k 0-7, then at k 8-15
        ldmatrix_x4(xa, sx + Cfg::offset(mt * 16 + (lane & 15), warp * 2 + (lane >> 4)));
#pragma unroll
        for (int g = 0; g < kTileN / 16; ++g) {
          mma_m16n8k16<T>(acc[mt][2 * g], xa, wf[g][0], wf[g][1]);
          mma_m16n8k16<T>(acc[mt][2 * g + 1], xa, wf[g][2], wf[g][3]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring becomes the warps' sums

    float* red = reinterpret_cast<float*>(decode_linear_smem);  // [kWarps][kRowsX][kRedLd]
    const int gr = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = mt * 16 + gr + half * 8;
          float* at = red + (warp * Cfg::kRowsX + row) * Cfg::kRedLd + nt * 8 + 2 * tq;
          *reinterpret_cast<float2*>(at) = make_float2(acc[mt][nt][2 * half],
                                                       acc[mt][nt][2 * half + 1]);
        }
      }
    }
    __syncthreads();
    const int rows = min(p.M, Cfg::kRowsX);
    for (int e = threadIdx.x; e < rows * kTileN; e += kThreads) {
      const int row = e / kTileN, col = e % kTileN, n = n0 + col;
      if (n >= p.N) continue;
      float v = 0.f;
#pragma unroll
      for (int wi = 0; wi < Cfg::kWarps; ++wi) {
        v += red[(wi * Cfg::kRowsX + row) * Cfg::kRedLd + col];
      }
      store_result<T>(p, row, n, v);
    }
  }
}

template <typename T>
__global__ void decode_linear_reduce_kernel(const DecodeLinearParams p) {
  chain_wait();
  chain_release();
  const int64_t total = int64_t(p.M) * p.N;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < p.num_splits; ++s) v += p.partial[s * total + e];
    if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[e % p.N]);
    static_cast<T*>(p.out)[e] = from_float<T>(v);
  }
}

// Picks the split of K: one split when the column tiles alone give every SM a block; otherwise
// about two blocks per SM (each keeps 3 chunks of its weight in flight), with at least
// kDecodeLinearMinChunks chunks per split. Sets num_splits and chunks_per_split; needs N, K >= 1.
inline cudaError_t decode_linear_plan(DecodeLinearParams& p) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int tiles = ceil_div(p.N, DecodeLinearConfig<1>::kTileN);
  const int chunks = ceil_div(p.K, DecodeLinearConfig<1>::kChunkK);
  int splits = 1;
  if (tiles < sms) {
    const int by_sms = ceil_div(2 * sms, tiles);
    const int by_length = chunks / kDecodeLinearMinChunks;
    splits = by_sms < by_length ? by_sms : by_length;
    if (splits < 1) splits = 1;
  }
  p.chunks_per_split = ceil_div(chunks, splits);
  p.num_splits = ceil_div(chunks, p.chunks_per_split);  // no empty split
  return cudaSuccess;
}

// Runs the kernels; p comes from decode_linear_plan, with p.partial set when num_splits > 1;
// 1 <= M <= 16 * MT, K % 8 == 0, x and w 16-byte aligned, x_row_stride % 8 == 0. kWgmma needs
// MT = 4 (see decode_linear_kernel).
template <typename T, int MT, bool kWgmma = false>
cudaError_t decode_linear_launch(const DecodeLinearParams& p, cudaStream_t stream) {
  using Cfg = DecodeLinearConfig<MT>;
  constexpr auto kernel = decode_linear_kernel<T, MT, kWgmma>;
  // The wgmma ring's 1024-byte alignment slack; the mma.sync fallback's sums need kRedBytes.
  constexpr int smem = kWgmma ? std::max(Cfg::kRingBytes + 1024, Cfg::kSmemBytes) : Cfg::kSmemBytes;
  cudaError_t err = allow_dynamic_smem<kernel>(smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.N, Cfg::kTileN), p.num_splits);
  err = launch_chained(kernel, grid, Cfg::kWarps * 32, smem, stream, p);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int threads = 256;
  const int blocks = ceil_div(int64_t(p.M) * p.N, threads);
  return launch_chained(decode_linear_reduce_kernel<T>, blocks, threads, 0, stream, p);
}

}  // namespace gkv::kernels
