// Training forwards under a compressed cache. A rollout (or a teacher-forced pass) logs, per row,
// layer and KV head, the first query position that no longer sees each key (GenerateResult.death);
// LifetimeAttention feeds each layer its own slice of that log to gkv::lifetime_attention, so the
// training forward attends exactly as the rollout did (no one-step lag, no shared layer mask) and
// is differentiable through the op's autograd kernel.
//
// Sequences are right-padded into a batch: a key at position p of row b is at column p, pads come
// after every real token, so causality alone hides them from real queries.
//
// Symbols: B rows, T = longest row, L layers, Hkv KV heads, V vocabulary.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "engine/generate.h"
#include "model/decoder.h"

namespace gkv::trainer {

class LifetimeAttention final : public model::Attention {
 public:
  // death [B,L,Hkv,T] int32: key at position p is visible to queries p <= i < death[.., p]
  explicit LifetimeAttention(at::Tensor death) : death_(std::move(death)) {}
  at::Tensor forward(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v) override;

 private:
  at::Tensor death_;
};

struct Sequence {
  std::vector<int64_t> tokens;  // prompt then response
  int64_t prompt_length = 0;
  at::Tensor death;             // [L,Hkv,>= tokens.size()] int32; undefined: the full cache
};

struct SequenceBatch {
  at::Tensor tokens;     // [B,T] int64, right-padded with 0
  at::Tensor positions;  // [B,T] int64
  at::Tensor death;      // [B,L,Hkv,T] int32 (pads and full-cache rows: never evicted)
  at::Tensor response;   // [B,T-1] fp32: 1 where tokens[:, t+1] is a response token
  int64_t real_tokens = 0;
};

SequenceBatch make_batch(const std::vector<Sequence>& rows, const model::ModelConfig& config,
                         c10::Device device);

// logits [B,T,V] of the batch under its death log.
at::Tensor forward_logits(const model::Decoder& model, const SequenceBatch& batch);

// logits [B,T,V], tokens [B,T] -> [B,T-1] fp32 log-prob of tokens[:, t+1] under
// log_softmax(logits[:, t] / temperature).
at::Tensor token_logprobs(const at::Tensor& logits, const at::Tensor& tokens, double temperature = 1.0);

// x [B,T-1], mask [B,T-1] -> [B]: the mean of x over each row's masked entries (0 for none).
at::Tensor row_mean(const at::Tensor& x, const at::Tensor& mask);

// Row b of a generation: the prompt, the generated tokens up to and including its stop token,
// and the eviction log over those positions.
std::vector<Sequence> rollout_sequences(const std::vector<std::vector<int64_t>>& prompts,
                                        const engine::GenerateResult& result);

// Prompt + response rows; with a cache policy that evicts, the death log of teacher-forcing the
// responses through the model's compressed cache (chunked as decoding would compress).
std::vector<Sequence> forced_sequences(const model::Decoder& model,
                                       const std::vector<std::vector<int64_t>>& prompts,
                                       const std::vector<std::vector<int64_t>>& responses,
                                       const cache::Policy& policy);

}  // namespace gkv::trainer
