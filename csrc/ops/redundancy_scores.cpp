// gkv::redundancy_scores: CPU kernel (the oracle) and Meta kernel. Reference section 2.2.
#include "ops/redundancy_scores.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "ops/checks.h"

namespace gkv {

void check_redundancy_scores(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  constexpr const char* op = "redundancy_scores";
  checks::rank(op, k, "k", 4, "[B, Hkv, N, d]");
  checks::floating(op, k, "k");
  checks::rank(op, pos, "pos", 3, "[B, Hkv, N]");
  checks::dtype(op, pos, "pos", at::kInt);
  checks::size(op, pos, "pos", 0, k.sym_size(0), "B of k");
  checks::size(op, pos, "pos", 1, k.sym_size(1), "Hkv of k");
  checks::size(op, pos, "pos", 2, k.sym_size(2), "N of k");
  checks::same_device(op, {{&k, "k"}, {&pos, "pos"}});
  TORCH_CHECK(!std::isnan(threshold), "gkv::redundancy_scores: threshold must not be NaN");
}

namespace {

// One (b, h) at a time over its valid slots V only, so pads anywhere in the row drop out:
// c = khat khat^T with a zero diagonal, m*(j) = the last row i with c_ij > threshold, row sums
// minus the exempted entries, softmax with temperature |V|.
at::Tensor redundancy_scores_cpu(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  check_redundancy_scores(k, pos, threshold);
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), d = k.size(3);
  const auto kf = k.to(at::kFloat).reshape({B * H, N, d});
  const auto valid = pos.reshape({B * H, N}).ge(0);
  auto out = at::zeros({B, H, N}, k.options().dtype(at::kFloat));
  auto rows_out = out.view({B * H, N});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const auto slots = valid[bh].nonzero().squeeze(1);  // [V] ascending slot indices
      const int64_t n_valid = slots.numel();
      if (n_valid == 0) continue;
      const auto kv = kf[bh].index_select(0, slots);  // [V, d]
      const auto khat = kv / (kv.norm(2, -1, /*keepdim=*/true) + 1e-6);
      auto c = at::mm(khat, khat.t());  // [V, V]
      c.fill_diagonal_(0);
      // Rows are in slot order, so the largest qualifying row position is the most recent key.
      const auto row = at::arange(n_valid, kv.options().dtype(at::kLong)).unsqueeze(1);
      const auto last = std::get<0>(at::where(c > threshold, row, -1).max(0));  // [V]
      const auto has = last.ge(0);
      const auto cols = at::arange(n_valid, last.options()).masked_select(has);
      const auto exempt = last.masked_select(has);
      auto raw = c.sum(1);  // [V]
      raw.index_add_(0, exempt, -c.index({exempt, cols}));
      rows_out[bh].index_put_({slots}, at::softmax(raw / static_cast<double>(n_valid), 0));
    }
  });
  return out;
}

at::Tensor redundancy_scores_meta(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  check_redundancy_scores(k, pos, threshold);
  return at::empty_symint(k.sym_sizes().slice(0, 3), k.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("redundancy_scores", redundancy_scores_cpu); }
TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("redundancy_scores", redundancy_scores_meta); }

}  // namespace gkv
