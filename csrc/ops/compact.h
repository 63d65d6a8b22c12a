// Argument checks of gkv::compact_ and gkv::gather_tokens, shared by their CPU, Meta and CUDA
// kernels. They check ranks, shapes, dtypes, devices and layout; the range of idx depends on its
// values, so each backend checks it itself (the Meta kernel cannot).
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// k_cache/v_cache [B,Hkv,C,d] fp32/bf16/fp16, pos [B,Hkv,C] int32, score [B,Hkv,C] fp32,
// idx [B,Hkv,K] int64 with K <= C; the four buffers contiguous (written in place).
void check_compact(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                   const at::Tensor& score, const at::Tensor& idx);

// x [B,H,N,d] floating (float64 too: gradcheck), idx [B,H,K] int64.
void check_gather_tokens(const at::Tensor& x, const at::Tensor& idx);

// idx values in [0, n) (`n_name` names n in the message); reads min and max back to the host.
void check_idx_range(const char* op, const at::Tensor& idx, int64_t n, const char* n_name);

#ifdef GKV_WITH_CUDA
// compact_'s in-place walk on CUDA without its validation (a kernel and a host read of its
// flags), for an idx its caller made strictly ascending inside [0, C): see gkv::compact_sorted_.
void compact_sorted_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                         at::Tensor& score, const at::Tensor& idx);
#endif

}  // namespace gkv
