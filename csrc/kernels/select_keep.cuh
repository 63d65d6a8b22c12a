// Per-head top-`keep` selection for gkv::select_keep: a radix select of the keep-th best score,
// then a flag + block prefix sum that writes the chosen slots in ascending order (no sort).
// No torch headers: raw pointers, sizes, a stream, a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common.cuh"

namespace gkv::kernels {

constexpr int kSelectThreads = 512;
constexpr int kSelectWarps = kSelectThreads / 32;

// An order-preserving uint32 image of a score: larger score, larger key. NaN maps to -inf's key
// and -0 to +0's, so that they compare as the CPU oracle's value comparisons do. Ties between
// equal keys are broken by slot index (the later slot wins) after the radix select.
__device__ __forceinline__ uint32_t score_key(float s) {
  if (isnan(s)) s = -INFINITY;
  if (s == 0.f) s = 0.f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of a 0/1 flag over the block (in thread order); *total gets the sum.
// scratch: kSelectWarps ints of shared memory. Contains barriers: call from every thread.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) {
    const int c = scratch[w];
    before += w < warp ? c : 0;
    sum += c;
  }
  __syncthreads();  // scratch is reused by the next call
  *total = sum;
  return before + in_warp;
}

// One block per (b, h). score [rows, M] fp32 -> out [rows, keep + window] int64.
__global__ void __launch_bounds__(kSelectThreads)
    select_keep_kernel(const float* __restrict__ score, int M, int keep, int window,
                       int64_t* __restrict__ out) {
  __shared__ int hist[256];
  __shared__ int scratch[kSelectWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_equal;
  const float* row = score + int64_t(blockIdx.x) * M;
  int64_t* dst = out + int64_t(blockIdx.x) * (keep + window);
  for (int w = threadIdx.x; w < window; w += kSelectThreads) dst[keep + w] = M + w;
  if (keep == 0) return;
  if (keep == M) {
    for (int i = threadIdx.x; i < M; i += kSelectThreads) dst[i] = i;
    return;
  }

  // Radix select, 8 bits at a time from the top: after the four passes, prefix is the key of
  // the keep-th best score, `remaining` how many slots with exactly that key are still to take
  // and `equal` how many slots have it.
  uint32_t prefix = 0, mask = 0;
  int remaining = keep;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kSelectThreads) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < M; i += kSelectThreads) {
      const uint32_t key = score_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns bins 8l .. 8l+7; `above` = count in the bins of higher lanes.
      const int lane = threadIdx.x;
      int own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) own += hist[lane * 8 + j];
      int suffix = own;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int t = __shfl_down_sync(0xffffffffu, suffix, off);
        if (lane + off < 32) suffix += t;
      }
      int above = suffix - own;
#pragma unroll
      for (int j = 7; j >= 0; --j) {
        const int c = hist[lane * 8 + j];
        if (above < remaining && above + c >= remaining) {
          s_prefix = prefix | (uint32_t(lane * 8 + j) << shift);
          s_remaining = remaining - above;
          s_equal = c;
        }
        above += c;
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }
  const int equal = s_equal;

  // Ascending walk: take every slot with a larger key, and the last `remaining` slots with the
  // threshold key (rank among them >= equal - remaining); positions from block prefix counts.
  int equal_before = 0, taken_before = 0;
  for (int base = 0; base < M; base += kSelectThreads) {
    const int i = base + threadIdx.x;
    const uint32_t key = i < M ? score_key(row[i]) : 0u;
    const bool is_equal = i < M && key == prefix;
    int chunk_equal, chunk_taken;
    const int equal_rank = equal_before + block_exclusive_count(is_equal, scratch, &chunk_equal);
    const bool take =
        i < M && (key > prefix || (is_equal && equal_rank >= equal - remaining));
    const int at = taken_before + block_exclusive_count(take, scratch, &chunk_taken);
    if (take) dst[at] = i;
    equal_before += chunk_equal;
    taken_before += chunk_taken;
  }
}

// score [rows, M] fp32 contiguous -> out [rows, keep + window] int64; 0 <= keep <= M.
inline cudaError_t select_keep(const float* score, int64_t rows, int M, int keep, int window,
                               int64_t* out, cudaStream_t stream) {
  if (rows == 0 || keep + window == 0) return cudaSuccess;
  select_keep_kernel<<<static_cast<unsigned>(rows), kSelectThreads, 0, stream>>>(score, M, keep,
                                                                                 window, out);
  return cudaGetLastError();
}

}  // namespace gkv::kernels
