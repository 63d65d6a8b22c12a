// AdamW over the decoder's parameters, the learning-rate schedule and gradient clipping.
// Precision: the weights (the master copy) stay fp32; on CUDA, bf16=true runs training forwards
// under bf16 autocast (AutocastGuard), so gradients and the optimizer state are fp32.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/optim/adamw.h>

#include <memory>
#include <vector>

#include "model/decoder.h"
#include "trainer/config.h"

namespace gkv::trainer {

// The decoder's trainable tensors (a tied lm_head is the embedding, listed once), set to require
// grad.
std::vector<at::Tensor> trainable_parameters(model::Decoder& model);

std::unique_ptr<torch::optim::AdamW> make_optimizer(const std::vector<at::Tensor>& params,
                                                    const Config& c);

// Learning rate of optimizer update `update` (0-based) out of `total`: linear warmup to lr over
// warmup_updates, then constant or cosine down to min_lr_ratio * lr at `total`.
double learning_rate(const Config& c, int64_t update, int64_t total, int64_t warmup_updates);
void set_learning_rate(torch::optim::Optimizer& opt, double lr);

// Scales the gradients so their global L2 norm is at most max_norm (0: no clipping); returns the
// norm before clipping.
double clip_gradients(const std::vector<at::Tensor>& params, double max_norm);

// bf16 autocast on CUDA for the scope when enabled (a no-op otherwise).
class AutocastGuard {
 public:
  AutocastGuard(bool enabled, c10::Device device);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_;
  bool previous_ = false;
};

}  // namespace gkv::trainer
