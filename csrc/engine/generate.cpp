#include "engine/generate.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace gkv::engine {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Batch {
  at::Tensor tokens;   // [B,P] int64, pad on the left
  at::Tensor mask;     // [B,P] int64, 1 = real token
  at::Tensor lengths;  // [B] int64 real tokens
};

Batch left_pad(const std::vector<std::vector<int64_t>>& prompts, int64_t pad, int64_t vocab,
               c10::Device device) {
  TORCH_CHECK(!prompts.empty(), "prompts must hold at least one prompt");
  TORCH_CHECK(pad >= 0 && pad < vocab, "pad_token_id ", pad, " is outside the vocabulary [0, ",
              vocab, ")");
  size_t P = 0;
  for (size_t b = 0; b < prompts.size(); ++b) {
    TORCH_CHECK(!prompts[b].empty(), "prompts[", b, "] is empty; every prompt needs a token");
    for (int64_t id : prompts[b]) {
      TORCH_CHECK(id >= 0 && id < vocab, "prompts[", b, "] holds token id ", id,
                  ", outside the vocabulary [0, ", vocab, ")");
    }
    P = std::max(P, prompts[b].size());
  }
  const int64_t B = static_cast<int64_t>(prompts.size());
  auto tokens = at::full({B, static_cast<int64_t>(P)}, pad, at::kLong);
  auto mask = at::zeros({B, static_cast<int64_t>(P)}, at::kLong);
  auto lengths = at::empty({B}, at::kLong);
  auto t = tokens.accessor<int64_t, 2>();
  auto m = mask.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& row = prompts[b];
    const size_t off = P - row.size();
    for (size_t i = 0; i < row.size(); ++i) {
      t[b][off + i] = row[i];
      m[b][off + i] = 1;
    }
    lengths[b] = static_cast<int64_t>(row.size());
  }
  return {tokens.to(device), mask.to(device), lengths.to(device)};
}

cache::CacheShape shape_of(const model::Decoder& model, int64_t batch) {
  const auto& c = model.config();
  return {c.num_layers, batch, c.num_heads, c.num_kv_heads, c.head_dim, c.dtype, model.device()};
}

void check_sampling(const SamplingOptions& o) {
  // A negative temperature is a mistake, not another spelling of greedy (0).
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature >= 0,
              "temperature must be finite and >= 0 (0: greedy), got ", o.temperature);
  TORCH_CHECK(o.top_p > 0 && o.top_p <= 1, "top_p must be in (0, 1], got ", o.top_p);
  TORCH_CHECK(o.top_k >= 0, "top_k must be >= 0, got ", o.top_k);
}

// logits [B,V] in the model's dtype -> next tokens [B] int64
at::Tensor sample(const at::Tensor& logits, const SamplingOptions& o, at::Generator& gen) {
  if (o.temperature == 0) return logits.argmax(-1);
  auto x = logits.to(at::kFloat) / o.temperature;
  if (o.top_k > 0 && o.top_k < x.size(-1)) {
    const auto kth = std::get<0>(x.topk(o.top_k, -1)).narrow(-1, o.top_k - 1, 1);  // [B,1]
    x = x.masked_fill(x < kth, -kInf);
  }
  if (o.top_p < 1) {
    auto [sorted, order] = x.sort(-1, /*descending=*/true);
    const auto p = sorted.softmax(-1);
    // A token stays while the mass before it is below top_p, so the best one always stays.
    sorted = sorted.masked_fill(p.cumsum(-1) - p >= o.top_p, -kInf);
    x = at::full_like(x, -kInf).scatter_(-1, order, sorted);
  }
  return at::multinomial(x.softmax(-1), 1, /*replacement=*/false, gen).squeeze(1);
}

// Prefill; returns the logits [B,V] of the last prompt token in the model's dtype, as
// DecodeStepper::step does.
at::Tensor prefill(const model::Decoder& model, cache::CompressedKVCache& cache, const Batch& batch) {
  const auto positions = cache.begin_prefill(batch.mask);
  const auto hidden = cached_forward(model, cache, batch.tokens, positions);
  return model.logits(hidden.narrow(1, hidden.size(1) - 1, 1)).select(1, 0);
}

// Every id of a token list the caller gave (EOS or stop ids) inside the vocabulary: one outside
// could never be generated, and as the default pad id it would index past the embedding table.
void check_token_ids(const char* name, const std::vector<int64_t>& ids, int64_t vocab_size) {
  for (const int64_t id : ids) {
    TORCH_CHECK(id >= 0 && id < vocab_size, name, " holds token id ", id,
                ", outside the vocabulary [0, ", vocab_size, ")");
  }
}

int64_t default_pad(const std::vector<int64_t>& eos) {
  return eos.empty() ? 0 : eos.front();
}

}  // namespace

GenerateResult generate(const model::Decoder& model, const std::vector<std::vector<int64_t>>& prompts,
                        const cache::Policy& policy, const GenerateOptions& options) {
  policy.validate();
  check_sampling(options.sampling);
  TORCH_CHECK(options.max_new_tokens >= 1, "max_new_tokens must be >= 1, got ",
              options.max_new_tokens);
  const auto& config = model.config();
  const auto eos = options.eos_token_ids.value_or(config.eos_token_ids);
  check_token_ids("eos_token_ids", eos, config.vocab_size);
  check_token_ids("stop_token_ids", options.stop_token_ids, config.vocab_size);
  const int64_t pad = options.pad_token_id.value_or(default_pad(eos));
  const c10::Device device = model.device();
  const Batch batch = left_pad(prompts, pad, config.vocab_size, device);
  const int64_t B = batch.tokens.size(0), P = batch.tokens.size(1), T = options.max_new_tokens;
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max() - P, "max_new_tokens (", T,
              ") plus the padded prompt length (", P, ") must be at most 2^31 - 1: the cache "
              "and the eviction log keep positions as int32");

  std::vector<int64_t> stop_ids = eos;
  stop_ids.insert(stop_ids.end(), options.stop_token_ids.begin(), options.stop_token_ids.end());
  const auto stop = at::tensor(stop_ids, at::kLong).to(device);  // [S]

  at::Generator gen = at::globalContext().defaultGenerator(device).clone();
  gen.set_current_seed(options.sampling.seed);

  cache::CompressedKVCache cache(policy, shape_of(model, B), P + T, options.eviction_log);
  DecodeStepper stepper(model, cache, options.cuda_graph);
  auto logits = prefill(model, cache, batch);  // [B,V]
  auto out_tokens = at::full({B, T}, pad, batch.tokens.options());
  auto out_logprobs = at::zeros({B, T}, logits.options().dtype(at::kFloat));
  auto lengths = at::zeros({B}, batch.tokens.options());
  auto finished = at::zeros({B}, batch.tokens.options().dtype(at::kBool));
  int64_t steps = 0;
  while (true) {
    auto next = sample(logits, options.sampling, gen);  // [B]
    next = at::where(finished, pad, next);
    // In fp32 from the model's dtype: on CUDA without an fp32 copy of the logits.
    const auto lp = logits.log_softmax(-1, at::kFloat).gather(1, next.unsqueeze(1)).squeeze(1);
    out_tokens.select(1, steps).copy_(next);
    out_logprobs.select(1, steps).copy_(at::where(finished, 0.0, lp));
    lengths.add_(finished.logical_not());
    if (!stop_ids.empty()) finished.logical_or_(at::isin(next, stop));
    ++steps;
    const bool go_on = !options.on_token || options.on_token(steps - 1, next.to(at::kCPU));
    // The only host sync of a step without on_token: whether every row is done (none without
    // stop tokens).
    if (!go_on || steps == T || (!stop_ids.empty() && finished.all().item<bool>())) break;
    logits = stepper.step(next);
  }
  return {out_tokens.narrow(1, 0, steps), out_logprobs.narrow(1, 0, steps), lengths, batch.lengths,
          options.eviction_log ? cache.death() : at::Tensor(), cache.capacity()};
}

ForcedResult teacher_forced(const model::Decoder& model,
                            const std::vector<std::vector<int64_t>>& prompts,
                            const at::Tensor& tokens, const cache::Policy& policy,
                            std::optional<int64_t> pad_token_id, bool eviction_log) {
  policy.validate();
  const auto& config = model.config();
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong &&
                  tokens.size(0) == static_cast<int64_t>(prompts.size()) && tokens.size(1) >= 1,
              "teacher_forced: tokens must be [B,T] int64 with B = ", prompts.size(),
              " prompts and T >= 1, got ", tokens.sizes(), " ", tokens.scalar_type());
  const int64_t pad = pad_token_id.value_or(default_pad(config.eos_token_ids));
  const c10::Device device = model.device();
  const Batch batch = left_pad(prompts, pad, config.vocab_size, device);
  const auto forced = tokens.to(device);
  model::check_token_range(forced, config.vocab_size, "teacher_forced");
  const int64_t B = forced.size(0), P = batch.tokens.size(1), T = forced.size(1);
  const int64_t D = policy.divide_length;

  cache::CompressedKVCache cache(policy, shape_of(model, B), P + T, eviction_log);
  auto logprobs = at::empty({B, T}, at::TensorOptions().dtype(at::kFloat).device(device));
  const auto first = prefill(model, cache, batch).log_softmax(-1, at::kFloat);  // [B,V]
  logprobs.select(1, 0).copy_(first.gather(1, forced.narrow(1, 0, 1)).squeeze(1));
  // As in generate, the last token is scored but never fed: forwards 1 .. T-1.
  int64_t fed = 0;
  while (fed < T - 1) {
    const int64_t f = cache.forwards();                  // index of the next forward
    const int64_t step = ((f - 1) / D + 1) * D;          // the next compression step
    const int64_t n = std::min(step - f + 1, T - 1 - fed);
    const auto chunk = forced.narrow(1, fed, n);         // [B,n]
    const auto positions = cache.begin_decode(n);
    const auto hidden = cached_forward(model, cache, chunk, positions);
    const auto lp = model.logits(hidden).log_softmax(-1, at::kFloat);  // [B,n,V]
    const auto next = forced.narrow(1, fed + 1, n).unsqueeze(2);  // [B,n,1]: what each predicts
    logprobs.narrow(1, fed + 1, n).copy_(lp.gather(2, next).squeeze(2));
    fed += n;
  }
  return {logprobs, eviction_log ? cache.death() : at::Tensor()};
}

}  // namespace gkv::engine
