// What every recipe shares: the model and its optimizer, the data order, data parallelism,
// checkpoints, evaluation, metrics; and the training loop, which reads top to bottom:
//   resume -> for each step: [evaluate] -> the recipe's step -> log -> [checkpoint].
// A recipe (sft.cpp, distill.cpp, grpo.cpp) is a step function over this rank's slice of the
// global batch; it computes losses already divided by the global batch size, calls backward, and
// calls update() for each optimizer step it takes.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cache/policy.h"
#include "engine/generate.h"
#include "model/decoder.h"
#include "tasks/tasks.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/data.h"
#include "trainer/distributed.h"
#include "trainer/optim.h"

#include <torch/optim/adamw.h>

namespace gkv::trainer {

// What one step reports: metric name -> value (averaged over ranks), and tokens processed here.
struct StepStats {
  std::map<std::string, double> metrics;
  int64_t tokens = 0;
};

// 1 when the response is right, else 0.
using RewardFn = std::function<double(const Example& example, const std::vector<int64_t>& response)>;

class Session {
 public:
  // Loads the model, data, optimizer; joins the process group; resumes from out_dir when asked.
  // updates_per_step: optimizer updates each step takes (the schedule spans steps * this).
  Session(Config config, int64_t updates_per_step);

  const Config& config() const { return config_; }
  model::Decoder& model() { return *model_; }
  const DataParallel& dp() const { return dp_; }
  c10::Device device() const { return model_->device(); }
  const cache::Policy& policy() const { return policy_; }
  const TrainerState& state() const { return state_; }

  // This rank's examples of the next global batch (advances the data cursor).
  std::vector<Example> next_batch();
  // This rank's share of a global batch of `global` examples, in micro-batches.
  std::vector<std::vector<Example>> micro_batches(const std::vector<Example>& local) const;
  // Sums gradients over ranks, clips, sets the scheduled learning rate, steps, zeroes gradients.
  // Returns {"lr", "grad_norm"}.
  std::map<std::string, double> update();
  // Generation options of rollouts at this step (the seed depends on seed, step, rank and `salt`).
  engine::GenerateOptions rollout_options(int64_t salt) const;
  // Throws, naming `key`, unless every example has an answer and vocab.json was found.
  void require_rewards(const std::vector<Example>& examples, const std::string& key) const;
  const std::vector<Example>& data() const { return data_; }
  // Reward of a response through the task verifiers (gkv::tasks::reward on the decoded text);
  // require_rewards has checked the example.
  double reward(const Example& example, const std::vector<int64_t>& response) const;
  // A frozen copy of the initial (or resumed-from, before any step of this run) weights.
  std::shared_ptr<model::Decoder> frozen_copy(const std::string& path) const;

  // The loop: runs `step` until config.steps, with evaluation, logging and checkpoints.
  void train(const std::string& recipe, const std::function<StepStats(Session&)>& step);

 private:
  void evaluate();
  void log(const nlohmann::json& record) const;
  void checkpoint();
  // Throws when this rank's weights are not bitwise rank 0's (data parallelism broke).
  void check_ranks_agree() const;

  Config config_;
  DataParallel dp_;
  std::unique_ptr<model::Decoder> model_;
  std::vector<at::Tensor> params_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  cache::Policy policy_;
  std::vector<Example> data_;
  std::vector<Example> eval_data_;
  DataOrder order_;
  std::optional<tasks::Vocab> vocab_;
  int64_t updates_per_step_;
  TrainerState state_;
};

}  // namespace gkv::trainer
