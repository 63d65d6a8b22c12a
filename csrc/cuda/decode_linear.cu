// CUDA adapter of gkv::decode_linear: check (shared with the CPU kernel), the choice between our
// kernel (16-bit x with 1..64 rows, K % 8 == 0, 16-byte aligned rows, a contiguous weight) and
// cuBLAS through ATen's linear (everything else: more rows make the product compute-bound, where
// cuBLAS's tiles win, and a strided weight would need a copy per call), the plan, dispatch over
// dtype and row count, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda/dispatch.h"
#include "kernels/decode_linear.cuh"
#include "ops/decode_linear.h"

namespace gkv {
namespace {

constexpr const char* kOp = "decode_linear";

// x [..., K], weight [N, K], bias [N] -> [..., N]
at::Tensor decode_linear_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in) {
  check_decode_linear(x_in, weight_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  const at::Tensor x = x_in.reshape({-1, K});
  const int64_t M = x.size(0);
  const auto dtype = x.scalar_type();
  // A single row's stride is any number; the kernel never steps by it.
  const int64_t row_stride = M == 1 ? K : x.stride(0);
  const bool ours = (dtype == at::kBFloat16 || dtype == at::kHalf) && M >= 1 &&
                    M <= kernels::kDecodeLinearMaxRows && N >= 1 && K >= 8 && K % 8 == 0 &&
                    N < (int64_t(1) << 31) && K < (int64_t(1) << 31) && x.stride(1) == 1 &&
                    weight_in.is_contiguous() &&
                    vectorizable(8, {row_stride}, {x.data_ptr(), weight_in.data_ptr()});
  if (!ours) return at::linear(x_in, weight_in, bias_in).contiguous();

  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  kernels::DecodeLinearParams p{};
  p.x = x.data_ptr();
  p.w = weight_in.data_ptr();
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.x_row_stride = row_stride;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  GKV_CUDA_CHECK(kOp, kernels::decode_linear_plan(p));
  at::Tensor partial;
  if (p.num_splits > 1) {
    partial = at::empty({p.num_splits, M, N}, x.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int m_tiles = static_cast<int>((M + 15) / 16);
  GKV_DISPATCH_FLOATING(kOp, dtype, [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {  // fp32 went to cuBLAS above
      // Up to 16 rows: one m16 tile of mma.sync. More: wgmma over all 64 x rows.
      const auto launch = m_tiles == 1 ? kernels::decode_linear_launch<scalar_t, 1>
                                       : kernels::decode_linear_launch<scalar_t, 4, true>;
      GKV_CUDA_CHECK(kOp, launch(p, stream));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("decode_linear", &decode_linear_cuda); }

}  // namespace gkv
