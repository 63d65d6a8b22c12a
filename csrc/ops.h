// The C++ API of the gkv ops. Every call goes through the dispatcher, so CPU, CUDA, Meta and
// Autograd kernels are picked exactly as from Python. Shapes: see csrc/torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gkv {

// q [B,Hq,d], k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score_acc [B,Hkv,C] fp32,
// live_length [1] int64 -> out [B,Hq,d]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& pos, int64_t length,
                            double scale,
                            const std::optional<at::Tensor>& score_acc = std::nullopt,
                            const std::optional<at::Tensor>& live_length = std::nullopt);

// q_win [B,Hq,W,d], k [B,Hkv,N,d], pos [B,Hkv,N] int32 -> S [B,Hkv,N-W] fp32
at::Tensor window_scores(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos,
                         double scale);

// k [B,Hkv,N,d], pos [B,Hkv,N] int32 -> R [B,Hkv,N] fp32
at::Tensor redundancy_scores(const at::Tensor& k, const at::Tensor& pos, double threshold = 0.5);

// The same with exemptions carried between calls: carried [B,Hkv,M] int32 ->
// (R [B,Hkv,N] fp32, m* [B,Hkv,N] int32)
std::tuple<at::Tensor, at::Tensor> redundancy_scores_carry(const at::Tensor& k,
                                                           const at::Tensor& pos,
                                                           const at::Tensor& carried,
                                                           double threshold = 0.5);

// score [B,Hkv,M] fp32 -> idx [B,Hkv,keep+window] int64
at::Tensor select_keep(const at::Tensor& score, int64_t keep, int64_t window);

// k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score [B,Hkv,C] fp32, idx [B,Hkv,K] int64
void compact_(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, at::Tensor& score,
              const at::Tensor& idx);

// compact_ for an idx that select_keep made (strictly ascending per head, inside [0, C)): on
// CUDA it skips the validation, whose host read would stall every compression step; elsewhere it
// is compact_. Not an op: only code that made idx itself may promise that.
void compact_sorted_(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                     at::Tensor& score, const at::Tensor& idx);

// x [B,H,N,d], idx [B,H,K] int64 -> [B,H,K,d]
at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& idx);

// k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32 take k/v [B,Hkv,d] and new_pos [B,Hkv] int32
// at slot `slot` (int64, one element, read on the device); with q_ring [B,Hq,W,d], q [B,Hq,d] and
// ring_slot, the query ring takes q at ring_slot too.
void write_slot_(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, const at::Tensor& k,
                 const at::Tensor& v, const at::Tensor& new_pos, const at::Tensor& slot,
                 const std::optional<at::Tensor>& q_ring = std::nullopt,
                 const std::optional<at::Tensor>& q = std::nullopt,
                 const std::optional<at::Tensor>& ring_slot = std::nullopt);

// q [B,Hq,T,d], k/v [B,Hkv,T,d], death [B,Hkv,T] int32 -> (out [B,Hq,T,d], lse [B,Hq,T] fp32)
std::tuple<at::Tensor, at::Tensor> lifetime_attention(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& death, double scale);

// -> (dq [B,Hq,T,d], dk [B,Hkv,T,d], dv [B,Hkv,T,d])
std::tuple<at::Tensor, at::Tensor, at::Tensor> lifetime_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& death, const at::Tensor& out, const at::Tensor& lse, double scale);

// x [..., D], weight [D] -> [..., D]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// x, residual [..., D], weight [D] -> (x + residual, rms_norm(x + residual, weight, eps))
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

// x [..., 2F] -> silu(x[..., :F]) * x[..., F:], [..., F]
at::Tensor silu_mul(const at::Tensor& x);

// x [B,H,T,d], cos/sin [B|1,H|1,T|1,d] -> [B,H,T,d]
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// x [..., K], weight [N, K], bias [N] -> x W^T + bias, [..., N]
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace gkv
