#include "trainer/session.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <ATen/core/grad_mode.h>
#include <torch/optim/adamw.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>

#include "engine/generate.h"
#include "trainer/sequences.h"

namespace gkv::trainer {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::unique_ptr<model::Decoder> load_on_device(const std::string& path, const Config& c, int local_rank) {
  auto m = std::make_unique<model::Decoder>(model::load_decoder(path));
  c10::Device device = c10::kCPU;
  if (c.device == "cuda") device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
  m->to(device, at::kFloat);  // fp32 master weights (optim.h)
  return m;
}

std::string hms(double seconds) {
  const auto s = static_cast<long long>(seconds);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%02lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  return buf;
}

// metrics.jsonl keeps only the records up to `step` (a resumed run rewrites what came after).
void truncate_metrics(const fs::path& path, int64_t step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  std::ofstream(path, std::ios::trunc) << kept;
}

}  // namespace

Session::Session(Config config, int64_t updates_per_step)
    : config_(std::move(config)),
      dp_(DataParallel::from_env(config_.dist_backend, config_.device)),
      policy_(make_policy(config_)),
      order_(1, 0),
      updates_per_step_(updates_per_step) {
  const Config& c = config_;
  if (c.batch_size % (static_cast<int64_t>(dp_.world()) * c.micro_batch_size) != 0) {
    throw std::invalid_argument("config key 'batch_size': " + std::to_string(c.batch_size) +
                                " must be a multiple of WORLD_SIZE * micro_batch_size = " +
                                std::to_string(dp_.world() * c.micro_batch_size));
  }
  model_ = load_on_device(c.model, c, dp_.local_rank());
  params_ = trainable_parameters(*model_);
  optimizer_ = make_optimizer(params_, c);
  data_ = load_examples(c.data, model_->config().vocab_size);
  order_ = DataOrder(static_cast<int64_t>(data_.size()), c.seed);
  if (!c.eval_data.empty()) {
    eval_data_ = load_examples(c.eval_data, model_->config().vocab_size);
    if (c.eval_samples > 0 && static_cast<int64_t>(eval_data_.size()) > c.eval_samples) {
      eval_data_.resize(c.eval_samples);
    }
  }
  const fs::path vocab = c.vocab.empty() ? fs::path(c.data).parent_path() / "vocab.json" : fs::path(c.vocab);
  if (fs::exists(vocab)) {
    vocab_ = tasks::Vocab::load(vocab);
    if (vocab_->size() > model_->config().vocab_size) {
      throw std::invalid_argument("config key 'vocab': " + vocab.string() + " has " +
                                  std::to_string(vocab_->size()) + " tokens, more than the model's " +
                                  std::to_string(model_->config().vocab_size));
    }
  } else if (!c.vocab.empty()) {
    throw std::invalid_argument("config key 'vocab': " + c.vocab + " does not exist");
  }
  if (!eval_data_.empty()) require_rewards(eval_data_, "eval_data");
  state_.seed = c.seed;
  if (c.resume) {
    if (auto dir = latest_checkpoint(c.out_dir)) {
      state_ = load_checkpoint(*dir, *model_, *optimizer_);
      if (state_.seed != c.seed) {
        throw std::invalid_argument("config key 'seed': " + std::to_string(c.seed) + " differs from the " +
                                    std::to_string(state_.seed) + " of the checkpoint " + dir->string() +
                                    " being resumed");
      }
      if (dp_.is_main()) std::cerr << "gkv-train: resumed from " << dir->string() << "\n";
    }
  }
  // Every rank resumes from the same checkpoint: out_dir must be one directory they all see.
  const auto resumed = at::tensor({state_.step, state_.updates, state_.cursor}, at::kLong).to(device());
  std::vector<at::Tensor> rank0{resumed.clone()};
  dp_.broadcast(rank0);
  if (!at::equal(resumed, rank0[0])) {
    throw std::invalid_argument("config key 'out_dir': rank " + std::to_string(dp_.rank()) +
                                " resumed at another step than rank 0; out_dir must be shared by all ranks");
  }
  // Identical weights on every rank, whatever each loaded.
  dp_.broadcast(params_);
  if (dp_.is_main()) {
    fs::create_directories(c.out_dir);
    truncate_metrics(fs::path(c.out_dir) / "metrics.jsonl", state_.step);
  }
}

std::vector<Example> Session::next_batch() {
  const int64_t per_rank = config_.batch_size / dp_.world();
  std::vector<Example> out;
  const int64_t first = state_.cursor + dp_.rank() * per_rank;
  for (int64_t i = 0; i < per_rank; ++i) out.push_back(data_[order_.index(first + i)]);
  state_.cursor += config_.batch_size;
  return out;
}

std::vector<std::vector<Example>> Session::micro_batches(const std::vector<Example>& local) const {
  std::vector<std::vector<Example>> out;
  for (size_t i = 0; i < local.size(); i += config_.micro_batch_size) {
    const size_t end = std::min(local.size(), i + static_cast<size_t>(config_.micro_batch_size));
    out.emplace_back(local.begin() + i, local.begin() + end);
  }
  return out;
}

std::map<std::string, double> Session::update() {
  std::vector<at::Tensor> grads;
  for (auto& p : params_) {
    if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
    grads.push_back(p.grad());
  }
  dp_.allreduce_sum(grads);
  const double norm = clip_gradients(params_, config_.grad_clip);
  const double lr = learning_rate(config_, state_.updates, config_.steps * updates_per_step_,
                                  config_.warmup_steps * updates_per_step_);
  set_learning_rate(*optimizer_, lr);
  optimizer_->step();
  optimizer_->zero_grad();
  ++state_.updates;
  return {{"lr", lr}, {"grad_norm", norm}};
}

engine::GenerateOptions Session::rollout_options(int64_t salt) const {
  engine::GenerateOptions o;
  o.max_new_tokens = config_.max_new_tokens;
  o.sampling.temperature = config_.temperature;
  o.sampling.top_p = config_.top_p;
  o.sampling.top_k = config_.top_k;
  // Every random draw is a function of (seed, step, rank, salt): nothing to save for resuming.
  o.sampling.seed = config_.seed * 1000003ULL + static_cast<uint64_t>(state_.step) * 7919ULL +
                    static_cast<uint64_t>(dp_.rank()) * 104729ULL + static_cast<uint64_t>(salt);
  return o;
}

void Session::require_rewards(const std::vector<Example>& examples, const std::string& key) const {
  if (!vocab_) {
    throw std::invalid_argument("config key 'vocab': rewards of " + key +
                                " need vocab.json (beside data, or named by 'vocab')");
  }
  for (size_t i = 0; i < examples.size(); ++i) {
    if (examples[i].answer.empty()) {
      throw std::invalid_argument("config key '" + key + "': example " + std::to_string(i + 1) +
                                  " has no 'answer' to reward");
    }
  }
}

double Session::reward(const Example& example, const std::vector<int64_t>& response) const {
  const auto& m = model_->config();
  return tasks::reward(example.answer_kind,
                       tasks::response_text(*vocab_, response, m.eos_token_ids, m.vocab_size),
                       example.answer);
}

std::shared_ptr<model::Decoder> Session::frozen_copy(const std::string& path) const {
  return load_on_device(path, config_, dp_.local_rank());
}

void Session::log(const nlohmann::json& record) const {
  if (!dp_.is_main()) return;
  std::ofstream(fs::path(config_.out_dir) / "metrics.jsonl", std::ios::app) << record.dump() << "\n";
}

void Session::checkpoint() {
  check_ranks_agree();
  if (!dp_.is_main()) return;
  save_checkpoint(config_.out_dir, *model_, *optimizer_, state_, config_);
  prune_checkpoints(config_.out_dir, config_.keep_checkpoints);
}

void Session::check_ranks_agree() const {
  if (dp_.world() == 1) return;
  // One fp64 sum per parameter: rank 0's are broadcast and compared exactly.
  std::vector<at::Tensor> sums;
  for (const auto& p : params_) sums.push_back(p.detach().to(at::kDouble).sum().reshape({1}));
  const auto mine = at::cat(sums);
  std::vector<at::Tensor> theirs{mine.clone()};
  dp_.broadcast(theirs);
  if (!at::equal(mine, theirs[0])) {
    throw std::runtime_error("rank " + std::to_string(dp_.rank()) + "'s weights differ from rank 0's at step " +
                             std::to_string(state_.step));
  }
}

void Session::evaluate() {
  if (eval_data_.empty()) return;
  at::NoGradGuard no_grad;
  engine::GenerateOptions o;
  o.max_new_tokens = config_.eval_max_new_tokens;  // greedy
  // Each rank scores every world-th example; the counts are summed.
  std::vector<Example> mine;
  for (size_t i = dp_.rank(); i < eval_data_.size(); i += dp_.world()) mine.push_back(eval_data_[i]);
  const std::pair<std::string, cache::Policy> runs[] = {{"eval_accuracy", policy_},
                                                         {"eval_accuracy_fullkv", cache::Policy::full_kv()}};
  std::vector<at::Tensor> correct;
  for (const auto& [name, policy] : runs) {
    double n = 0;
    for (const auto& micro : micro_batches(mine)) {
      std::vector<std::vector<int64_t>> prompts;
      for (const auto& e : micro) prompts.push_back(e.prompt);
      const auto rows = rollout_sequences(prompts, engine::generate(*model_, prompts, policy, o));
      for (size_t b = 0; b < micro.size(); ++b) {
        n += reward(micro[b], {rows[b].tokens.begin() + rows[b].prompt_length, rows[b].tokens.end()});
      }
    }
    correct.push_back(at::tensor(n, at::kDouble).to(device()));
  }
  dp_.allreduce_sum(correct);
  nlohmann::json record = {{"step", state_.step}, {"eval_examples", eval_data_.size()}};
  for (size_t r = 0; r < correct.size(); ++r) {
    record[runs[r].first] = correct[r].item<double>() / static_cast<double>(eval_data_.size());
  }
  if (dp_.is_main()) {
    std::cerr << "eval step " << state_.step << ": accuracy " << record["eval_accuracy"].get<double>()
              << " (" << policy_.name << "), " << record["eval_accuracy_fullkv"].get<double>()
              << " (fullkv)\n";
  }
  log(record);
}

void Session::train(const std::string& recipe, const std::function<StepStats(Session&)>& step) {
  const Config& c = config_;
  if (dp_.is_main()) {
    std::cerr << "gkv-train " << recipe << " config: " << to_json(c).dump() << "\n"
              << "gkv-train: " << dp_.world() << " rank(s), device " << device() << ", policy "
              << policy_.name << "\n";
  }
  const auto start = Clock::now();
  const int64_t first_step = state_.step;
  int64_t tokens = 0;
  auto last_log = start;
  int64_t tokens_at_last_log = 0;
  while (state_.step < c.steps) {
    if (c.eval_every > 0 && state_.step % c.eval_every == 0) evaluate();
    StepStats stats = step(*this);
    ++state_.step;
    // Metrics averaged over ranks, tokens summed.
    std::vector<at::Tensor> reduced{at::tensor(static_cast<double>(stats.tokens), at::kDouble)};
    for (const auto& [name, value] : stats.metrics) reduced.push_back(at::tensor(value, at::kDouble));
    for (auto& t : reduced) t = t.to(device());
    dp_.allreduce_sum(reduced);
    tokens += static_cast<int64_t>(reduced[0].item<double>());
    nlohmann::json record = {{"step", state_.step}};
    size_t i = 1;
    for (const auto& [name, value] : stats.metrics) {
      record[name] = reduced[i++].item<double>() / dp_.world();
    }
    const auto now = Clock::now();
    const double elapsed = std::chrono::duration<double>(now - start).count();
    record["tokens"] = tokens;
    record["elapsed_s"] = elapsed;
    log(record);
    if (dp_.is_main() && (state_.step % c.log_every == 0 || state_.step == c.steps)) {
      const double window_s = std::max(1e-9, std::chrono::duration<double>(now - last_log).count());
      const double rate = static_cast<double>(tokens - tokens_at_last_log) / window_s;
      const double eta = elapsed / static_cast<double>(state_.step - first_step) *
                         static_cast<double>(c.steps - state_.step);
      char line[256];
      std::snprintf(line, sizeof(line), "step %lld/%lld loss %.4f", static_cast<long long>(state_.step),
                    static_cast<long long>(c.steps), record.value("loss", 0.0));
      std::cerr << line;
      if (record.contains("reward")) std::cerr << " reward " << record["reward"].get<double>();
      std::snprintf(line, sizeof(line), " | %.0f tok/s | elapsed %s | eta %s\n", rate, hms(elapsed).c_str(),
                    hms(eta).c_str());
      std::cerr << line;
      last_log = now;
      tokens_at_last_log = tokens;
    }
    if (c.save_every > 0 && state_.step % c.save_every == 0 && state_.step < c.steps) checkpoint();
  }
  if (c.eval_every > 0) evaluate();
  if (first_step < c.steps) checkpoint();
}

}  // namespace gkv::trainer
