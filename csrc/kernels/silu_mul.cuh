// gkv::silu_mul on CUDA: one elementwise pass; each thread gates kVec elements of one row. No torch
// headers: raw pointers, sizes, a stream, a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"

namespace gkv::kernels {

// x [rows, 2F] contiguous -> out [rows, F]; F % kVec == 0 and the pointers kVec-aligned. Rounded
// as ATen's silu then mul round in T: silu in fp32 (x / (1 + exp(-x)), IEEE division), cast, then
// the product in fp32, cast.
template <typename T, int kVec>
__global__ void silu_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows,
                                int64_t F) {
  chain_wait();
  chain_release();
  using V = Pack<T, kVec>;
  const int64_t packs = F / kVec, total = rows * packs;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / packs, i = (e - row * packs) * kVec;
    const V gate = *reinterpret_cast<const V*>(x + row * 2 * F + i);
    const V up = *reinterpret_cast<const V*>(x + row * 2 * F + F + i);
    V o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float g = to_float(gate.v[j]);
      const float silu = to_float(from_float<T>(__fdiv_rn(g, 1.f + expf(-g))));
      o.v[j] = from_float<T>(__fmul_rn(silu, to_float(up.v[j])));
    }
    *reinterpret_cast<V*>(out + row * F + i) = o;
  }
}

template <typename T, int kVec>
cudaError_t silu_mul_launch(const T* x, T* out, int64_t rows, int64_t F, cudaStream_t stream) {
  const int64_t total = rows * (F / kVec);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65536));
  return launch_chained(silu_mul_kernel<T, kVec>, blocks, threads, 0, stream, x, out, rows, F);
}

}  // namespace gkv::kernels
