#include "trainer/sequences.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/util/Exception.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>

#include "ops.h"

namespace gkv::trainer {

namespace {
constexpr int32_t kNever = std::numeric_limits<int32_t>::max();
}  // namespace

at::Tensor LifetimeAttention::forward(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  // Under autocast the projections are bf16 but RoPE's fp32 tables promote q and k back to fp32:
  // the op needs one dtype, the autocast one (custom ops get no autocast casts of their own).
  const auto device = q.device().type();
  const auto dtype = at::autocast::is_autocast_enabled(device) ? at::autocast::get_autocast_dtype(device)
                                                               : q.scalar_type();
  return std::get<0>(gkv::lifetime_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                              death_.select(1, layer).contiguous(), scale));
}

SequenceBatch make_batch(const std::vector<Sequence>& rows, const model::ModelConfig& config,
                         c10::Device device) {
  TORCH_CHECK(!rows.empty(), "make_batch: no sequences");
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t T = 0;
  for (const auto& r : rows) {
    TORCH_CHECK(r.prompt_length >= 1 && r.prompt_length < static_cast<int64_t>(r.tokens.size()),
                "make_batch: a sequence needs a prompt and at least one response token");
    T = std::max<int64_t>(T, static_cast<int64_t>(r.tokens.size()));
  }
  SequenceBatch out;
  auto tokens = at::zeros({B, T}, at::kLong);
  auto response = at::zeros({B, T - 1}, at::kFloat);
  auto death = at::full({B, config.num_layers, config.num_kv_heads, T}, kNever, at::kInt);
  auto t = tokens.accessor<int64_t, 2>();
  auto m = response.accessor<float, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& r = rows[b];
    const int64_t n = static_cast<int64_t>(r.tokens.size());
    for (int64_t i = 0; i < n; ++i) t[b][i] = r.tokens[i];
    for (int64_t i = r.prompt_length; i < n; ++i) m[b][i - 1] = 1.0f;
    if (r.death.defined()) {
      TORCH_CHECK(r.death.dim() == 3 && r.death.size(0) == config.num_layers &&
                      r.death.size(1) == config.num_kv_heads && r.death.size(2) >= n,
                  "make_batch: death must be [L,Hkv,>=", n, "], got ", r.death.sizes());
      death[b].narrow(2, 0, n).copy_(r.death.narrow(2, 0, n));
    }
    out.real_tokens += n;
  }
  out.tokens = tokens.to(device);
  out.positions = at::arange(T, at::TensorOptions().dtype(at::kLong).device(device)).expand({B, T});
  out.death = death.to(device);
  out.response = response.to(device);
  return out;
}

at::Tensor forward_logits(const model::Decoder& model, const SequenceBatch& batch) {
  LifetimeAttention attention(batch.death);
  return model.forward(batch.tokens, batch.positions, attention);
}

at::Tensor token_logprobs(const at::Tensor& logits, const at::Tensor& tokens, double temperature) {
  const int64_t T = tokens.size(1);
  auto x = logits.narrow(1, 0, T - 1).to(at::kFloat);
  if (temperature != 1.0) x = x / temperature;
  return x.log_softmax(-1).gather(2, tokens.narrow(1, 1, T - 1).unsqueeze(2)).squeeze(2);
}

at::Tensor row_mean(const at::Tensor& x, const at::Tensor& mask) {
  return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0);
}

std::vector<Sequence> rollout_sequences(const std::vector<std::vector<int64_t>>& prompts,
                                        const engine::GenerateResult& result) {
  const auto tokens = result.tokens.cpu(), lengths = result.lengths.cpu();
  std::vector<Sequence> out(prompts.size());
  for (size_t b = 0; b < prompts.size(); ++b) {
    auto& s = out[b];
    s.tokens = prompts[b];
    s.prompt_length = static_cast<int64_t>(prompts[b].size());
    const int64_t len = lengths[b].item<int64_t>();
    const auto row = tokens[b].narrow(0, 0, len);
    s.tokens.insert(s.tokens.end(), row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + len);
    s.death = result.death[b].narrow(2, 0, static_cast<int64_t>(s.tokens.size())).cpu();
  }
  return out;
}

std::vector<Sequence> forced_sequences(const model::Decoder& model,
                                       const std::vector<std::vector<int64_t>>& prompts,
                                       const std::vector<std::vector<int64_t>>& responses,
                                       const cache::Policy& policy) {
  TORCH_CHECK(prompts.size() == responses.size(), "forced_sequences: ", prompts.size(),
              " prompts for ", responses.size(), " responses");
  std::vector<Sequence> out(prompts.size());
  int64_t longest = 0;
  for (size_t b = 0; b < prompts.size(); ++b) {
    TORCH_CHECK(!responses[b].empty(), "forced_sequences: response ", b, " is empty");
    out[b].tokens = prompts[b];
    out[b].tokens.insert(out[b].tokens.end(), responses[b].begin(), responses[b].end());
    out[b].prompt_length = static_cast<int64_t>(prompts[b].size());
    longest = std::max<int64_t>(longest, static_cast<int64_t>(responses[b].size()));
  }
  if (!policy.evicts()) return out;
  // Responses padded after their end: a pad forced after row b's last token only evicts keys at
  // queries past that row's end, which no training query reads.
  auto forced = at::zeros({static_cast<int64_t>(prompts.size()), longest}, at::kLong);
  for (size_t b = 0; b < responses.size(); ++b) {
    forced[b].narrow(0, 0, static_cast<int64_t>(responses[b].size()))
        .copy_(at::tensor(responses[b], at::kLong));
  }
  at::NoGradGuard no_grad;
  const auto result = engine::teacher_forced(model, prompts, forced, policy);
  for (size_t b = 0; b < prompts.size(); ++b) {
    out[b].death = result.death[b].narrow(2, 0, static_cast<int64_t>(out[b].tokens.size())).cpu();
  }
  return out;
}

}  // namespace gkv::trainer
