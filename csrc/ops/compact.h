// Argument checks of gkv::compact_, gkv::write_slot_ and gkv::gather_tokens, shared by their CPU,
// Meta and CUDA kernels. They check ranks, shapes, dtypes, devices and layout; the range of an
// index depends on its values, so each backend checks it itself (the Meta kernel cannot).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gkv {

// k_cache/v_cache [B,Hkv,C,d] fp32/bf16/fp16, pos [B,Hkv,C] int32, score [B,Hkv,C] fp32,
// idx [B,Hkv,K] int64 with K <= C; the four buffers contiguous (written in place).
void check_compact(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                   const at::Tensor& score, const at::Tensor& idx);

// k_cache/v_cache [B,Hkv,C,d] fp32/bf16/fp16 and pos [B,Hkv,C] int32, all contiguous (written in
// place); k/v [B,Hkv,d] of the cache dtype (any strides), new_pos [B,Hkv] int32, slot int64 with one
// element; q_ring [B,Hq,W,d] contiguous of the cache dtype, q [B,Hq,d], ring_slot like slot: all
// three or none.
void check_write_slot(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& new_pos,
                      const at::Tensor& slot, const std::optional<at::Tensor>& q_ring,
                      const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& ring_slot);

// x [B,H,N,d] floating (float64 too: gradcheck), idx [B,H,K] int64.
void check_gather_tokens(const at::Tensor& x, const at::Tensor& idx);

// idx values in [0, n) (`idx_name` and `n_name` name them in the message); reads min and max
// back to the host.
void check_idx_range(const char* op, const at::Tensor& idx, const char* idx_name, int64_t n,
                     const char* n_name);

#ifdef GKV_WITH_CUDA
// compact_'s in-place walk on CUDA without its validation (a kernel and a host read of its
// flags), for an idx its caller made strictly ascending inside [0, C): see gkv::compact_sorted_.
void compact_sorted_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                         at::Tensor& score, const at::Tensor& idx);
#endif

}  // namespace gkv
