#include "cache/policy.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "ops.h"

namespace gkv::cache {

void Policy::validate() const {
  TORCH_CHECK(divide_length >= 1, "Policy '", name, "': divide_length must be >= 1, got ",
              divide_length);
  TORCH_CHECK(window >= 1, "Policy '", name, "': window must be >= 1, got ", window);
  TORCH_CHECK(sinks >= 0, "Policy '", name, "': sinks must be >= 0, got ", sinks);
  if (budget) {
    TORCH_CHECK(*budget >= window, "Policy '", name, "': budget (", *budget,
                ") must be >= window (", window, ")");
    TORCH_CHECK(*budget - window >= sinks, "Policy '", name, "': budget - window (",
                *budget - window, ") must leave room for the ", sinks, " sinks");
  }
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0, "Policy '", name,
              "': alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK(history != History::mean || alpha <= 1, "Policy '", name,
              "': alpha must be <= 1 for the mean history, got ", alpha);
  TORCH_CHECK(pool_kernel == 0 || (pool_kernel > 0 && pool_kernel % 2 == 1), "Policy '", name,
              "': pool_kernel must be 0 or a positive odd size, got ", pool_kernel);
  TORCH_CHECK(lambda >= 0 && lambda <= 1, "Policy '", name, "': lambda must be in [0, 1], got ",
              lambda);
  TORCH_CHECK(!std::isnan(threshold), "Policy '", name, "': threshold must not be NaN");
  // The accumulated attention already is the key's whole history.
  TORCH_CHECK(observation != Observation::accumulate || history == History::none, "Policy '", name,
              "': observation 'accumulate' carries its own history; history must be 'none'");
}

int64_t Policy::observed_queries() const {
  if (!budget) return 0;
  switch (observation) {
    case Observation::window: return window;
    case Observation::last: return 1;
    default: return 0;
  }
}

Policy Policy::full_kv() {
  Policy p;
  p.name = "fullkv";
  p.observation = Observation::none;
  return p;
}

namespace {

// A validated policy with the given name, budget and window; `parts` sets its score parts.
template <typename Parts>
Policy budgeted(const char* name, int64_t budget, int64_t window, Parts parts) {
  Policy p;
  p.name = name;
  p.budget = budget;
  p.window = window;
  parts(p);
  p.validate();
  return p;
}

}  // namespace

Policy Policy::streaming_llm(int64_t budget, int64_t sinks) {
  // The recent tokens are the window; the candidates feed the sinks.
  TORCH_CHECK(budget > sinks, "Policy 'streamingllm': budget (", budget, ") must be > sinks (",
              sinks, "): the most recent budget - sinks tokens are kept beside the sinks");
  return budgeted("streamingllm", budget, budget - sinks, [&](Policy& p) {
    p.observation = Observation::none;
    p.sinks = sinks;
  });
}

Policy Policy::h2o_sampled(int64_t budget, double alpha) {
  return budgeted("h2o", budget, 1, [&](Policy& p) {
    p.normalize = true;
    p.history = History::sum;
    p.alpha = alpha;
  });
}

Policy Policy::h2o_accumulate(int64_t budget, int64_t window) {
  return budgeted("h2o-accumulate", budget, window,
                  [](Policy& p) { p.observation = Observation::accumulate; });
}

Policy Policy::snapkv(int64_t budget, int64_t window) {
  return budgeted("snapkv", budget, window, [](Policy& p) { p.pool_kernel = kPoolKernel; });
}

Policy Policy::rkv(int64_t budget, int64_t window, double lambda) {
  return budgeted("rkv", budget, window, [&](Policy& p) {
    p.pool_kernel = kPoolKernel;
    p.lambda = lambda;
  });
}

Policy Policy::tova(int64_t budget, int64_t window) {
  return budgeted("tova", budget, window, [](Policy& p) { p.observation = Observation::last; });
}

Policy Policy::gkv(int64_t budget, int64_t window, double alpha, double lambda, History history) {
  return budgeted("gkv", budget, window, [&](Policy& p) {
    p.normalize = true;
    p.history = history;
    p.alpha = alpha;
    p.lambda = lambda;
  });
}

namespace {

// x [B,Hkv,M] / its max over M, per head; rows whose max is not positive are left as they are.
at::Tensor normalized(const at::Tensor& x) {
  auto m = x.amax(-1, /*keepdim=*/true);
  return at::where(m > 0, x / m, x);
}

}  // namespace

Selection select(const Policy& policy, const at::Tensor& k, const at::Tensor& pos,
                 const at::Tensor& q_win, const at::Tensor& acc, const at::Tensor& history,
                 const at::Tensor& carried) {
  TORCH_CHECK(policy.budget, "select: policy '", policy.name, "' keeps every token");
  const int64_t N = k.size(2), w = policy.window, C = N - w, keep = *policy.budget - w;
  TORCH_CHECK(N > *policy.budget, "select: ", N, " slots do not exceed the budget ",
              *policy.budget);
  const double scale = 1.0 / std::sqrt(static_cast<double>(k.size(3)));
  const auto cand_pos = pos.narrow(2, 0, C);  // [B,Hkv,C]

  at::Tensor S;  // [B,Hkv,C] fp32
  switch (policy.observation) {
    case Observation::window:
      TORCH_CHECK(q_win.size(2) == w, "select: the window observation needs ", w,
                  " queries, got ", q_win.size(2));
      S = gkv::window_scores(q_win, k, pos, scale);
      break;
    case Observation::last:
      S = gkv::window_scores(q_win.narrow(2, q_win.size(2) - 1, 1), k, pos, scale).narrow(2, 0, C);
      break;
    case Observation::accumulate:
      S = acc.narrow(2, 0, C);
      break;
    case Observation::none:
      S = cand_pos.to(at::kFloat);
      break;
  }
  if (policy.normalize) S = normalized(S);

  at::Tensor F = S.clone();  // [B,Hkv,C]
  const int64_t H = history.defined() ? history.size(2) : 0;
  if (policy.history != History::none && H > 0) {
    TORCH_CHECK(H <= C, "select: ", H, " history slots for ", C, " candidates");
    const auto s = S.narrow(2, 0, H);
    const double a = policy.alpha;
    auto f = F.narrow(2, 0, H);
    switch (policy.history) {
      case History::max: f.copy_(at::maximum(history * a, s)); break;
      case History::mean: f.copy_(history * a + s * (1 - a)); break;
      case History::sum: f.copy_(history * a + s); break;
      case History::none: break;
    }
  }

  at::Tensor score = F;
  if (policy.pool_kernel > 0) {
    const int64_t B = F.size(0), Hkv = F.size(1), kernel = policy.pool_kernel;
    score = at::max_pool1d(F.reshape({B * Hkv, 1, C}), {kernel}, {1}, {kernel / 2})
                .view({B, Hkv, C});
  }
  at::Tensor exempt;
  if (policy.lambda < 1) {
    const auto carry = carried.defined() ? carried : at::empty({k.size(0), k.size(1), 0},
                                                               pos.options());
    at::Tensor R;
    std::tie(R, exempt) = gkv::redundancy_scores_carry(k, pos, carry, policy.threshold);
    R = R.narrow(2, 0, C);
    if (policy.normalize) R = normalized(R);
    score = score * policy.lambda - R * (1 - policy.lambda);
  }
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (policy.sinks > 0) {
    score = at::where(cand_pos.ge(0).logical_and(cand_pos.lt(policy.sinks)), kInf, score);
  }
  score = at::where(cand_pos.lt(0), -kInf, score).contiguous();
  return {gkv::select_keep(score, keep, w), F, exempt};
}

at::Tensor carry_exemptions(const Selection& sel) {
  const int64_t B = sel.exempt.size(0), H = sel.exempt.size(1), N = sel.exempt.size(2);
  const int64_t K = sel.idx.size(2);
  const auto opts = sel.exempt.options();
  // Old slot -> its slot after compaction, -2 for an evicted one.
  const auto renumber = at::full({B, H, N}, -2, opts).scatter_(
      2, sel.idx, at::arange(K, opts).view({1, 1, K}).expand({B, H, K}));
  const auto kept = sel.exempt.gather(2, sel.idx);
  return at::where(kept.ge(0), renumber.gather(2, kept.clamp_min(0).to(at::kLong)), kept);
}

std::string to_string(Observation o) {
  switch (o) {
    case Observation::window: return "window";
    case Observation::last: return "last";
    case Observation::accumulate: return "accumulate";
    case Observation::none: return "none";
  }
  return "?";
}

std::string to_string(History h) {
  switch (h) {
    case History::none: return "none";
    case History::max: return "max";
    case History::mean: return "mean";
    case History::sum: return "sum";
  }
  return "?";
}

Observation observation_from_string(const std::string& s) {
  for (auto o : {Observation::window, Observation::last, Observation::accumulate, Observation::none}) {
    if (to_string(o) == s) return o;
  }
  TORCH_CHECK(false, "observation must be one of window, last, accumulate, none; got '", s, "'");
}

History history_from_string(const std::string& s) {
  for (auto h : {History::none, History::max, History::mean, History::sum}) {
    if (to_string(h) == s) return h;
  }
  TORCH_CHECK(false, "history must be one of none, max, mean, sum; got '", s, "'");
}

}  // namespace gkv::cache
