// Argument checks shared by the CPU, Meta and CUDA kernels of every op. Each failure names the op,
// the argument and what was expected, e.g.
//   "gkv::window_scores: k must have shape [B, Hkv, N, d] (rank 4), got rank 3".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace gkv::checks {

// t.dim() == rank; `shape` is the documented shape, e.g. "[B, Hkv, N, d]".
inline void rank(const char* op, const at::Tensor& t, const char* name, int64_t expected_rank,
                 const char* shape) {
  TORCH_CHECK(t.dim() == expected_rank, "gkv::", op, ": ", name, " must have shape ", shape,
              " (rank ", expected_rank, "), got rank ", t.dim(), " with sizes ", t.sym_sizes());
}

// t.size(dim) == expected; `what` says where the expected size comes from, e.g. "B of q".
inline void size(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                 const c10::SymInt& expected, const char* what) {
  TORCH_CHECK(t.sym_size(dim) == expected, "gkv::", op, ": ", name, ".size(", dim, ") must be ",
              what, " = ", expected, ", got ", t.sym_size(dim), " (sizes ", t.sym_sizes(), ")");
}

// fp32, bf16 or fp16.
inline void floating(const char* op, const at::Tensor& t, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "gkv::", op, ": ",
              name, " must be float32, bfloat16 or float16, got ", dt);
}

inline void dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, "gkv::", op, ": ", name, " must be ", expected,
              ", got ", t.scalar_type());
}

// Same dtype as the reference argument (e.g. k and v like q).
inline void same_dtype(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "gkv::", op, ": ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

// GQA: q's heads (dim 1) are a positive multiple of k's heads (dim 1), so query head h*G+g can
// read KV head h.
inline void gqa_heads(const char* op, const at::Tensor& q, const char* q_name, const at::Tensor& k,
                      const char* k_name) {
  const auto hq = q.sym_size(1), hkv = k.sym_size(1);
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "gkv::", op, ": the query heads of ", q_name,
              " (Hq = ", hq, ") must be a positive multiple of the KV heads of ", k_name,
              " (Hkv = ", hkv, ")");
}

// All tensors on the device of the first one.
inline void same_device(const char* op,
                        std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  const auto& [first, first_name] = *ts.begin();
  for (const auto& [t, name] : ts) {
    TORCH_CHECK(t->device() == first->device(), "gkv::", op, ": ", name, " is on ", t->device(),
                " but ", first_name, " is on ", first->device(), "; all tensors must share one device");
  }
}

// Required for in-place ops, whose outputs cannot be silently copied.
inline void contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "gkv::", op, ": ", name,
              " must be contiguous (it is written in place)");
}

}  // namespace gkv::checks
