// CUDA adapter of gkv::select_keep (kernel in kernels/select_keep.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/dispatch.h"
#include "kernels/select_keep.cuh"
#include "ops/select_keep.h"

namespace gkv {
namespace {

// score [B,Hkv,M] fp32 -> idx [B,Hkv,keep+window] int64
at::Tensor select_keep_cuda(const at::Tensor& score_in, int64_t keep, int64_t window) {
  constexpr const char* op = "select_keep";
  check_select_keep(score_in, keep, window);
  const int64_t B = score_in.size(0), H = score_in.size(1), M = score_in.size(2);
  TORCH_CHECK(M + window <= std::numeric_limits<int>::max(),
              "gkv::select_keep: M + window must fit in int32, got ", M + window);
  const c10::cuda::CUDAGuard guard(score_in.device());
  const auto score = score_in.contiguous();
  auto out = at::empty({B, H, keep + window}, score.options().dtype(at::kLong));
  GKV_CUDA_CHECK(op, kernels::select_keep(score.data_ptr<float>(), B * H, static_cast<int>(M),
                                          static_cast<int>(keep), static_cast<int>(window),
                                          out.data_ptr<int64_t>(),
                                          c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("select_keep", select_keep_cuda); }

}  // namespace gkv
