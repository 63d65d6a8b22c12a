// gkv::window_scores: the argument check, the CPU kernel (the oracle) and the Meta kernel.
// The score feeds a discrete selection, so the op is not differentiable and has no Autograd kernel.
#include "ops/window_scores.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "ops/checks.h"
#include "ops/decode_attention.h"

namespace gkv {

namespace {
constexpr const char* kOp = "window_scores";
}  // namespace

void check_window_scores(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos) {
  checks::rank(kOp, q_win, "q_win", 4, "[B, Hq, W, d]");
  checks::rank(kOp, k, "k", 4, "[B, Hkv, N, d]");
  checks::rank(kOp, pos, "pos", 3, "[B, Hkv, N]");
  checks::floating(kOp, q_win, "q_win");
  checks::same_dtype(kOp, k, "k", q_win, "q_win");
  checks::dtype(kOp, pos, "pos", at::kInt);
  checks::same_device(kOp, {{&q_win, "q_win"}, {&k, "k"}, {&pos, "pos"}});
  const auto B = q_win.sym_size(0);
  const auto W = q_win.sym_size(2);
  const auto d = q_win.sym_size(3);
  const auto Hkv = k.sym_size(1);
  const auto N = k.sym_size(2);
  checks::size(kOp, k, "k", 0, B, "B of q_win");
  checks::size(kOp, k, "k", 3, d, "d of q_win");
  checks::gqa_heads(kOp, q_win, "q_win", k, "k");
  checks::size(kOp, pos, "pos", 0, B, "B of q_win");
  checks::size(kOp, pos, "pos", 1, Hkv, "Hkv of k");
  checks::size(kOp, pos, "pos", 2, N, "N of k");
  TORCH_CHECK(W >= 1 && N >= W, "gkv::", kOp, ": the window W = q_win.size(2) must be in [1, N = ",
              N, "] (N = k.size(2)), got ", W);
}

namespace {

// q_win [B,Hq,W,d], k [B,Hkv,N,d], pos [B,Hkv,N] int32 -> S [B,Hkv,N-W] fp32
at::Tensor window_scores_cpu(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos,
                             double scale) {
  check_window_scores(q_win, k, pos);
  const int64_t B = q_win.size(0), Hq = q_win.size(1), W = q_win.size(2), d = q_win.size(3);
  const int64_t Hkv = k.size(1), N = k.size(2);
  const int64_t G = Hq / Hkv;
  auto qg = q_win.to(at::kFloat).reshape({B, Hkv, G, W, d});              // [B,Hkv,G,W,d]
  auto kf = k.to(at::kFloat).unsqueeze(2);                                 // [B,Hkv,1,N,d]
  auto s = at::matmul(qg, kf.transpose(-1, -2)).mul_(scale);               // [B,Hkv,G,W,N]
  // Window query i is slot N-W+i: it sees slots j <= N-W+i that are not empty.
  auto j = at::arange(N, pos.options().dtype(at::kLong));                  // [N]
  auto i = at::arange(W, pos.options().dtype(at::kLong)).unsqueeze(1);     // [W,1]
  auto causal = j.le(i + (N - W));                                         // [W,N]
  auto visible = causal.logical_and(pos.ge(0).unsqueeze(2));               // [B,Hkv,W,N]
  s.masked_fill_(visible.logical_not().unsqueeze(2), -std::numeric_limits<float>::infinity());
  auto p = softmax_or_zero(s);                                             // [B,Hkv,G,W,N]
  auto pmax = std::get<0>(p.narrow(-1, 0, N - W).max(2));                  // [B,Hkv,W,N-W]
  return pmax.mean(2);                                                     // [B,Hkv,N-W]
}

at::Tensor window_scores_meta(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos,
                              double /*scale*/) {
  check_window_scores(q_win, k, pos);
  return q_win.new_empty_symint({k.sym_size(0), k.sym_size(1), k.sym_size(2) - q_win.sym_size(2)},
                                q_win.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("window_scores", &window_scores_cpu); }

TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("window_scores", &window_scores_meta); }

}  // namespace gkv
