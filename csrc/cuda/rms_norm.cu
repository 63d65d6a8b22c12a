// CUDA adapter of gkv::rms_norm: checks (shared with the CPU kernel), layout (x is made
// contiguous; the output is contiguous), dtype and vector-width dispatch, launch on the current
// stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "cuda/dispatch.h"
#include "kernels/rms_norm.cuh"
#include "ops/rms_norm.h"

namespace gkv {
namespace {

constexpr const char* kOp = "rms_norm";

// x [..., D], weight [D] -> [..., D]
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT_MAX, "gkv::", kOp, ": ", rows, " rows exceed the CUDA grid limit of ",
              INT_MAX);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(kOp, x.scalar_type(), [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* xp = static_cast<const scalar_t*>(xc.data_ptr());
    const auto* wp = static_cast<const scalar_t*>(wc.data_ptr());
    auto* op = static_cast<scalar_t*>(out.data_ptr());
    const float e = static_cast<float>(eps);
    const auto launch = [&](auto vec) {
      return kernels::rms_norm_launch<scalar_t, decltype(vec)::value>(xp, wp, op, rows, D, e, stream);
    };
    if (vectorizable(kVec, {D}, {xp, wp, op})) {
      GKV_CUDA_CHECK(kOp, launch(std::integral_constant<int, kVec>{}));
    } else {
      GKV_CUDA_CHECK(kOp, launch(std::integral_constant<int, 1>{}));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace gkv
