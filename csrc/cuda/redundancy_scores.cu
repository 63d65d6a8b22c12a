// CUDA adapter of gkv::redundancy_scores (kernels in kernels/redundancy_scores.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "cuda/dispatch.h"
#include "kernels/redundancy_scores.cuh"
#include "ops/redundancy_scores.h"

namespace gkv {
namespace {

// k [B,Hkv,N,d], pos [B,Hkv,N] int32 -> R [B,Hkv,N] fp32
at::Tensor redundancy_scores_cuda(const at::Tensor& k_in, const at::Tensor& pos_in,
                                  double threshold) {
  constexpr const char* op = "redundancy_scores";
  check_redundancy_scores(k_in, pos_in, threshold);
  const int64_t B = k_in.size(0), H = k_in.size(1), N = k_in.size(2), d = k_in.size(3);
  TORCH_CHECK(N <= kernels::kRedMaxSlots && B * H <= std::numeric_limits<int>::max(),
              "gkv::redundancy_scores: N must be <= ", kernels::kRedMaxSlots,
              " and B * Hkv < 2^31 on CUDA, got N = ", N, ", B * Hkv = ", B * H);
  const c10::cuda::CUDAGuard guard(k_in.device());
  auto k = k_in.contiguous();
  // The kernels read keys in 16-byte chunks: a contiguous view at an odd offset is copied.
  if (reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 != 0) k = k.clone();
  const auto pos = pos_in.contiguous();
  auto out = at::empty({B, H, N}, k.options().dtype(at::kFloat));
  const int64_t rows = B * H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(op, k.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(op, d, [&] {
      int splits = 1;
      GKV_CUDA_CHECK(op, (kernels::redundancy_splits<scalar_t, kHeadDim>(
                             rows, static_cast<int>(N), &splits)));
      // One allocation for every workspace (fewer host calls on this short op).
      auto workspace = at::empty({kernels::redundancy_workspace_floats<scalar_t, kHeadDim>(rows, N, splits)},
                                 k.options().dtype(at::kFloat));
      GKV_CUDA_CHECK(op, (kernels::redundancy_scores<scalar_t, kHeadDim>(
                             static_cast<const scalar_t*>(k.data_ptr()), pos.data_ptr<int>(), rows,
                             static_cast<int>(N), static_cast<float>(threshold), splits,
                             workspace.data_ptr<float>(), out.data_ptr<float>(), stream)));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("redundancy_scores", redundancy_scores_cuda); }

}  // namespace gkv
