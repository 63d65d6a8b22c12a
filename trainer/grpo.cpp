// rl: GRPO (gkv-method.md 5.1, DESIGN.md "Trainer") with compressed-cache rollouts whose eviction
// log drives the training forward, so the trained policy is the one that sampled.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "trainer/recipes.h"

namespace gkv::trainer {

namespace {

// Log-probs are taken at the sampling temperature (the distribution that sampled); greedy: 1.
double logprob_temperature(const Config& c) { return c.temperature > 0 ? c.temperature : 1.0; }

std::vector<std::vector<Sequence>> chunks(const std::vector<Sequence>& rows, size_t size) {
  std::vector<std::vector<Sequence>> out;
  for (size_t i = 0; i < rows.size(); i += size) {
    out.emplace_back(rows.begin() + i, rows.begin() + std::min(rows.size(), i + size));
  }
  return out;
}

}  // namespace

std::vector<double> group_advantages(const std::vector<double>& rewards, int64_t group, double eps) {
  TORCH_CHECK(group >= 2 && rewards.size() % group == 0, "group_advantages: ", rewards.size(),
              " rewards are not groups of ", group);
  std::vector<double> out(rewards.size());
  for (size_t g = 0; g < rewards.size(); g += group) {
    const auto first = rewards.begin() + g, last = first + group;
    const double mean = std::accumulate(first, last, 0.0) / group;
    double var = 0;
    for (auto it = first; it != last; ++it) var += (*it - mean) * (*it - mean);
    const double std = std::sqrt(var / (group - 1));
    for (int64_t i = 0; i < group; ++i) out[g + i] = (rewards[g + i] - mean) / (std + eps);
  }
  return out;
}

Trajectory generate_rollouts(Session& s, const std::vector<Example>& prompts, const RewardFn& reward) {
  const Config& c = s.config();
  const auto& stops = s.model().config().eos_token_ids;
  Trajectory t;
  std::vector<const Example*> examples;
  at::NoGradGuard no_grad;
  int64_t salt = 0;
  // Named, not a temporary of the loop: `examples` points into it until the rewards are computed.
  const auto micro_batches = s.micro_batches(prompts);
  for (const auto& micro : micro_batches) {
    std::vector<std::vector<int64_t>> rows;
    for (const auto& e : micro) {
      for (int64_t g = 0; g < c.group_size; ++g) {
        rows.push_back(e.prompt);
        examples.push_back(&e);
      }
    }
    const auto gen = engine::generate(s.model(), rows, s.policy(), s.rollout_options(salt++));
    for (auto& seq : rollout_sequences(rows, gen)) t.sequences.push_back(std::move(seq));
  }
  for (size_t i = 0; i < t.sequences.size(); ++i) {
    const auto& seq = t.sequences[i];
    const std::vector<int64_t> response(seq.tokens.begin() + seq.prompt_length, seq.tokens.end());
    t.rewards.push_back(reward(*examples[i], response));
    t.lengths.push_back(static_cast<int64_t>(response.size()));
    const bool stopped = std::find(stops.begin(), stops.end(), response.back()) != stops.end();
    t.truncated.push_back(!stopped && t.lengths.back() == c.max_new_tokens);
  }
  t.advantages = group_advantages(t.rewards, c.group_size, c.adv_eps);
  if (c.clip_overlong) {
    for (size_t i = 0; i < t.advantages.size(); ++i) {
      if (t.truncated[i]) t.advantages[i] = std::max(t.advantages[i], 0.0);
    }
  }
  return t;
}

StepStats grpo_step(Session& s, const Trajectory& trajectory, const model::Decoder* reference) {
  const Config& c = s.config();
  const double temperature = logprob_temperature(c);
  const double global_rows = static_cast<double>(c.batch_size * c.group_size);
  const double local_rows = global_rows / s.dp().world();
  const auto micro = chunks(trajectory.sequences, static_cast<size_t>(c.micro_batch_size * c.group_size));
  std::vector<at::Tensor> old_logp(micro.size()), ref_logp(micro.size());
  StepStats stats;
  double loss0 = 0, entropy = 0, kl_sum = 0, clipped = 0;
  size_t row0 = 0;
  for (int64_t epoch = 0; epoch < c.ppo_epochs; ++epoch) {
    row0 = 0;
    for (size_t m = 0; m < micro.size(); ++m) {
      const auto batch = make_batch(micro[m], s.model().config(), s.device());
      const int64_t B = batch.tokens.size(0);
      const auto adv = at::tensor(std::vector<double>(trajectory.advantages.begin() + row0,
                                                      trajectory.advantages.begin() + row0 + B))
                           .to(at::kFloat).to(s.device()).unsqueeze(1);  // [B,1]
      row0 += B;
      if (epoch == 0 && reference != nullptr && c.kl_coef > 0) {
        at::NoGradGuard no_grad;
        AutocastGuard autocast(c.bf16, s.device());
        ref_logp[m] = token_logprobs(forward_logits(*reference, batch), batch.tokens, temperature);
      }
      AutocastGuard autocast(c.bf16, s.device());
      const auto logits = forward_logits(s.model(), batch);
      const auto logp = token_logprobs(logits, batch.tokens, temperature);  // [B,T-1]
      // On-policy for the first epoch: the ratio is 1 and its gradient is grad log pi.
      if (epoch == 0) old_logp[m] = logp.detach();
      const auto ratio = (logp - old_logp[m]).exp();
      const auto pg = -at::min(ratio * adv, ratio.clamp(1 - c.clip_eps, 1 + c.clip_eps) * adv);
      auto per_token = pg;
      if (ref_logp[m].defined()) {
        const auto d = ref_logp[m] - logp;
        const auto kl = d.exp() - d - 1;  // k3 estimator of KL(pi || ref), >= 0
        per_token = per_token + c.kl_coef * kl;
        if (epoch == 0) kl_sum += row_mean(kl.detach(), batch.response).sum().item<double>();
      }
      const auto loss = row_mean(per_token, batch.response);  // [B]
      (loss.sum() / global_rows).backward();
      {
        at::NoGradGuard no_grad;
        const auto outside = (ratio.detach() - 1).abs().gt(c.clip_eps).to(at::kFloat);
        clipped += row_mean(outside, batch.response).sum().item<double>();
        if (epoch == 0) {
          loss0 += loss.detach().sum().item<double>();
          const auto lp = (logits.detach().to(at::kFloat).narrow(1, 0, batch.tokens.size(1) - 1) /
                           temperature).log_softmax(-1);
          entropy += row_mean(-(lp.exp() * lp).sum(-1), batch.response).sum().item<double>();
          stats.tokens += batch.real_tokens;
        }
      }
    }
    stats.metrics = s.update();
  }
  const auto mean = [&](const auto& v) {
    return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  };
  stats.metrics["loss"] = loss0 / local_rows;
  stats.metrics["reward"] = mean(trajectory.rewards);
  stats.metrics["length"] = mean(trajectory.lengths);
  stats.metrics["truncated"] = mean(trajectory.truncated);
  stats.metrics["entropy"] = entropy / local_rows;
  stats.metrics["clip_frac"] = clipped / (local_rows * c.ppo_epochs);
  if (reference != nullptr && c.kl_coef > 0) stats.metrics["kl"] = kl_sum / local_rows;
  return stats;
}

int run_grpo(const Config& c) {
  Session s(c, /*updates_per_step=*/c.ppo_epochs);
  s.require_rewards(s.data(), "data");
  std::shared_ptr<model::Decoder> reference;
  if (c.kl_coef > 0) reference = s.frozen_copy(c.model);
  const RewardFn reward = [&](const Example& e, const std::vector<int64_t>& r) { return s.reward(e, r); };
  s.train("rl", [&](Session& session) {
    // Both phases end in host reads of their results, so wall time is device time here.
    const auto start = std::chrono::steady_clock::now();
    const auto trajectory = generate_rollouts(session, session.next_batch(), reward);
    const auto rolled = std::chrono::steady_clock::now();
    auto stats = grpo_step(session, trajectory, reference.get());
    const std::chrono::duration<double> rollout_s = rolled - start;
    const std::chrono::duration<double> train_s = std::chrono::steady_clock::now() - rolled;
    const double generated = std::accumulate(trajectory.lengths.begin(), trajectory.lengths.end(), 0.0);
    stats.metrics["rollout_tokens_per_s"] = generated / rollout_s.count();
    stats.metrics["train_tokens_per_s"] = static_cast<double>(stats.tokens) / train_s.count();
    return stats;
  });
  return 0;
}

}  // namespace gkv::trainer
