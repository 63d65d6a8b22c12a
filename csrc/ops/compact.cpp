// gkv::compact_, gkv::write_slot_ and gkv::gather_tokens: CPU kernels (the oracle), Meta kernels,
// and the Autograd kernel of gather_tokens (backward = scatter-add, through ATen ops so it runs on
// every device).
#include "ops/compact.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"
#include "ops/checks.h"

namespace gkv {

void check_compact(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                   const at::Tensor& score, const at::Tensor& idx) {
  constexpr const char* op = "compact_";
  checks::rank(op, k_cache, "k_cache", 4, "[B, Hkv, C, d]");
  checks::floating(op, k_cache, "k_cache");
  checks::rank(op, v_cache, "v_cache", 4, "[B, Hkv, C, d]");
  checks::same_dtype(op, v_cache, "v_cache", k_cache, "k_cache");
  for (int64_t dim = 0; dim < 4; ++dim) {
    checks::size(op, v_cache, "v_cache", dim, k_cache.sym_size(dim), "the same dim of k_cache");
  }
  checks::rank(op, pos, "pos", 3, "[B, Hkv, C]");
  checks::dtype(op, pos, "pos", at::kInt);
  checks::rank(op, score, "score", 3, "[B, Hkv, C]");
  checks::dtype(op, score, "score", at::kFloat);
  checks::rank(op, idx, "idx", 3, "[B, Hkv, K]");
  checks::dtype(op, idx, "idx", at::kLong);
  const char* what[] = {"B of k_cache", "Hkv of k_cache", "C of k_cache"};
  for (int64_t dim = 0; dim < 3; ++dim) {
    checks::size(op, pos, "pos", dim, k_cache.sym_size(dim), what[dim]);
    checks::size(op, score, "score", dim, k_cache.sym_size(dim), what[dim]);
    if (dim < 2) checks::size(op, idx, "idx", dim, k_cache.sym_size(dim), what[dim]);
  }
  TORCH_CHECK(idx.sym_size(2) <= k_cache.sym_size(2),
              "gkv::compact_: idx.size(2) = K must be <= C = ", k_cache.sym_size(2), ", got ",
              idx.sym_size(2));
  checks::same_device(op, {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&pos, "pos"},
                           {&score, "score"}, {&idx, "idx"}});
  checks::contiguous(op, k_cache, "k_cache");
  checks::contiguous(op, v_cache, "v_cache");
  checks::contiguous(op, pos, "pos");
  checks::contiguous(op, score, "score");
}

void check_write_slot(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& new_pos,
                      const at::Tensor& slot, const std::optional<at::Tensor>& q_ring,
                      const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& ring_slot) {
  constexpr const char* op = "write_slot_";
  checks::rank(op, k_cache, "k_cache", 4, "[B, Hkv, C, d]");
  checks::floating(op, k_cache, "k_cache");
  checks::rank(op, v_cache, "v_cache", 4, "[B, Hkv, C, d]");
  checks::same_dtype(op, v_cache, "v_cache", k_cache, "k_cache");
  checks::rank(op, pos, "pos", 3, "[B, Hkv, C]");
  checks::dtype(op, pos, "pos", at::kInt);
  const char* what[] = {"B of k_cache", "Hkv of k_cache", "C of k_cache", "d of k_cache"};
  for (int64_t dim = 0; dim < 4; ++dim) {
    checks::size(op, v_cache, "v_cache", dim, k_cache.sym_size(dim), what[dim]);
    if (dim < 3) checks::size(op, pos, "pos", dim, k_cache.sym_size(dim), what[dim]);
  }
  // A token's rows: [B, heads, d] of the cache dtype.
  const auto check_rows = [&](const at::Tensor& t, const char* name, const char* shape,
                              const c10::SymInt& heads, const char* heads_what) {
    checks::rank(op, t, name, 3, shape);
    checks::same_dtype(op, t, name, k_cache, "k_cache");
    checks::size(op, t, name, 0, k_cache.sym_size(0), what[0]);
    checks::size(op, t, name, 1, heads, heads_what);
    checks::size(op, t, name, 2, k_cache.sym_size(3), what[3]);
  };
  check_rows(k, "k", "[B, Hkv, d]", k_cache.sym_size(1), what[1]);
  check_rows(v, "v", "[B, Hkv, d]", k_cache.sym_size(1), what[1]);
  checks::rank(op, new_pos, "new_pos", 2, "[B, Hkv]");
  checks::dtype(op, new_pos, "new_pos", at::kInt);
  checks::size(op, new_pos, "new_pos", 0, k_cache.sym_size(0), what[0]);
  checks::size(op, new_pos, "new_pos", 1, k_cache.sym_size(1), what[1]);
  const auto check_slot = [&](const at::Tensor& t, const char* name) {
    checks::dtype(op, t, name, at::kLong);
    TORCH_CHECK(t.sym_numel() == 1, "gkv::", op, ": ", name, " must hold one element, got sizes ",
                t.sym_sizes());
  };
  check_slot(slot, "slot");
  checks::same_device(op, {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&pos, "pos"}, {&k, "k"},
                           {&v, "v"}, {&new_pos, "new_pos"}, {&slot, "slot"}});
  checks::contiguous(op, k_cache, "k_cache");
  checks::contiguous(op, v_cache, "v_cache");
  checks::contiguous(op, pos, "pos");
  TORCH_CHECK(q_ring.has_value() == q.has_value() && q.has_value() == ring_slot.has_value(),
              "gkv::", op, ": q_ring, q and ring_slot go together (got ", q_ring.has_value(), ", ",
              q.has_value(), ", ", ring_slot.has_value(), ")");
  if (!q_ring) return;
  checks::rank(op, *q_ring, "q_ring", 4, "[B, Hq, W, d]");
  checks::same_dtype(op, *q_ring, "q_ring", k_cache, "k_cache");
  checks::size(op, *q_ring, "q_ring", 0, k_cache.sym_size(0), what[0]);
  checks::size(op, *q_ring, "q_ring", 3, k_cache.sym_size(3), what[3]);
  check_rows(*q, "q", "[B, Hq, d]", q_ring->sym_size(1), "Hq of q_ring");
  check_slot(*ring_slot, "ring_slot");
  checks::same_device(op, {{&k_cache, "k_cache"}, {&*q_ring, "q_ring"}, {&*q, "q"},
                           {&*ring_slot, "ring_slot"}});
  checks::contiguous(op, *q_ring, "q_ring");
}

void check_gather_tokens(const at::Tensor& x, const at::Tensor& idx) {
  constexpr const char* op = "gather_tokens";
  checks::rank(op, x, "x", 4, "[B, H, N, d]");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gkv::gather_tokens: x must be a floating "
              "tensor (float64, float32, bfloat16 or float16), got ", x.scalar_type());
  checks::rank(op, idx, "idx", 3, "[B, H, K]");
  checks::dtype(op, idx, "idx", at::kLong);
  checks::size(op, idx, "idx", 0, x.sym_size(0), "B of x");
  checks::size(op, idx, "idx", 1, x.sym_size(1), "H of x");
  checks::same_device(op, {{&x, "x"}, {&idx, "idx"}});
}

void check_idx_range(const char* op, const at::Tensor& idx, const char* idx_name, int64_t n,
                     const char* n_name) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, "gkv::", op, ": ", idx_name, " must be in [0, ", n_name, " = ", n,
              "), got values in [", lo, ", ", hi, "]");
}

namespace {

// Gathers into fresh tensors first, then copies back, so any idx (not only ascending) is right.
void compact_cpu(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, at::Tensor& score,
                 const at::Tensor& idx) {
  check_compact(k_cache, v_cache, pos, score, idx);
  check_idx_range("compact_", idx, "idx", k_cache.size(2), "C");
  const int64_t K = idx.size(2);
  const auto rows = idx.unsqueeze(-1).expand({idx.size(0), idx.size(1), K, k_cache.size(3)});
  k_cache.narrow(2, 0, K).copy_(k_cache.gather(2, rows));
  v_cache.narrow(2, 0, K).copy_(v_cache.gather(2, rows));
  pos.narrow(2, 0, K).copy_(pos.gather(2, idx));
  score.narrow(2, 0, K).copy_(score.gather(2, idx));
}

void compact_meta(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, at::Tensor& score,
                  const at::Tensor& idx) {
  check_compact(k_cache, v_cache, pos, score, idx);
}

void write_slot_cpu(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& new_pos, const at::Tensor& slot,
                    const std::optional<at::Tensor>& q_ring, const std::optional<at::Tensor>& q,
                    const std::optional<at::Tensor>& ring_slot) {
  check_write_slot(k_cache, v_cache, pos, k, v, new_pos, slot, q_ring, q, ring_slot);
  const auto at_slot = slot.reshape({1});
  check_idx_range("write_slot_", at_slot, "slot", k_cache.size(2), "C");
  if (q_ring) {
    check_idx_range("write_slot_", ring_slot->reshape({1}), "ring_slot", q_ring->size(2), "W");
  }
  k_cache.index_copy_(2, at_slot, k.unsqueeze(2));
  v_cache.index_copy_(2, at_slot, v.unsqueeze(2));
  pos.index_copy_(2, at_slot, new_pos.unsqueeze(2));
  if (q_ring) q_ring->index_copy_(2, ring_slot->reshape({1}), q->unsqueeze(2));
}

void write_slot_meta(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& new_pos, const at::Tensor& slot,
                     const std::optional<at::Tensor>& q_ring, const std::optional<at::Tensor>& q,
                     const std::optional<at::Tensor>& ring_slot) {
  check_write_slot(k_cache, v_cache, pos, k, v, new_pos, slot, q_ring, q, ring_slot);
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& idx) {
  check_gather_tokens(x, idx);
  check_idx_range("gather_tokens", idx, "idx", x.size(2), "N");
  return x.gather(2, idx.unsqueeze(-1).expand({idx.size(0), idx.size(1), idx.size(2), x.size(3)}));
}

at::Tensor gather_tokens_meta(const at::Tensor& x, const at::Tensor& idx) {
  check_gather_tokens(x, idx);
  return x.new_empty_symint({x.sym_size(0), x.sym_size(1), idx.sym_size(2), x.sym_size(3)});
}

// out = x[:, :, idx]; dx = zeros like x with the rows of dout added at idx (duplicates add up).
class GatherTokens : public torch::autograd::Function<GatherTokens> {
 public:
  // x [B,H,N,d], idx [B,H,K] int64 -> [B,H,K,d]
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& idx) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({idx});
    ctx->saved_data["n"] = x.sym_size(2);
    return gkv::gather_tokens(x, idx);
  }

  // grads[0] [B,H,K,d] -> {dx [B,H,N,d], none for idx}
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto& dout = grads[0];
    if (!dout.defined()) return {at::Tensor(), at::Tensor()};
    const auto idx = ctx->get_saved_variables()[0];
    auto sizes = dout.sym_sizes().vec();
    sizes[2] = ctx->saved_data["n"].toSymInt();
    auto dx = at::zeros_symint(sizes, dout.options());
    dx.scatter_add_(2, idx.unsqueeze(-1).expand_symint(dout.sym_sizes()), dout);
    return {dx, at::Tensor()};
  }
};

at::Tensor gather_tokens_autograd(const at::Tensor& x, const at::Tensor& idx) {
  return GatherTokens::apply(x, idx);
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) {
  m.impl("compact_", compact_cpu);
  m.impl("write_slot_", write_slot_cpu);
  m.impl("gather_tokens", gather_tokens_cpu);
}
TORCH_LIBRARY_IMPL(gkv, Meta, m) {
  m.impl("compact_", compact_meta);
  m.impl("write_slot_", write_slot_meta);
  m.impl("gather_tokens", gather_tokens_meta);
}
TORCH_LIBRARY_IMPL(gkv, Autograd, m) { m.impl("gather_tokens", gather_tokens_autograd); }

}  // namespace gkv
