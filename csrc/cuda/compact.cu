// CUDA adapters of gkv::compact_, gkv::write_slot_ and gkv::gather_tokens (kernels in
// kernels/compact.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/dispatch.h"
#include "kernels/compact.cuh"
#include "ops/compact.h"

namespace gkv {
namespace {

// Runs f(Vec*) with Vec the widest of 16/8/4/2/1-byte words dividing every value (sizes, byte
// strides, addresses), so rows move in 16-byte vectors whenever the layout allows.
template <typename F>
cudaError_t with_vec(const std::vector<int64_t>& values, F&& f) {
  int64_t width = 16;
  for (int64_t v : values) {
    while (v % width != 0) width /= 2;
  }
  switch (width) {
    case 16: return f(static_cast<uint4*>(nullptr));
    case 8: return f(static_cast<uint2*>(nullptr));
    case 4: return f(static_cast<uint32_t*>(nullptr));
    case 2: return f(static_cast<uint16_t*>(nullptr));
    default: return f(static_cast<uint8_t*>(nullptr));
  }
}

// dst [B,H,K,d] (contiguous) = src [B,H,n,d] (src.stride(3) == 1) gathered along dim 2 by
// idx [B,H,K] int64 (contiguous); an out-of-range value sets a bit of flags[0].
cudaError_t gather_into(const at::Tensor& src, const at::Tensor& idx, at::Tensor& dst, int* flags,
                        cudaStream_t stream) {
  const int64_t es = src.element_size();
  const int64_t row_bytes = src.size(3) * es;
  const int64_t sb = src.stride(0) * es, sh = src.stride(1) * es, sn = src.stride(2) * es;
  const auto src_addr = reinterpret_cast<int64_t>(src.data_ptr());
  const auto dst_addr = reinterpret_cast<int64_t>(dst.data_ptr());
  return with_vec({row_bytes, sb, sh, sn, src_addr, dst_addr}, [&](auto* tag) {
    using Vec = std::remove_pointer_t<decltype(tag)>;
    return kernels::gather_rows<Vec>(src.data_ptr(), sb, sh, sn, src.size(1), src.size(2),
                                     idx.data_ptr<int64_t>(), src.size(0) * src.size(1),
                                     idx.size(2), row_bytes, dst.data_ptr(), flags, stream);
  });
}

// The in-place walk over k/v, then pos/score, for an idx with idx[t] >= t (contiguous).
void compact_in_place(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                      at::Tensor& score, const at::Tensor& idx, cudaStream_t stream) {
  constexpr const char* op = "compact_";
  const int64_t rows = k_cache.size(0) * k_cache.size(1), C = k_cache.size(2), K = idx.size(2);
  const int64_t row_bytes = k_cache.size(3) * k_cache.element_size();
  TORCH_CHECK(C * row_bytes < (int64_t{1} << 31), "gkv::compact_: one head's cache, C * d * ",
              "element size = ", C * row_bytes, " bytes, must be below 2^31 on CUDA");
  GKV_CUDA_CHECK(op, with_vec({row_bytes, reinterpret_cast<int64_t>(k_cache.data_ptr()),
                               reinterpret_cast<int64_t>(v_cache.data_ptr())},
                              [&](auto* tag) {
                                using Vec = std::remove_pointer_t<decltype(tag)>;
                                return kernels::compact_rows<Vec>(
                                    k_cache.data_ptr(), v_cache.data_ptr(), rows, C, row_bytes,
                                    idx.data_ptr<int64_t>(), K, stream);
                              }));
  GKV_CUDA_CHECK(op, kernels::compact_rows<uint32_t>(pos.data_ptr(), score.data_ptr(), rows, C, 4,
                                                     idx.data_ptr<int64_t>(), K, stream));
}

// k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score [B,Hkv,C] fp32, idx [B,Hkv,K] int64.
// One small kernel validates idx (a single host read of its flags). When idx[t] >= t everywhere
// (ascending, as select_keep makes it) the buffers are compacted in place; any other idx goes
// through a gathered copy, since an in-place parallel gather would race.
void compact_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, at::Tensor& score,
                  const at::Tensor& idx_in) {
  constexpr const char* op = "compact_";
  check_compact(k_cache, v_cache, pos, score, idx_in);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto idx = idx_in.contiguous();
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2);
  const int64_t K = idx.size(2), rows = B * H;
  auto flags_buf = at::zeros({1}, idx.options().dtype(at::kInt));
  int* flags = flags_buf.data_ptr<int>();
  GKV_CUDA_CHECK(op, kernels::check_idx(idx.data_ptr<int64_t>(), rows, K, C, flags, stream));
  const int found = flags_buf.item<int>();
  if (found & kernels::kIdxOutOfRange) check_idx_range(op, idx, "idx", C, "C");
  if (!(found & kernels::kIdxBehind)) {
    compact_in_place(k_cache, v_cache, pos, score, idx, stream);
    return;
  }
  for (at::Tensor* t : {&k_cache, &v_cache, &pos, &score}) {
    const auto src = t->dim() == 4 ? *t : t->unsqueeze(-1);
    auto tmp = at::empty({B, H, K, src.size(3)}, src.options());
    GKV_CUDA_CHECK(op, gather_into(src, idx, tmp, flags, stream));
    src.narrow(2, 0, K).copy_(tmp);
  }
}

// Row (b, h) of t [B, heads, d] at b * src_b + h * src_h bytes (a copy when d is strided).
kernels::SlotWrite slot_write(const at::Tensor& dst, const at::Tensor& t, const at::Tensor& slot,
                              std::vector<at::Tensor>& keep_alive) {
  const at::Tensor& src = keep_alive.emplace_back(t.stride(2) == 1 ? t : t.contiguous());
  const int64_t es = src.element_size();
  return {dst.data_ptr(), src.data_ptr(), src.stride(0) * es, src.stride(1) * es, dst.size(1),
          dst.size(2), slot.data_ptr<int64_t>()};
}

// k_cache/v_cache [B,Hkv,C,d] and pos [B,Hkv,C] take k/v [B,Hkv,d] and new_pos [B,Hkv] at the
// slot read on the device (and q_ring [B,Hq,W,d] takes q [B,Hq,d] at ring_slot): one kernel, no
// host read (a decode step's graph replays it).
void write_slot_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& new_pos,
                     const at::Tensor& slot, const std::optional<at::Tensor>& q_ring,
                     const std::optional<at::Tensor>& q,
                     const std::optional<at::Tensor>& ring_slot) {
  check_write_slot(k_cache, v_cache, pos, k, v, new_pos, slot, q_ring, q, ring_slot);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  std::vector<at::Tensor> keep_alive;
  kernels::WriteSlotParams p{};
  p.part[0] = slot_write(k_cache, k, slot, keep_alive);
  p.part[1] = slot_write(v_cache, v, slot, keep_alive);
  p.parts = 2;
  if (q_ring) p.part[p.parts++] = slot_write(*q_ring, *q, *ring_slot, keep_alive);
  p.B = k_cache.size(0);
  p.row_bytes = k_cache.size(3) * k_cache.element_size();
  p.pos = pos.data_ptr<int32_t>();
  p.new_pos = new_pos.data_ptr<int32_t>();
  p.pos_b = new_pos.stride(0);
  p.pos_h = new_pos.stride(1);
  // The widest word dividing every row's size, strides and address.
  std::vector<int64_t> sizes{p.row_bytes};
  for (int i = 0; i < p.parts; ++i) {
    sizes.insert(sizes.end(), {p.part[i].src_b, p.part[i].src_h,
                               reinterpret_cast<int64_t>(p.part[i].src),
                               reinterpret_cast<int64_t>(p.part[i].dst)});
  }
  GKV_CUDA_CHECK("write_slot_", with_vec(sizes, [&](auto* tag) {
                   using Vec = std::remove_pointer_t<decltype(tag)>;
                   return kernels::write_slot<Vec>(p, c10::cuda::getCurrentCUDAStream());
                 }));
}

// x [B,H,N,d], idx [B,H,K] int64 -> [B,H,K,d]; 16-byte row copies when the layout allows.
at::Tensor gather_tokens_cuda(const at::Tensor& x_in, const at::Tensor& idx_in) {
  constexpr const char* op = "gather_tokens";
  check_gather_tokens(x_in, idx_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const auto idx = idx_in.contiguous();
  auto out = at::empty({x.size(0), x.size(1), idx.size(2), x.size(3)}, x.options());
  auto flags_buf = at::zeros({1}, idx.options().dtype(at::kInt));
  GKV_CUDA_CHECK(op, gather_into(x, idx, out, flags_buf.data_ptr<int>(), stream));
  if (flags_buf.item<int>() & kernels::kIdxOutOfRange) {
    check_idx_range(op, idx, "idx", x.size(2), "N");
  }
  return out;
}

}  // namespace

void compact_sorted_cuda(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                         at::Tensor& score, const at::Tensor& idx) {
  check_compact(k_cache, v_cache, pos, score, idx);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  compact_in_place(k_cache, v_cache, pos, score, idx.contiguous(),
                   c10::cuda::getCurrentCUDAStream());
}

TORCH_LIBRARY_IMPL(gkv, CUDA, m) {
  m.impl("compact_", compact_cuda);
  m.impl("write_slot_", write_slot_cuda);
  m.impl("gather_tokens", gather_tokens_cuda);
}

}  // namespace gkv
