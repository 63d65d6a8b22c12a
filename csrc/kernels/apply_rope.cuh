// gkv::apply_rope on CUDA: one elementwise pass; each thread rotates kVec pairs (i, i + d/2).
// No torch headers: raw pointers, element strides, a stream, a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"

namespace gkv::kernels {

struct RopeParams {
  const void* x;         // [B,H,T,d], element strides x_stride (innermost stride 1)
  const void* cos;       // [B,H,T,d] broadcast: stride 0 on broadcast dims, innermost stride 1
  const void* sin;       // like cos
  void* out;             // [B,H,T,d] contiguous
  int64_t x_stride[3];   // b, h, t
  int64_t cos_stride[3];
  int64_t sin_stride[3];
  int64_t H, T, half;    // half = d / 2
  int64_t rows;          // B * H * T
};

// a * c + b * s rounded as ATen rounds x * cos + rotate_half(x) * sin in T: each product, then the
// sum (the _rn intrinsics keep nvcc from contracting them into an FMA, so fp32 matches as well).
template <typename T>
__device__ __forceinline__ T rope_pair(float a, float c, float b, float s) {
  const float ac = to_float(from_float<T>(__fmul_rn(a, c)));
  const float bs = to_float(from_float<T>(__fmul_rn(b, s)));
  return from_float<T>(__fadd_rn(ac, bs));
}

template <typename T, int kVec>
__global__ void apply_rope_kernel(RopeParams p) {
  chain_wait();
  chain_release();
  using V = Pack<T, kVec>;
  const int64_t packs = p.half / kVec;  // per half row
  const int64_t total = p.rows * packs;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / packs, i = (e - row * packs) * kVec;
    const int64_t t = row % p.T, bh = row / p.T, h = bh % p.H, b = bh / p.H;
    const auto elem = [&](const void* base, const int64_t* stride) {
      return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + t * stride[2] + i;
    };
    const T* x = elem(p.x, p.x_stride);
    const T* c = elem(p.cos, p.cos_stride);
    const T* s = elem(p.sin, p.sin_stride);
    const V x1 = *reinterpret_cast<const V*>(x), x2 = *reinterpret_cast<const V*>(x + p.half);
    const V c1 = *reinterpret_cast<const V*>(c), c2 = *reinterpret_cast<const V*>(c + p.half);
    const V s1 = *reinterpret_cast<const V*>(s), s2 = *reinterpret_cast<const V*>(s + p.half);
    V o1, o2;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float a = to_float(x1.v[j]), b = to_float(x2.v[j]);
      o1.v[j] = rope_pair<T>(a, to_float(c1.v[j]), -b, to_float(s1.v[j]));  // x1 cos - x2 sin
      o2.v[j] = rope_pair<T>(b, to_float(c2.v[j]), a, to_float(s2.v[j]));   // x2 cos + x1 sin
    }
    T* out = static_cast<T*>(p.out) + row * 2 * p.half + i;
    *reinterpret_cast<V*>(out) = o1;
    *reinterpret_cast<V*>(out + p.half) = o2;
  }
}

template <typename T, int kVec>
cudaError_t apply_rope_launch(const RopeParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * (p.half / kVec);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65536));
  return launch_chained(apply_rope_kernel<T, kVec>, blocks, threads, 0, stream, p);
}

}  // namespace gkv::kernels
