// Batched generation over left-padded prompts with a compressed KV cache, and its teacher-forced
// twin. Prefill: full causal attention over the prompt, then the cache is written (and compressed
// when the prompt exceeds the budget). Decode: one token per row per forward through
// gkv::decode_attention over the cache, compression every divide_length forwards.
//
// Symbols: B batch, P padded prompt length, T generated (or forced) tokens, L layers, Hkv KV heads,
// V vocabulary, M = P + max_new_tokens (the eviction log's position axis).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "cache/kv_cache.h"
#include "cache/policy.h"
#include "engine/decode_step.h"
#include "model/decoder.h"

namespace gkv::engine {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // nucleus mass kept, in (0, 1]
  int64_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingOptions sampling;
  std::optional<std::vector<int64_t>> eos_token_ids;  // default: the model config's
  std::vector<int64_t> stop_token_ids;                // also end a row (kept in its output)
  std::optional<int64_t> pad_token_id;                // default: the first EOS id, else 0
  bool cuda_graph = true;  // on CUDA, replay a captured decode step (DecodeStepper)
  bool eviction_log = true;  // false: no death log kept (memory flat in max_new_tokens), none returned
  // Called after every step with its index and tokens ([B] int64 on the CPU; pad in finished
  // rows), for streaming; returning false ends the generation there. Set, it costs a host sync
  // per step.
  std::function<bool(int64_t step, const at::Tensor& tokens)> on_token;
};

struct GenerateResult {
  at::Tensor tokens;          // [B,T] int64; pad after a row's stop token
  at::Tensor logprobs;        // [B,T] fp32: log-softmax of the raw logits (temperature 1) at the
                              // chosen token; 0 after the stop
  at::Tensor lengths;         // [B] int64 tokens generated per row, its stop token included
  at::Tensor prompt_lengths;  // [B] int64 real prompt tokens per row
  at::Tensor death;           // [B,L,Hkv,M] int32 eviction log (CompressedKVCache::death);
                              // positions a row never reached stay INT32_MAX. Undefined
                              // without options.eviction_log
  int64_t kv_slots = 0;       // slots per layer and KV head the cache allocated, once
};

struct ForcedResult {
  at::Tensor logprobs;  // [B,T] fp32: log-prob of each forced token given everything before it
  at::Tensor death;     // [B,L,Hkv,P+T] int32; undefined without eviction_log
};

// prompts: B non-empty lists of token ids (left-padded into one batch).
GenerateResult generate(const model::Decoder& model, const std::vector<std::vector<int64_t>>& prompts,
                        const cache::Policy& policy, const GenerateOptions& options);

// Runs `tokens` [B,T] int64 after the prompts as if they had been generated, in chunks that end
// at the compression steps (every divide_length forwards), so the cache makes the same eviction
// decisions as decoding them one by one.
ForcedResult teacher_forced(const model::Decoder& model,
                            const std::vector<std::vector<int64_t>>& prompts,
                            const at::Tensor& tokens, const cache::Policy& policy,
                            std::optional<int64_t> pad_token_id = std::nullopt,
                            bool eviction_log = true);

}  // namespace gkv::engine
