// gkv::lifetime_attention and its backward: argument checks, the CPU kernels (the oracle), the
// Meta kernels and the Autograd function. Key j is visible to query i iff j <= i < death[j]; the
// visibility is computed on the fly from death, so mask state stays O(T) (never a T x T mask).
#include "ops/lifetime_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "ops/checks.h"

namespace gkv {

namespace {

void check_float(const char* op, const at::Tensor& t, const char* name, bool allow_double) {
  if (allow_double && t.scalar_type() == at::kDouble) return;
  checks::floating(op, t, name);
}

}  // namespace

void check_lifetime_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& death, bool allow_double) {
  checks::rank(op, q, "q", 4, "[B, Hq, T, d]");
  checks::rank(op, k, "k", 4, "[B, Hkv, T, d]");
  checks::rank(op, v, "v", 4, "[B, Hkv, T, d]");
  checks::rank(op, death, "death", 3, "[B, Hkv, T]");
  check_float(op, q, "q", allow_double);
  checks::same_dtype(op, k, "k", q, "q");
  checks::same_dtype(op, v, "v", q, "q");
  checks::dtype(op, death, "death", at::kInt);
  checks::size(op, k, "k", 0, q.sym_size(0), "B of q");
  checks::size(op, k, "k", 2, q.sym_size(2), "T of q");
  checks::size(op, k, "k", 3, q.sym_size(3), "d of q");
  checks::gqa_heads(op, q, "q", k, "k");
  for (int64_t dim = 0; dim < 4; ++dim) {
    checks::size(op, v, "v", dim, k.sym_size(dim), "the same size as k");
  }
  checks::size(op, death, "death", 0, q.sym_size(0), "B of q");
  checks::size(op, death, "death", 1, k.sym_size(1), "Hkv of k");
  checks::size(op, death, "death", 2, q.sym_size(2), "T of q");
  checks::same_device(op, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&death, "death"}});
}

void check_lifetime_attention_backward(const char* op, const at::Tensor& grad_out,
                                       const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& death,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       bool allow_double) {
  check_lifetime_attention(op, q, k, v, death, allow_double);
  checks::rank(op, grad_out, "grad_out", 4, "[B, Hq, T, d]");
  checks::rank(op, out, "out", 4, "[B, Hq, T, d]");
  checks::rank(op, lse, "lse", 3, "[B, Hq, T]");
  checks::same_dtype(op, grad_out, "grad_out", q, "q");
  checks::same_dtype(op, out, "out", q, "q");
  checks::dtype(op, lse, "lse", at::kFloat);
  for (int64_t dim = 0; dim < 4; ++dim) {
    checks::size(op, grad_out, "grad_out", dim, q.sym_size(dim), "the same size as q");
    checks::size(op, out, "out", dim, q.sym_size(dim), "the same size as q");
  }
  for (int64_t dim = 0; dim < 3; ++dim) {
    checks::size(op, lse, "lse", dim, q.sym_size(dim), "the same size as q");
  }
  checks::same_device(op, {{&q, "q"}, {&grad_out, "grad_out"}, {&out, "out"}, {&lse, "lse"}});
}

namespace {

constexpr int64_t kRowBlock = 16;  // query rows (or keys) per parallel work item

struct Dims {
  int64_t B, Hq, Hkv, G, T, d;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k) {
  return {q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), q.size(3)};
}

// The compute dtype of the oracle: double for double inputs, float for everything else.
at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x [..., T, d] -> contiguous [..., d, T] in the compute dtype, so the logits of one query
// against all keys are an axpy over contiguous memory (vectorises without reassociation).
at::Tensor transposed(const at::Tensor& x, at::ScalarType acc) {
  return x.to(acc).transpose(-1, -2).contiguous();
}

// s[j] = sum_c x[c] * yt[c * T + j] for j in [lo, hi): x [d], yt [d, T].
template <typename acc_t>
void dots(const acc_t* x, const acc_t* yt, int64_t d, int64_t T, int64_t lo, int64_t hi,
          acc_t* s) {
  std::fill(s + lo, s + hi, acc_t(0));
  for (int64_t c = 0; c < d; ++c) {
    const acc_t xc = x[c];
    const acc_t* row = yt + c * T;
    for (int64_t j = lo; j < hi; ++j) s[j] += xc * row[j];
  }
}

// y[c] += a * x[c] for c < d.
template <typename acc_t>
void axpy(acc_t a, const acc_t* x, int64_t d, acc_t* y) {
  for (int64_t c = 0; c < d; ++c) y[c] += a * x[c];
}

// q [B,Hq,T,d], kt [B,Hkv,d,T], v [B,Hkv,T,d], death [B,Hkv,T] -> out [B,Hq,T,d], lse [B,Hq,T]
template <typename acc_t>
void forward_rows(const Dims& n, const acc_t* q, const acc_t* kt, const acc_t* v,
                  const int32_t* death, double scale, acc_t* out, float* lse) {
  const int64_t blocks = (n.T + kRowBlock - 1) / kRowBlock;
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, n.B * n.Hq * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(n.T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bhq = item / blocks, hq = bhq % n.Hq, b = bhq / n.Hq;
      const int64_t bh = b * n.Hkv + hq / n.G;
      const acc_t* kt_h = kt + bh * n.d * n.T;
      const acc_t* v_h = v + bh * n.T * n.d;
      const int32_t* death_h = death + bh * n.T;
      const int64_t i_end = std::min(n.T, (item % blocks + 1) * kRowBlock);
      for (int64_t i = (item % blocks) * kRowBlock; i < i_end; ++i) {
        const int64_t row = bhq * n.T + i;
        dots(q + row * n.d, kt_h, n.d, n.T, 0, i + 1, s.data());
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          if (i < death_h[j]) m = std::max(m, s[j] * sc);
        }
        acc_t* o = out + row * n.d;
        std::fill(o, o + n.d, acc_t(0));
        if (m == -std::numeric_limits<acc_t>::infinity()) {  // sees no key: 0 and -inf
          lse[row] = -std::numeric_limits<float>::infinity();
          continue;
        }
        acc_t l = 0;
        for (int64_t j = 0; j <= i; ++j) {
          if (i >= death_h[j]) continue;
          const acc_t p = std::exp(s[j] * sc - m);
          l += p;
          axpy(p, v_h + j * n.d, n.d, o);
        }
        for (int64_t c = 0; c < n.d; ++c) o[c] /= l;
        lse[row] = static_cast<float>(m + std::log(l));
      }
    }
  });
}

// dq [B,Hq,T,d] = scale * sum_j dS_ij k_j with dS = P * (dP - D), per query row.
// q/dout [B,Hq,T,d], kt/vt [B,Hkv,d,T], k [B,Hkv,T,d], lse/delta [B,Hq,T].
template <typename acc_t>
void backward_dq(const Dims& n, const acc_t* q, const acc_t* dout, const acc_t* kt,
                 const acc_t* vt, const acc_t* k, const int32_t* death, const float* lse,
                 const acc_t* delta, double scale, acc_t* dq) {
  const int64_t blocks = (n.T + kRowBlock - 1) / kRowBlock;
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, n.B * n.Hq * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(n.T), dp(n.T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bhq = item / blocks, hq = bhq % n.Hq, b = bhq / n.Hq;
      const int64_t bh = b * n.Hkv + hq / n.G;
      const int32_t* death_h = death + bh * n.T;
      const int64_t i_end = std::min(n.T, (item % blocks + 1) * kRowBlock);
      for (int64_t i = (item % blocks) * kRowBlock; i < i_end; ++i) {
        const int64_t row = bhq * n.T + i;
        dots(q + row * n.d, kt + bh * n.d * n.T, n.d, n.T, 0, i + 1, s.data());
        dots(dout + row * n.d, vt + bh * n.d * n.T, n.d, n.T, 0, i + 1, dp.data());
        acc_t* g = dq + row * n.d;
        std::fill(g, g + n.d, acc_t(0));
        for (int64_t j = 0; j <= i; ++j) {
          if (i >= death_h[j]) continue;
          const acc_t p = std::exp(s[j] * sc - static_cast<acc_t>(lse[row]));
          axpy(p * (dp[j] - delta[row]) * sc, k + (bh * n.T + j) * n.d, n.d, g);
        }
      }
    }
  });
}

// dk/dv [B,Hkv,T,d] per key: sums over the G query heads of its group and the queries
// i in [j, death[j]) that see it. k/v [B,Hkv,T,d], qt/doutt [B,Hq,d,T], q/dout [B,Hq,T,d].
template <typename acc_t>
void backward_dkdv(const Dims& n, const acc_t* k, const acc_t* v, const acc_t* qt,
                   const acc_t* doutt, const acc_t* q, const acc_t* dout, const int32_t* death,
                   const float* lse, const acc_t* delta, double scale, acc_t* dk, acc_t* dv) {
  const int64_t blocks = (n.T + kRowBlock - 1) / kRowBlock;
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, n.B * n.Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(n.T), dp(n.T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, b = bh / n.Hkv, h = bh % n.Hkv;
      const int64_t j_end = std::min(n.T, (item % blocks + 1) * kRowBlock);
      for (int64_t j = (item % blocks) * kRowBlock; j < j_end; ++j) {
        const int64_t key = bh * n.T + j;
        acc_t* gk = dk + key * n.d;
        acc_t* gv = dv + key * n.d;
        std::fill(gk, gk + n.d, acc_t(0));
        std::fill(gv, gv + n.d, acc_t(0));
        const int64_t i_end = std::min<int64_t>(n.T, death[key]);  // queries j <= i < death
        if (i_end <= j) continue;
        for (int64_t hq = h * n.G; hq < (h + 1) * n.G; ++hq) {
          const int64_t bhq = b * n.Hq + hq;
          dots(k + key * n.d, qt + bhq * n.d * n.T, n.d, n.T, j, i_end, s.data());
          dots(v + key * n.d, doutt + bhq * n.d * n.T, n.d, n.T, j, i_end, dp.data());
          for (int64_t i = j; i < i_end; ++i) {
            const int64_t row = bhq * n.T + i;
            const acc_t p = std::exp(s[i] * sc - static_cast<acc_t>(lse[row]));
            axpy(p, dout + row * n.d, n.d, gv);
            axpy(p * (dp[i] - delta[row]) * sc, q + row * n.d, n.d, gk);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lifetime_attention_cpu(const at::Tensor& q,
                                                          const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const at::Tensor& death, double scale) {
  check_lifetime_attention("lifetime_attention", q, k, v, death, /*allow_double=*/true);
  const Dims n = dims_of(q, k);
  const auto acc = acc_dtype(q);
  const at::Tensor qc = q.to(acc).contiguous(), vc = v.to(acc).contiguous();
  const at::Tensor kt = transposed(k, acc), dc = death.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(acc));
  at::Tensor lse = at::empty({n.B, n.Hq, n.T}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(acc, "lifetime_attention_cpu", [&] {
    forward_rows<scalar_t>(n, qc.const_data_ptr<scalar_t>(), kt.const_data_ptr<scalar_t>(),
                           vc.const_data_ptr<scalar_t>(), dc.const_data_ptr<int32_t>(), scale,
                           out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifetime_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& death, const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_lifetime_attention_backward("lifetime_attention_backward", grad_out, q, k, v, death, out,
                                    lse, /*allow_double=*/true);
  const Dims n = dims_of(q, k);
  const auto acc = acc_dtype(q);
  const at::Tensor qc = q.to(acc).contiguous(), kc = k.to(acc).contiguous();
  const at::Tensor vc = v.to(acc).contiguous(), gc = grad_out.to(acc).contiguous();
  const at::Tensor qt = transposed(q, acc), kt = transposed(k, acc);
  const at::Tensor vt = transposed(v, acc), gt = transposed(grad_out, acc);
  const at::Tensor dc = death.contiguous(), lc = lse.contiguous();
  // D_i = rowsum(dO_i * O_i) (FlashAttention-2), from the forward's output as given.
  const at::Tensor delta = (gc * out.to(acc)).sum(-1).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(acc));
  at::Tensor dk = at::empty(k.sizes(), k.options().dtype(acc));
  at::Tensor dv = at::empty(v.sizes(), v.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "lifetime_attention_backward_cpu", [&] {
    backward_dq<scalar_t>(n, qc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                          kt.const_data_ptr<scalar_t>(), vt.const_data_ptr<scalar_t>(),
                          kc.const_data_ptr<scalar_t>(), dc.const_data_ptr<int32_t>(),
                          lc.const_data_ptr<float>(), delta.const_data_ptr<scalar_t>(), scale,
                          dq.mutable_data_ptr<scalar_t>());
    backward_dkdv<scalar_t>(n, kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                            qt.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(),
                            qc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                            dc.const_data_ptr<int32_t>(), lc.const_data_ptr<float>(),
                            delta.const_data_ptr<scalar_t>(), scale,
                            dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> lifetime_attention_meta(const at::Tensor& q,
                                                           const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const at::Tensor& death,
                                                           double /*scale*/) {
  check_lifetime_attention("lifetime_attention", q, k, v, death, /*allow_double=*/true);
  return {q.new_empty_symint(q.sym_sizes()),
          at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)},
                           q.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifetime_attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& death, const at::Tensor& out, const at::Tensor& lse, double /*scale*/) {
  check_lifetime_attention_backward("lifetime_attention_backward", grad_out, q, k, v, death, out,
                                    lse, /*allow_double=*/true);
  return {q.new_empty_symint(q.sym_sizes()), k.new_empty_symint(k.sym_sizes()),
          v.new_empty_symint(v.sym_sizes())};
}

// Differentiable in q, k and v; lse is an auxiliary output (non-differentiable), death an index.
class LifetimeAttentionFunction
    : public torch::autograd::Function<LifetimeAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& death,
                                                double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = gkv::lifetime_attention(q, k, v, death, scale);
    ctx->save_for_backward({q, k, v, death, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &death = saved[3];
    const at::Tensor &out = saved[4], &lse = saved[5];
    if (!grads[0].defined()) {  // only lse was used: no gradient flows
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [dq, dk, dv] = gkv::lifetime_attention_backward(grads[0], q, k, v, death, out, lse,
                                                         ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> lifetime_attention_autograd(const at::Tensor& q,
                                                               const at::Tensor& k,
                                                               const at::Tensor& v,
                                                               const at::Tensor& death,
                                                               double scale) {
  auto outs = LifetimeAttentionFunction::apply(q, k, v, death, scale);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) {
  m.impl("lifetime_attention", &lifetime_attention_cpu);
  m.impl("lifetime_attention_backward", &lifetime_attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(gkv, Meta, m) {
  m.impl("lifetime_attention", &lifetime_attention_meta);
  m.impl("lifetime_attention_backward", &lifetime_attention_backward_meta);
}

TORCH_LIBRARY_IMPL(gkv, Autograd, m) {
  m.impl("lifetime_attention", &lifetime_attention_autograd);
}

}  // namespace gkv
