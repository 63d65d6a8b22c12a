// gkv::decode_attention: the argument check, the CPU kernel (the oracle) and the Meta kernel.
// The op is inference-only (it mutates score_acc), so it has no Autograd kernel.
#include "ops/decode_attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ops/checks.h"

namespace gkv {

namespace {
constexpr const char* kOp = "decode_attention";
}  // namespace

void check_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& pos, int64_t length,
                            const std::optional<at::Tensor>& score_acc,
                            const std::optional<at::Tensor>& live_length) {
  checks::rank(kOp, q, "q", 3, "[B, Hq, d]");
  checks::rank(kOp, k_cache, "k_cache", 4, "[B, Hkv, C, d]");
  checks::rank(kOp, v_cache, "v_cache", 4, "[B, Hkv, C, d]");
  checks::rank(kOp, pos, "pos", 3, "[B, Hkv, C]");
  checks::floating(kOp, q, "q");
  checks::same_dtype(kOp, k_cache, "k_cache", q, "q");
  checks::same_dtype(kOp, v_cache, "v_cache", q, "q");
  checks::dtype(kOp, pos, "pos", at::kInt);
  if (score_acc.has_value()) {
    checks::same_device(kOp, {{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                              {&pos, "pos"}, {&*score_acc, "score_acc"}});
  } else {
    checks::same_device(kOp, {{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                              {&pos, "pos"}});
  }
  const auto B = q.sym_size(0);
  const auto d = q.sym_size(2);
  const auto Hkv = k_cache.sym_size(1);
  const auto C = k_cache.sym_size(2);
  checks::size(kOp, k_cache, "k_cache", 0, B, "B of q");
  checks::size(kOp, k_cache, "k_cache", 3, d, "d of q");
  checks::gqa_heads(kOp, q, "q", k_cache, "k_cache");
  checks::size(kOp, v_cache, "v_cache", 0, B, "B of q");
  checks::size(kOp, v_cache, "v_cache", 1, Hkv, "Hkv of k_cache");
  checks::size(kOp, v_cache, "v_cache", 2, C, "C of k_cache");
  checks::size(kOp, v_cache, "v_cache", 3, d, "d of q");
  checks::size(kOp, pos, "pos", 0, B, "B of q");
  checks::size(kOp, pos, "pos", 1, Hkv, "Hkv of k_cache");
  checks::size(kOp, pos, "pos", 2, C, "C of k_cache");
  TORCH_CHECK(length >= 0 && C >= length, "gkv::", kOp, ": length must be in [0, C = ", C,
              "] (C = k_cache.size(2)), got ", length);
  if (score_acc.has_value()) {
    const auto& acc = *score_acc;
    checks::rank(kOp, acc, "score_acc", 3, "[B, Hkv, C]");
    checks::dtype(kOp, acc, "score_acc", at::kFloat);
    checks::size(kOp, acc, "score_acc", 0, B, "B of q");
    checks::size(kOp, acc, "score_acc", 1, Hkv, "Hkv of k_cache");
    checks::size(kOp, acc, "score_acc", 2, C, "C of k_cache");
    checks::contiguous(kOp, acc, "score_acc");
  }
  if (live_length.has_value()) {
    const auto& live = *live_length;
    TORCH_CHECK(live.dim() == 1 && live.sym_size(0) == 1, "gkv::", kOp,
                ": live_length must have shape [1], got ", live.sym_sizes());
    checks::dtype(kOp, live, "live_length", at::kLong);
    checks::same_device(kOp, {{&q, "q"}, {&live, "live_length"}});
  }
}

at::Tensor softmax_or_zero(const at::Tensor& s) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  auto m = std::get<0>(s.max(-1, /*keepdim=*/true));
  // Rows with no finite entry: shift by 0 so exp gives 0 rather than exp(-inf - -inf) = NaN.
  auto e = (s - m.masked_fill(m == -kInf, 0.0)).exp_();
  auto denom = e.sum(-1, /*keepdim=*/true);
  return e.div_(denom.masked_fill_(denom == 0, 1.0));
}

at::Tensor vector_readable(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(-1) == 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % vec == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

namespace {

// q [B,Hq,d], k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score_acc [B,Hkv,C] fp32,
// live_length [1] int64 -> out [B,Hq,d]
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& pos, int64_t length,
                                double scale, const std::optional<at::Tensor>& score_acc,
                                const std::optional<at::Tensor>& live_length) {
  check_decode_attention(q, k_cache, v_cache, pos, length, score_acc, live_length);
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv;
  if (length == 0) return at::zeros_like(q, at::MemoryFormat::Contiguous);
  auto live = pos.narrow(2, 0, length).ge(0);           // [B,Hkv,L]
  if (live_length.has_value()) {  // slots from live_length on count as empty
    const int64_t cut = std::clamp(live_length->item<int64_t>(), int64_t{0}, length);
    live.narrow(2, cut, length - cut).fill_(false);
  }
  auto dead = live.logical_not();
  auto k = k_cache.narrow(2, 0, length).to(at::kFloat);  // [B,Hkv,L,d]
  // Dead slots may hold anything (NaN included); zero their values so 0 * NaN never appears.
  auto v = v_cache.narrow(2, 0, length).to(at::kFloat).masked_fill(dead.unsqueeze(-1), 0.0);
  auto qg = q.to(at::kFloat).reshape({B, Hkv, G, d});                  // [B,Hkv,G,d]
  auto s = at::matmul(qg, k.transpose(-1, -2)).mul_(scale);            // [B,Hkv,G,L]
  s.masked_fill_(dead.unsqueeze(2), -std::numeric_limits<float>::infinity());
  auto p = softmax_or_zero(s);                                         // [B,Hkv,G,L]
  if (score_acc.has_value()) {
    auto acc = score_acc->narrow(2, 0, length);                        // [B,Hkv,L] view
    auto pmax = std::get<0>(p.max(2));                                 // [B,Hkv,L]
    acc.copy_(at::where(live, acc + pmax, acc));
  }
  return at::matmul(p, v).reshape({B, Hq, d}).to(q.scalar_type());
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& pos,
                                 int64_t length, double /*scale*/,
                                 const std::optional<at::Tensor>& score_acc,
                                 const std::optional<at::Tensor>& live_length) {
  check_decode_attention(q, k_cache, v_cache, pos, length, score_acc, live_length);
  return q.new_empty_symint(q.sym_sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("decode_attention", &decode_attention_meta); }

}  // namespace gkv
