// Dtype and head_dim dispatch for the CUDA adapters (csrc/cuda/*.cu), with a loud default branch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
