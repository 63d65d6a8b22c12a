// distill: self-distillation from the full cache to the compressed cache (gkv-method.md 5.2),
// forward KL(teacher || student) over the vocabulary at a temperature, on response tokens.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <stdexcept>

#include "trainer/recipes.h"

namespace gkv::trainer {

namespace {

// The teacher's own (FullKV) continuations of the prompts replace the dataset's responses.
std::vector<Example> with_teacher_responses(Session& s, const model::Decoder& teacher,
                                            std::vector<Example> micro, int64_t salt) {
  at::NoGradGuard no_grad;
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& e : micro) prompts.push_back(e.prompt);
  const auto gen = engine::generate(teacher, prompts, cache::Policy::full_kv(), s.rollout_options(salt));
  const auto rows = rollout_sequences(prompts, gen);
  for (size_t b = 0; b < micro.size(); ++b) {
    micro[b].response.assign(rows[b].tokens.begin() + rows[b].prompt_length, rows[b].tokens.end());
  }
  return micro;
}

}  // namespace

StepStats distill_step(Session& s, const model::Decoder& teacher) {
  const Config& c = s.config();
  const double T = c.distill_temperature;
  StepStats stats;
  double kl_sum = 0;
  int64_t salt = 0;
  for (auto micro : s.micro_batches(s.next_batch())) {
    if (c.distill_generate) micro = with_teacher_responses(s, teacher, std::move(micro), salt++);
    const auto rows = example_sequences(s.model(), micro, s.policy(), c.max_seq_len);
    const auto student_batch = make_batch(rows, s.model().config(), s.device());
    auto full_rows = rows;
    for (auto& r : full_rows) r.death = at::Tensor();  // the teacher sees every token
    const auto teacher_batch = make_batch(full_rows, teacher.config(), s.device());
    const int64_t n = student_batch.tokens.size(1) - 1;
    at::Tensor teacher_logp;  // [B,n,V]
    {
      at::NoGradGuard no_grad;
      AutocastGuard autocast(c.bf16, s.device());
      teacher_logp = (forward_logits(teacher, teacher_batch).narrow(1, 0, n).to(at::kFloat) / T).log_softmax(-1);
    }
    AutocastGuard autocast(c.bf16, s.device());
    const auto student_logp =
        (forward_logits(s.model(), student_batch).narrow(1, 0, n).to(at::kFloat) / T).log_softmax(-1);
    const auto kl_tok = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1);  // [B,n]
    const auto kl = row_mean(kl_tok, student_batch.response) * (T * T);                 // [B]
    (kl.sum() / static_cast<double>(c.batch_size)).backward();
    kl_sum += kl.sum().item<double>();
    stats.tokens += student_batch.real_tokens;
  }
  stats.metrics = s.update();
  stats.metrics["loss"] = kl_sum / static_cast<double>(c.batch_size / s.dp().world());
  return stats;
}

int run_distill(const Config& c) {
  Session s(c, /*updates_per_step=*/1);
  const auto teacher = s.frozen_copy(c.teacher.empty() ? c.model : c.teacher);
  if (teacher->config().vocab_size != s.model().config().vocab_size) {
    throw std::invalid_argument("config key 'teacher': vocabulary " +
                                std::to_string(teacher->config().vocab_size) + " differs from the model's " +
                                std::to_string(s.model().config().vocab_size));
  }
  s.train("distill", [&](Session& session) { return distill_step(session, *teacher); });
  return 0;
}

}  // namespace gkv::trainer
