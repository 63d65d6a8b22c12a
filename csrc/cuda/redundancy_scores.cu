// CUDA adapters of gkv::redundancy_scores and gkv::redundancy_scores_carry (kernels in
// kernels/redundancy_scores.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/dispatch.h"
#include "kernels/redundancy_scores.cuh"
#include "ops/redundancy_scores.h"

namespace gkv {
namespace {

// k [B,Hkv,N,d], pos [B,Hkv,N] int32, carried [B,Hkv,M] int32 or none -> R [B,Hkv,N] fp32 and,
// with want_exempt, m* [B,Hkv,N] int32.
std::tuple<at::Tensor, at::Tensor> run_redundancy(const char* op, const at::Tensor& k_in,
                                                  const at::Tensor& pos_in,
                                                  const at::Tensor* carried_in, double threshold,
                                                  bool want_exempt) {
  const int64_t B = k_in.size(0), H = k_in.size(1), N = k_in.size(2), d = k_in.size(3);
  TORCH_CHECK(N <= kernels::kRedMaxSlots && B * H <= std::numeric_limits<int>::max(),
              "gkv::", op, ": N must be <= ", kernels::kRedMaxSlots,
              " and B * Hkv < 2^31 on CUDA, got N = ", N, ", B * Hkv = ", B * H);
  const c10::cuda::CUDAGuard guard(k_in.device());
  auto k = k_in.contiguous();
  // The kernels read keys in 16-byte chunks: a contiguous view at an odd offset is copied.
  if (reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 != 0) k = k.clone();
  const auto pos = pos_in.contiguous();
  const auto carried = carried_in != nullptr ? carried_in->contiguous() : at::Tensor();
  auto out = at::empty({B, H, N}, k.options().dtype(at::kFloat));
  auto exempt = want_exempt ? at::empty({B, H, N}, k.options().dtype(at::kInt)) : at::Tensor();
  const int64_t rows = B * H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(op, k.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(op, d, [&] {
      const int M = kernels::redundancy_carried_used<scalar_t, kHeadDim>(
          static_cast<int>(N), carried.defined() ? static_cast<int>(carried.size(2)) : 0);
      int splits = 1;
      GKV_CUDA_CHECK(op, (kernels::redundancy_splits<scalar_t, kHeadDim>(
                             rows, static_cast<int>(N), M, &splits)));
      // One allocation for every workspace (fewer host calls on this short op).
      auto workspace = at::empty(
          {kernels::redundancy_workspace_floats<scalar_t, kHeadDim>(rows, N, M, splits)},
          k.options().dtype(at::kFloat));
      GKV_CUDA_CHECK(op, (kernels::redundancy_scores<scalar_t, kHeadDim>(
                             static_cast<const scalar_t*>(k.data_ptr()), pos.data_ptr<int>(), rows,
                             static_cast<int>(N), M, M > 0 ? carried.data_ptr<int>() : nullptr, M,
                             static_cast<float>(threshold), splits, workspace.data_ptr<float>(),
                             out.data_ptr<float>(),
                             want_exempt ? exempt.data_ptr<int>() : nullptr, stream)));
    });
  });
  return {out, exempt};
}

at::Tensor redundancy_scores_cuda(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  check_redundancy_scores(k, pos, threshold);
  return std::get<0>(run_redundancy("redundancy_scores", k, pos, nullptr, threshold, false));
}

std::tuple<at::Tensor, at::Tensor> redundancy_scores_carry_cuda(const at::Tensor& k,
                                                                const at::Tensor& pos,
                                                                const at::Tensor& carried,
                                                                double threshold) {
  check_redundancy_scores_carry(k, pos, carried, threshold);
  return run_redundancy("redundancy_scores_carry", k, pos, &carried, threshold, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) {
  m.impl("redundancy_scores", redundancy_scores_cuda);
  m.impl("redundancy_scores_carry", redundancy_scores_carry_cuda);
}

}  // namespace gkv
