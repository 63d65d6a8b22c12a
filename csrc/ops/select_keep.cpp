// gkv::select_keep: CPU kernel (the oracle) and Meta kernel. Reference section 2.3 step 7.
#include "ops/select_keep.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "ops/checks.h"

namespace gkv {

void check_select_keep(const at::Tensor& score, int64_t keep, int64_t window) {
  constexpr const char* op = "select_keep";
  checks::rank(op, score, "score", 3, "[B, Hkv, M]");
  checks::dtype(op, score, "score", at::kFloat);
  TORCH_CHECK(keep >= 0 && score.sym_size(2) >= keep, "gkv::select_keep: keep must be in [0, M = ",
              score.sym_size(2), "], got ", keep);
  TORCH_CHECK(window >= 0, "gkv::select_keep: window must be >= 0, got ", window);
}

namespace {

// All heads at once: NaN becomes -inf, the row is reversed so that a stable descending sort puts
// the later of two equal scores first, and the first `keep` are mapped back and sorted ascending.
at::Tensor select_keep_cpu(const at::Tensor& score, int64_t keep, int64_t window) {
  check_select_keep(score, keep, window);
  const int64_t B = score.size(0), H = score.size(1), M = score.size(2);
  const auto rows = score.reshape({B * H, M});
  const auto clean =
      at::where(rows.isnan(), -std::numeric_limits<float>::infinity(), rows).flip({-1});
  const auto order = std::get<1>(clean.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
  const auto best = std::get<0>(((M - 1) - order.narrow(-1, 0, keep)).sort(-1));  // [BH, keep]
  const auto win = at::arange(M, M + window, best.options()).expand({B * H, window});
  return at::cat({best, win}, -1).view({B, H, keep + window});
}

at::Tensor select_keep_meta(const at::Tensor& score, int64_t keep, int64_t window) {
  check_select_keep(score, keep, window);
  return at::empty_symint({score.sym_size(0), score.sym_size(1), c10::SymInt(keep + window)},
                          score.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("select_keep", select_keep_cpu); }
TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("select_keep", select_keep_meta); }

}  // namespace gkv
