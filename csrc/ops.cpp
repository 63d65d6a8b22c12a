#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "ops/compact.h"

namespace gkv {
namespace {

// The typed handle of schema gkv::<name>, looked up once per op.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& pos, int64_t length,
                            double scale, const std::optional<at::Tensor>& score_acc,
                            const std::optional<at::Tensor>& live_length) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, int64_t, double,
                                     const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&)>("gkv::decode_attention");
  return handle.call(q, k_cache, v_cache, pos, length, scale, score_acc, live_length);
}

at::Tensor window_scores(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos,
                         double scale) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double)>("gkv::window_scores");
  return handle.call(q_win, k, pos, scale);
}

at::Tensor redundancy_scores(const at::Tensor& k, const at::Tensor& pos, double threshold) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("gkv::redundancy_scores");
  return handle.call(k, pos, threshold);
}

std::tuple<at::Tensor, at::Tensor> redundancy_scores_carry(const at::Tensor& k,
                                                           const at::Tensor& pos,
                                                           const at::Tensor& carried,
                                                           double threshold) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
      "gkv::redundancy_scores_carry");
  return handle.call(k, pos, carried, threshold);
}

at::Tensor select_keep(const at::Tensor& score, int64_t keep, int64_t window) {
  static auto handle = op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("gkv::select_keep");
  return handle.call(score, keep, window);
}

void compact_(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, at::Tensor& score,
              const at::Tensor& idx) {
  static auto handle = op<void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                               const at::Tensor&)>("gkv::compact_");
  handle.call(k_cache, v_cache, pos, score, idx);
}

void compact_sorted_(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos,
                     at::Tensor& score, const at::Tensor& idx) {
#ifdef GKV_WITH_CUDA
  if (k_cache.is_cuda()) return compact_sorted_cuda(k_cache, v_cache, pos, score, idx);
#endif
  compact_(k_cache, v_cache, pos, score, idx);
}

void write_slot_(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& pos, const at::Tensor& k,
                 const at::Tensor& v, const at::Tensor& new_pos, const at::Tensor& slot,
                 const std::optional<at::Tensor>& q_ring, const std::optional<at::Tensor>& q,
                 const std::optional<at::Tensor>& ring_slot) {
  using Opt = const std::optional<at::Tensor>&;
  static auto handle =
      op<void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, Opt, Opt, Opt)>("gkv::write_slot_");
  handle.call(k_cache, v_cache, pos, k, v, new_pos, slot, q_ring, q, ring_slot);
}

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& idx) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("gkv::gather_tokens");
  return handle.call(x, idx);
}

std::tuple<at::Tensor, at::Tensor> lifetime_attention(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& death, double scale) {
  static auto handle =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, double)>(
          "gkv::lifetime_attention");
  return handle.call(q, k, v, death, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifetime_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& death, const at::Tensor& out, const at::Tensor& lse, double scale) {
  static auto handle =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "gkv::lifetime_attention_backward");
  return handle.call(grad_out, q, k, v, death, out, lse, scale);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("gkv::rms_norm");
  return handle.call(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("gkv::add_rms_norm");
  return handle.call(x, residual, weight, eps);
}

at::Tensor silu_mul(const at::Tensor& x) {
  static auto handle = op<at::Tensor(const at::Tensor&)>("gkv::silu_mul");
  return handle.call(x);
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "gkv::apply_rope");
  return handle.call(x, cos, sin);
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&)>("gkv::decode_linear");
  return handle.call(x, weight, bias);
}

}  // namespace gkv
