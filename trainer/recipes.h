// The three recipes. Each is a step function over a Session (session.h) plus a run_* entry that
// builds the session and runs the loop. Losses weight sequences equally: a step's loss is the mean
// over the global batch of each sequence's mean over its response tokens, so gradient
// accumulation and data parallelism give the same update as one big batch.
#pragma once

#include <memory>
#include <vector>

#include "model/decoder.h"
#include "trainer/config.h"
#include "trainer/sequences.h"
#include "trainer/session.h"

namespace gkv::trainer {

// Prompt + response rows of dataset examples (cut to max_seq_len), with the death log of
// teacher-forcing the responses through `model` under `policy`.
std::vector<Sequence> example_sequences(const model::Decoder& model, const std::vector<Example>& micro,
                                        const cache::Policy& policy, int64_t max_seq_len);

// sft: cross-entropy on the examples' responses (under teacher-forced compression when
// sft_compressed).
StepStats sft_step(Session& s);
int run_sft(const Config& c);

// distill: forward KL(teacher || student) at distill_temperature (times T^2) on response tokens;
// the teacher attends to the full cache, the student under the policy's teacher-forced
// compression.
StepStats distill_step(Session& s, const model::Decoder& teacher);
int run_distill(const Config& c);

// GRPO (DESIGN.md "Trainer"): the rollouts of one step and what the loss needs from them.
struct Trajectory {
  std::vector<Sequence> sequences;  // prompt x G rows, grouped by prompt
  std::vector<double> rewards;      // per row
  std::vector<double> advantages;   // per row, after the overlong clamp
  std::vector<int64_t> lengths;     // response tokens per row
  std::vector<bool> truncated;      // hit max_new_tokens without a stop token
};

// Samples group_size compressed-cache rollouts per prompt and scores them.
Trajectory generate_rollouts(Session& s, const std::vector<Example>& prompts, const RewardFn& reward);
// (r - mean) / (std + eps) per group of `group` consecutive rows (std unbiased).
std::vector<double> group_advantages(const std::vector<double>& rewards, int64_t group, double eps);
// ppo_epochs optimizer updates on one trajectory; `reference` (may be null) for the KL term.
StepStats grpo_step(Session& s, const Trajectory& trajectory, const model::Decoder* reference);
int run_grpo(const Config& c);

}  // namespace gkv::trainer
