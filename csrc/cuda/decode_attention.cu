// CUDA adapter of gkv::decode_attention: checks (shared with the CPU kernel), layout, dtype and
// head_dim dispatch, scratch allocation, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "cuda/dispatch.h"
#include "kernels/decode_attention.cuh"
#include "ops/decode_attention.h"

namespace gkv {
namespace {

constexpr const char* kOp = "decode_attention";

// q [B,Hq,d], k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score_acc [B,Hkv,C] fp32,
// live_length [1] int64 -> out [B,Hq,d]
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& pos,
                                 int64_t length, double scale,
                                 const std::optional<at::Tensor>& score_acc,
                                 const std::optional<at::Tensor>& live_length) {
  check_decode_attention(q, k_cache, v_cache, pos, length, score_acc, live_length);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), Hkv = k_cache.size(1);
  const int64_t C = k_cache.size(2);
  auto out = at::empty(q.sizes(), q.options());
  if (length == 0 || out.numel() == 0) return out.zero_();
  // Grid sizes: B*Hq combine blocks plus B*Hkv*ceil(length / kEmitSlots) emit blocks.
  TORCH_CHECK(C <= INT_MAX && B * Hq + B * Hkv * (length / kernels::kEmitSlots + 1) <= INT_MAX,
              "gkv::", kOp, ": sizes too large (C = ", C, ", B * Hq = ", B * Hq, ")");
  // The heads of a row must be adjacent (the kernels read a group's rows as one block); the batch
  // stride is free, so q may be a slice of a joint q/k tensor without a copy.
  const auto qc = vector_readable(q.stride(1) == d || Hq == 1 ? q : q.contiguous());
  const auto k = vector_readable(k_cache);
  const auto v = vector_readable(v_cache);

  kernels::DecodeAttentionParams p{};
  p.q = qc.data_ptr();
  p.q_batch_stride = B == 1 ? Hq * d : qc.stride(0);
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.pos = pos.data_ptr<int32_t>();
  for (int i = 0; i < 3; ++i) {
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
    p.pos_stride[i] = pos.stride(i);
  }
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.C = static_cast<int>(C);
  p.length = static_cast<int>(length);
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr();
  p.score_acc = score_acc.has_value() ? score_acc->data_ptr<float>() : nullptr;
  p.live_length = live_length.has_value() ? live_length->data_ptr<int64_t>() : nullptr;

  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = q.options().dtype(at::kFloat);
  GKV_DISPATCH_FLOATING(kOp, q.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(kOp, d, [&] {
      // The one switch between the split kernels: tensor cores for 16-bit inputs with d >= 16
      // (d in {16, 32, 64, 128}), the FFMA kernel for fp32 and d = 8.
      constexpr bool kMma = !std::is_same_v<scalar_t, float> && kHeadDim >= 16;
      GKV_CUDA_CHECK(kOp, (kernels::decode_attention_plan<scalar_t, kHeadDim, kMma>(p)));
      // Scratch in one allocation: per-split partials (max [B,Hq,S], sum [B,Hq,S],
      // acc [B,Hq,S,d], which a single split does not need) and, for score emission, the
      // logits [B,Hq,length].
      const int64_t parts = B * Hq * p.num_splits;
      const int64_t n_acc = p.num_splits > 1 ? parts * d : 0;
      const int64_t n_logits = p.score_acc != nullptr ? B * Hq * length : 0;
      auto scratch = at::empty({2 * parts + n_acc + n_logits}, f32);
      p.part_m = scratch.data_ptr<float>();
      p.part_l = p.part_m + parts;
      p.part_acc = p.part_l + parts;
      p.logits = n_logits > 0 ? p.part_acc + n_acc : nullptr;
      GKV_CUDA_CHECK(kOp, (kernels::decode_attention_launch<scalar_t, kHeadDim, kMma>(p, stream)));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace gkv
