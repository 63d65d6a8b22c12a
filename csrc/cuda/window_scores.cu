// CUDA adapter of gkv::window_scores: checks (shared with the CPU kernel), layout, dtype and
// head_dim dispatch, scratch allocation, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "cuda/dispatch.h"
#include "kernels/window_scores.cuh"
#include "ops/decode_attention.h"  // vector_readable
#include "ops/window_scores.h"

namespace gkv {
namespace {

constexpr const char* kOp = "window_scores";

// q_win [B,Hq,W,d], k [B,Hkv,N,d], pos [B,Hkv,N] int32 -> S [B,Hkv,N-W] fp32
at::Tensor window_scores_cuda(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos,
                              double scale) {
  check_window_scores(q_win, k, pos);
  const c10::cuda::CUDAGuard guard(q_win.device());
  const int64_t B = q_win.size(0), Hq = q_win.size(1), W = q_win.size(2), d = q_win.size(3);
  const int64_t Hkv = k.size(1), N = k.size(2);
  auto out = at::empty({B, Hkv, N - W}, q_win.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (Hq == 0 || d == 0) return out.zero_();  // no query: every probability is 0
  TORCH_CHECK(Hq / Hkv <= kernels::kWsRows, "gkv::", kOp, ": the GQA group Hq / Hkv = ", Hq / Hkv,
              " is larger than the CUDA kernel's ", kernels::kWsRows, " query rows per tile");
  TORCH_CHECK(N <= INT_MAX / 2 && B * Hq * W <= INT_MAX, "gkv::", kOp, ": sizes too large (N = ",
              N, ", B * Hq * W = ", B * Hq * W, ")");
  const auto qc = vector_readable(q_win.contiguous());
  const auto kc = vector_readable(k);

  kernels::WindowScoresParams p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.pos = pos.data_ptr<int32_t>();
  for (int i = 0; i < 3; ++i) {
    p.k_stride[i] = kc.stride(i);
    p.pos_stride[i] = pos.stride(i);
  }
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.W = static_cast<int>(W);
  p.N = static_cast<int>(N);
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  GKV_CUDA_CHECK(kOp, kernels::window_scores_plan(p));
  // Scratch: per-split row statistics and the merged lse of every window query row.
  const auto f32 = q_win.options().dtype(at::kFloat);
  auto part_m = at::empty({B, Hq, W, p.num_splits}, f32);
  auto part_l = at::empty({B, Hq, W, p.num_splits}, f32);
  auto lse = at::empty({B, Hq, W}, f32);
  p.part_m = part_m.data_ptr<float>();
  p.part_l = part_l.data_ptr<float>();
  p.lse = lse.data_ptr<float>();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(kOp, q_win.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(kOp, d, [&] {
      // Tensor cores for 16-bit inputs with d >= 16, FFMA for fp32 and d = 8 (as decode_attention).
      constexpr bool kMma = !std::is_same_v<scalar_t, float> && kHeadDim >= 16;
      GKV_CUDA_CHECK(kOp, (kernels::window_scores_launch<scalar_t, kHeadDim, kMma>(p, stream)));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("window_scores", &window_scores_cuda); }

}  // namespace gkv
