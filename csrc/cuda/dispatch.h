// Dtype and head_dim dispatch for the CUDA adapters (csrc/cuda/*.cu), with a loud default branch,
// and the test for 16-byte vector access.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

// Runs __VA_ARGS__ with `scalar_t` bound to the CUDA type of a float32/bfloat16/float16 tensor.
#define GKV_DISPATCH_FLOATING(op, dtype, ...)                                                   \
  [&] {                                                                                         \
    switch (dtype) {                                                                            \
      case at::kFloat: {                                                                        \
        using scalar_t = float;                                                                 \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kBFloat16: {                                                                     \
        using scalar_t = __nv_bfloat16;                                                         \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kHalf: {                                                                         \
        using scalar_t = __half;                                                                \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      default:                                                                                  \
        TORCH_CHECK(false, "gkv::", op, ": unsupported dtype ", dtype,                         \
                    " (supported: float32, bfloat16, float16)");                                \
    }                                                                                           \
  }()

// Runs __VA_ARGS__ with `constexpr int kHeadDim` bound to the head size.
#define GKV_DISPATCH_HEAD_DIM(op, head_dim, ...)                                                \
  [&] {                                                                                         \
    switch (head_dim) {                                                                         \
      case 8: {                                                                                 \
        constexpr int kHeadDim = 8;                                                             \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case 16: {                                                                                \
        constexpr int kHeadDim = 16;                                                            \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case 32: {                                                                                \
        constexpr int kHeadDim = 32;                                                            \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case 64: {                                                                                \
        constexpr int kHeadDim = 64;                                                            \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case 128: {                                                                               \
        constexpr int kHeadDim = 128;                                                           \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      default:                                                                                  \
        TORCH_CHECK(false, "gkv::", op, ": unsupported head_dim ", head_dim,                   \
                    " on CUDA (supported: 8, 16, 32, 64, 128)");                                \
    }                                                                                           \
  }()

// Fails with the op name and CUDA's message when a launch or call did not succeed.
#define GKV_CUDA_CHECK(op, expr)                                                                \
  do {                                                                                          \
    cudaError_t gkv_err_ = (expr);                                                              \
    TORCH_CHECK(gkv_err_ == cudaSuccess, "gkv::", op, ": CUDA error: ",                        \
                cudaGetErrorString(gkv_err_));                                                  \
  } while (0)

namespace gkv {

// True when rows can be read in 16-byte vectors of `vec` elements: every element count (sizes,
// strides) is a multiple of vec and every pointer is 16-byte aligned.
inline bool vectorizable(int64_t vec, std::initializer_list<int64_t> counts,
                         std::initializer_list<const void*> pointers) {
  for (int64_t c : counts) {
    if (c % vec != 0) return false;
  }
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

}  // namespace gkv
