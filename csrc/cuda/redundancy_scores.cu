// CUDA adapter of gkv::redundancy_scores (kernels in kernels/redundancy_scores.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
  TORCH_CHECK(N <= int64_t(65535) * kernels::kRedTile && B * H <= std::numeric_limits<int>::max(),
              "gkv::redundancy_scores: N must be <= ", int64_t(65535) * kernels::kRedTile,
              " and B * Hkv < 2^31 on CUDA, got N = ", N, ", B * Hkv = ", B * H);
  const c10::cuda::CUDAGuard guard(k_in.device());
  const auto k = k_in.contiguous();
  const auto pos = pos_in.contiguous();
  auto out = at::empty({B, H, N}, k.options().dtype(at::kFloat));
  const int64_t rows = B * H;
  const auto f32 = k.options().dtype(at::kFloat);
  auto inv = at::empty({rows, kernels::redundancy_padded_len(N)}, f32);
  auto rowsum = at::empty({rows, N}, f32);
  auto last_c = at::empty({rows, N}, f32);
  auto last = at::empty({rows, N}, k.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(op, k.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(op, d, [&] {
      GKV_CUDA_CHECK(op, (kernels::redundancy_scores<scalar_t, kHeadDim>(
                             static_cast<const scalar_t*>(k.data_ptr()), pos.data_ptr<int>(), rows,
                             static_cast<int>(N), static_cast<float>(threshold),
                             inv.data_ptr<float>(), rowsum.data_ptr<float>(), last.data_ptr<int>(),
                             last_c.data_ptr<float>(), out.data_ptr<float>(), stream)));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("redundancy_scores", redundancy_scores_cuda); }

}  // namespace gkv
