// CUDA adapter of gkv::rms_norm and gkv::add_rms_norm: checks (shared with the CPU kernels), layout
// (inputs are made contiguous; outputs are contiguous), dtype and vector-width dispatch, launch on
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "cuda/dispatch.h"
#include "kernels/rms_norm.cuh"
#include "ops/rms_norm.h"

namespace gkv {
namespace {

constexpr const char* kOp = "rms_norm";

// x (and residual) [..., D] contiguous, weight [D]: normalises x + residual into out (the sum
// into sum) when residual is defined, else x.
void launch_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                     double eps, at::Tensor& sum, at::Tensor& out) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT_MAX, "gkv::", kOp, ": ", rows, " rows exceed the CUDA grid limit of ",
              INT_MAX);
  kernels::RmsNormParams p{};
  p.x = x.data_ptr();
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.sum = residual.defined() ? sum.data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.rows = rows;
  p.D = D;
  p.eps = static_cast<float>(eps);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(kOp, x.scalar_type(), [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vectorizable(kVec, {D}, {p.x, p.residual, p.sum, p.weight, p.out})) {
      GKV_CUDA_CHECK(kOp, (kernels::rms_norm_launch<scalar_t, kVec>(p, stream)));
    } else {
      GKV_CUDA_CHECK(kOp, (kernels::rms_norm_launch<scalar_t, 1>(p, stream)));
    }
  });
}

// x [..., D], weight [D] -> [..., D]
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options()), no_sum;
  launch_rms_norm(x.contiguous(), at::Tensor(), weight.contiguous(), eps, no_sum, out);
  return out;
}

// x, residual [..., D], weight [D] -> (x + residual, rms_norm(x + residual)), both [..., D]
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor sum = at::empty(x.sizes(), x.options()), out = at::empty(x.sizes(), x.options());
  launch_rms_norm(x.contiguous(), residual.contiguous(), weight.contiguous(), eps, sum, out);
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
}

}  // namespace gkv
