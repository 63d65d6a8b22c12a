// gkv::rms_norm on CUDA: one block per row, fp32 accumulation, kVec elements per load. No torch
// headers: raw pointers, sizes, a stream, a cudaError_t.
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

// x/out [rows, D] contiguous, weight [D]; D % kVec == 0 and the pointers kVec-aligned. The second
// pass re-reads the row (from L1/L2) rather than holding it in registers, so any D fits.
template <typename T, int kVec>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                T* __restrict__ out, int64_t D, float eps) {
  using V = Pack<T, kVec>;
  const int64_t vecs = D / kVec;
  const V* row = reinterpret_cast<const V*>(x + blockIdx.x * D);
  const V* w = reinterpret_cast<const V*>(weight);
  V* dst = reinterpret_cast<V*>(out + blockIdx.x * D);
  float squares = 0.f;
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    const V v = row[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = to_float(v.v[j]);
      squares += f * f;
    }
  }
  const float inv_rms = rsqrtf(block_sum(squares) / static_cast<float>(D) + eps);
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
cudaError_t rms_norm_launch(const T* x, const T* weight, T* out, int64_t rows, int64_t D, float eps,
                            cudaStream_t stream) {
  const int64_t vecs = D / kVec;
  const int64_t warps_needed = (vecs + 31) / 32;
  const int threads = static_cast<int>(std::clamp<int64_t>(warps_needed * 32, 32, kRmsMaxThreads));
  rms_norm_kernel<T, kVec><<<static_cast<unsigned>(rows), threads, 0, stream>>>(x, weight, out, D,
                                                                                eps);
  return cudaGetLastError();
}

}  // namespace gkv::kernels
