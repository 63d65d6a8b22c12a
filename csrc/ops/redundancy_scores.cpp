// gkv::redundancy_scores and gkv::redundancy_scores_carry: CPU kernels (the oracle) and Meta
// kernels. Reference section 2.2.
#include "ops/redundancy_scores.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

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

void check_redundancy_scores_carry(const at::Tensor& k, const at::Tensor& pos,
                                   const at::Tensor& carried, double threshold) {
  constexpr const char* op = "redundancy_scores_carry";
  check_redundancy_scores(k, pos, threshold);
  checks::rank(op, carried, "carried", 3, "[B, Hkv, M]");
  checks::dtype(op, carried, "carried", at::kInt);
  checks::size(op, carried, "carried", 0, k.sym_size(0), "B of k");
  checks::size(op, carried, "carried", 1, k.sym_size(1), "Hkv of k");
  TORCH_CHECK(carried.sym_size(2) <= k.sym_size(2),
              "gkv::redundancy_scores_carry: carried.size(2) = M must be <= N = ", k.sym_size(2),
              ", got ", carried.sym_size(2));
  checks::same_device(op, {{&k, "k"}, {&carried, "carried"}});
}

namespace {

// One (b, h) at a time over its valid slots V only, so pads anywhere in the row drop out:
// c = khat khat^T with a zero diagonal, m*(j) = the last row i with c_ij > threshold, row sums
// minus the exempted entries, softmax with temperature |V|. -> (R [B,Hkv,N] fp32, m* [B,Hkv,N]
// int32 as slots, -1 for none and at empty slots).
std::tuple<at::Tensor, at::Tensor> scores_and_exemptions(const at::Tensor& k, const at::Tensor& pos,
                                                         double threshold) {
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), d = k.size(3);
  const auto kf = k.to(at::kFloat).reshape({B * H, N, d});
  const auto valid = pos.reshape({B * H, N}).ge(0);
  auto out = at::zeros({B, H, N}, k.options().dtype(at::kFloat));
  auto exempt = at::full({B, H, N}, -1, k.options().dtype(at::kInt));
  auto rows_out = out.view({B * H, N});
  auto rows_exempt = exempt.view({B * H, N});
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
      const auto exempt_rows = last.masked_select(has);
      auto raw = c.sum(1);  // [V]
      raw.index_add_(0, exempt_rows, -c.index({exempt_rows, cols}));
      rows_out[bh].index_put_({slots}, at::softmax(raw / static_cast<double>(n_valid), 0));
      rows_exempt[bh].index_put_({slots.masked_select(has)},
                                 slots.index_select(0, exempt_rows).to(at::kInt));
    }
  });
  return {out, exempt};
}

at::Tensor redundancy_scores_cpu(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  check_redundancy_scores(k, pos, threshold);
  return std::get<0>(scores_and_exemptions(k, pos, threshold));
}

// The oracle scans every row: carried only lets a device kernel skip work, and the result is
// the same whenever carried holds what an earlier call returned (see the schema).
std::tuple<at::Tensor, at::Tensor> redundancy_scores_carry_cpu(const at::Tensor& k,
                                                               const at::Tensor& pos,
                                                               const at::Tensor& carried,
                                                               double threshold) {
  check_redundancy_scores_carry(k, pos, carried, threshold);
  return scores_and_exemptions(k, pos, threshold);
}

at::Tensor redundancy_scores_meta(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  check_redundancy_scores(k, pos, threshold);
  return at::empty_symint(k.sym_sizes().slice(0, 3), k.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> redundancy_scores_carry_meta(const at::Tensor& k,
                                                                const at::Tensor& pos,
                                                                const at::Tensor& carried,
                                                                double threshold) {
  check_redundancy_scores_carry(k, pos, carried, threshold);
  const auto sizes = k.sym_sizes().slice(0, 3);
  return {at::empty_symint(sizes, k.options().dtype(at::kFloat)),
          at::empty_symint(sizes, k.options().dtype(at::kInt))};
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) {
  m.impl("redundancy_scores", redundancy_scores_cpu);
  m.impl("redundancy_scores_carry", redundancy_scores_carry_cpu);
}
TORCH_LIBRARY_IMPL(gkv, Meta, m) {
  m.impl("redundancy_scores", redundancy_scores_meta);
  m.impl("redundancy_scores_carry", redundancy_scores_carry_meta);
}

}  // namespace gkv
