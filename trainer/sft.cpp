// sft: teacher-forced cross-entropy on the dataset's responses.
#include <ATen/ATen.h>

#include "trainer/recipes.h"

namespace gkv::trainer {

namespace {

// prompt + response of each example, cut to max_seq_len keeping the prompt's end and at least one
// response token.
std::pair<std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>> split(
    const std::vector<Example>& micro, int64_t max_seq_len) {
  std::vector<std::vector<int64_t>> prompts, responses;
  for (const auto& e : micro) {
    TORCH_CHECK(!e.response.empty(), "sft and distill need a 'response' in every example");
    const int64_t keep_response = std::min<int64_t>(e.response.size(), max_seq_len - 1);
    const int64_t keep_prompt = std::min<int64_t>(e.prompt.size(), max_seq_len - keep_response);
    prompts.emplace_back(e.prompt.end() - keep_prompt, e.prompt.end());
    responses.emplace_back(e.response.begin(), e.response.begin() + keep_response);
  }
  return {prompts, responses};
}

}  // namespace

std::vector<Sequence> example_sequences(const model::Decoder& model, const std::vector<Example>& micro,
                                        const cache::Policy& policy, int64_t max_seq_len) {
  auto [prompts, responses] = split(micro, max_seq_len);
  return forced_sequences(model, prompts, responses, policy);
}

StepStats sft_step(Session& s) {
  const Config& c = s.config();
  const auto policy = c.sft_compressed ? s.policy() : cache::Policy::full_kv();
  StepStats stats;
  double loss_sum = 0;
  for (const auto& micro : s.micro_batches(s.next_batch())) {
    const auto batch = make_batch(example_sequences(s.model(), micro, policy, c.max_seq_len),
                                  s.model().config(), s.device());
    AutocastGuard autocast(c.bf16, s.device());
    const auto nll = -row_mean(token_logprobs(forward_logits(s.model(), batch), batch.tokens),
                               batch.response);  // [B]
    (nll.sum() / static_cast<double>(c.batch_size)).backward();
    loss_sum += nll.sum().item<double>();
    stats.tokens += batch.real_tokens;
  }
  stats.metrics = s.update();
  stats.metrics["loss"] = loss_sum / static_cast<double>(c.batch_size / s.dp().world());
  return stats;
}

int run_sft(const Config& c) {
  Session s(c, /*updates_per_step=*/1);
  s.train("sft", sft_step);
  return 0;
}

}  // namespace gkv::trainer
