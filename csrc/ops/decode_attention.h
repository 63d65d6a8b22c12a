// Shared pieces of gkv::decode_attention: the argument check used by its CPU, Meta and CUDA
// kernels, and two helpers that gkv::window_scores uses too.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gkv {

// Checks every argument of decode_attention; each failure names the argument and what was
// expected. Works on symbolic sizes (Meta). q [B,Hq,d], k_cache/v_cache [B,Hkv,C,d],
// pos [B,Hkv,C] int32, score_acc [B,Hkv,C] fp32 contiguous, live_length [1] int64.
void check_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& pos, int64_t length,
                            const std::optional<at::Tensor>& score_acc,
                            const std::optional<at::Tensor>& live_length);

// Softmax over the last dim of fp32 logits in which masked entries are -inf; a row with no
// finite entry gives all zeros instead of NaN. s [..., N] fp32 -> [..., N] fp32.
at::Tensor softmax_or_zero(const at::Tensor& s);

// t itself when the CUDA kernels can read it in place with 16-byte vectors along the last dim
// (last dim contiguous, every row 16-byte aligned: e.g. a slice of a larger cache), else a
// contiguous copy. t [..., d]
at::Tensor vector_readable(const at::Tensor& t);

}  // namespace gkv
