// gkv::rms_norm and gkv::add_rms_norm on CUDA: one block per row, fp32 accumulation, kVec elements
// per load. No torch headers: raw pointers, sizes, a stream, a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"

namespace gkv::kernels {

constexpr int kRmsMaxThreads = 512;

// Sum over the block of one float per thread; every thread gets the total.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kRmsMaxThreads / 32];
  x = warp_sum(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = lane < warps ? warp_sums[lane] : 0.f;
  return warp_sum(x);
}

struct RmsNormParams {
  const void* x;         // [rows, D] contiguous
  const void* residual;  // [rows, D] contiguous, or null: normalise x itself
  void* sum;             // [rows, D]: x + residual rounded to T (written when residual is set)
  const void* weight;    // [D]
  void* out;             // [rows, D]
  int64_t rows, D;
  float eps;
};

// One block per row; D % kVec == 0 and the pointers kVec-aligned. With a residual, the row
// normalised is x + residual rounded to T (as ATen's add rounds it), stored to sum on the way. The
// second pass re-reads the row (from L1/L2; the sum was written by the same thread) rather than
// holding it in registers, so any D fits.
template <typename T, int kVec, bool kAdd>
__global__ void rms_norm_kernel(RmsNormParams p) {
  chain_wait();
  chain_release();
  using V = Pack<T, kVec>;
  const int64_t vecs = p.D / kVec, first = blockIdx.x * p.D;
  const V* x = reinterpret_cast<const V*>(static_cast<const T*>(p.x) + first);
  const V* residual = kAdd ? reinterpret_cast<const V*>(static_cast<const T*>(p.residual) + first)
                           : nullptr;
  V* sum = kAdd ? reinterpret_cast<V*>(static_cast<T*>(p.sum) + first) : nullptr;
  const V* row = kAdd ? sum : x;
  const V* w = static_cast<const V*>(p.weight);
  V* dst = reinterpret_cast<V*>(static_cast<T*>(p.out) + first);
  float squares = 0.f;
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    V v = x[i];
    if constexpr (kAdd) {
      const V r = residual[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.v[j] = from_float<T>(to_float(v.v[j]) + to_float(r.v[j]));
      sum[i] = v;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = to_float(v.v[j]);
      squares += f * f;
    }
  }
  const float inv_rms = rsqrtf(block_sum(squares) / static_cast<float>(p.D) + p.eps);
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    const V v = row[i], wv = w[i];
    V o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      // Round the normalised value to T before the weight multiply, as the CPU oracle does.
      const float normed = to_float(from_float<T>(to_float(v.v[j]) * inv_rms));
      o.v[j] = from_float<T>(normed * to_float(wv.v[j]));
    }
    dst[i] = o;
  }
}

template <typename T, int kVec>
cudaError_t rms_norm_launch(const RmsNormParams& p, cudaStream_t stream) {
  const int64_t vecs = p.D / kVec;
  const int64_t warps_needed = (vecs + 31) / 32;
  const int threads = static_cast<int>(std::clamp<int64_t>(warps_needed * 32, 32, kRmsMaxThreads));
  const auto blocks = static_cast<unsigned>(p.rows);
  const auto kernel = p.residual != nullptr ? rms_norm_kernel<T, kVec, true>
                                            : rms_norm_kernel<T, kVec, false>;
  return launch_chained(kernel, blocks, threads, 0, stream, p);
}

}  // namespace gkv::kernels
