#include "trainer/optim.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/nn/utils/clip_grad.h>

#include <cmath>
#include <numbers>
#include <set>

namespace gkv::trainer {

std::vector<at::Tensor> trainable_parameters(model::Decoder& model) {
  std::vector<at::Tensor> out;
  std::set<const void*> seen;
  for (auto& [name, t] : model.named_tensors()) {
    if (!seen.insert(t.unsafeGetTensorImpl()).second) continue;
    t.requires_grad_(true);  // the model's own tensor: the decoder reads it in forward
    out.push_back(t);
  }
  return out;
}

std::unique_ptr<torch::optim::AdamW> make_optimizer(const std::vector<at::Tensor>& params,
                                                    const Config& c) {
  torch::optim::AdamWOptions o(c.lr);
  o.betas({c.beta1, c.beta2}).eps(c.adam_eps).weight_decay(c.weight_decay);
  return std::make_unique<torch::optim::AdamW>(params, o);
}

double learning_rate(const Config& c, int64_t update, int64_t total, int64_t warmup_updates) {
  if (update < warmup_updates) return c.lr * static_cast<double>(update + 1) / (warmup_updates + 1);
  if (c.lr_schedule == "constant") return c.lr;
  const double span = std::max<int64_t>(1, total - warmup_updates);
  const double progress = std::min(1.0, static_cast<double>(update - warmup_updates) / span);
  const double floor = c.min_lr_ratio * c.lr;
  return floor + (c.lr - floor) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

void set_learning_rate(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }
}

double clip_gradients(const std::vector<at::Tensor>& params, double max_norm) {
  if (max_norm <= 0) {
    std::vector<at::Tensor> norms;
    for (const auto& p : params) {
      if (p.grad().defined()) norms.push_back(p.grad().norm().square());
    }
    return norms.empty() ? 0.0 : at::stack(norms).sum().sqrt().item<double>();
  }
  return torch::nn::utils::clip_grad_norm_(params, max_norm);
}

AutocastGuard::AutocastGuard(bool enabled, c10::Device device)
    : active_(enabled && device.is_cuda()) {
  if (!active_) return;
  previous_ = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, previous_);
  at::autocast::clear_cache();
}

}  // namespace gkv::trainer
