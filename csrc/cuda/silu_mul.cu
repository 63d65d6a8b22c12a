// CUDA adapter of gkv::silu_mul: check (shared with the CPU kernel), layout (x is made contiguous;
// the output is contiguous), dtype and vector-width dispatch, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/dispatch.h"
#include "kernels/silu_mul.cuh"
#include "ops/silu_mul.h"

namespace gkv {
namespace {

constexpr const char* kOp = "silu_mul";

// x [..., 2F] -> [..., F]
at::Tensor silu_mul_cuda(const at::Tensor& x_in) {
  check_silu_mul(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  const int64_t F = sizes.back() / 2, rows = x.numel() / (2 * F);
  sizes.back() = F;
  at::Tensor out = at::empty(sizes, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(kOp, x.scalar_type(), [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* xp = static_cast<const scalar_t*>(x.data_ptr());
    auto* op = static_cast<scalar_t*>(out.data_ptr());
    if (vectorizable(kVec, {F}, {xp, op})) {
      GKV_CUDA_CHECK(kOp, (kernels::silu_mul_launch<scalar_t, kVec>(xp, op, rows, F, stream)));
    } else {
      GKV_CUDA_CHECK(kOp, (kernels::silu_mul_launch<scalar_t, 1>(xp, op, rows, F, stream)));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("silu_mul", &silu_mul_cuda); }

}  // namespace gkv
