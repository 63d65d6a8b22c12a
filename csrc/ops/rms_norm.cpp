// gkv::rms_norm and gkv::add_rms_norm: the argument checks, the CPU kernels (the oracle: the
// composite formulas), the Meta kernels, the Autograd kernels (backward through ATen ops, so it runs
// on every device) and the Autocast kernels (csrc/ops/autocast.h).
#include "ops/rms_norm.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"
#include "ops/autocast.h"
#include "ops/checks.h"

namespace gkv {

namespace {
constexpr const char* kOp = "rms_norm";

// The compute dtype: double for double inputs (gradcheck), float for everything else.
at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
}  // namespace

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1, "gkv::", kOp, ": x must have shape [..., D] (rank >= 1), got rank 0");
  if (x.scalar_type() != at::kDouble) checks::floating(kOp, x, "x");
  checks::rank(kOp, weight, "weight", 1, "[D]");
  checks::size(kOp, weight, "weight", 0, x.sym_size(-1), "D = x.size(-1)");
  TORCH_CHECK(x.sym_size(-1) >= 1, "gkv::", kOp, ": x.size(-1) = D must be >= 1, got sizes ",
              x.sym_sizes());
  checks::same_dtype(kOp, weight, "weight", x, "x");
  checks::same_device(kOp, {{&x, "x"}, {&weight, "weight"}});
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "gkv::", kOp, ": eps must be finite and >= 0, got ",
              eps);
}

void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  constexpr const char* op = "add_rms_norm";
  TORCH_CHECK(residual.sym_sizes() == x.sym_sizes(), "gkv::", op,
              ": residual must have the shape of x ", x.sym_sizes(), ", got ", residual.sym_sizes());
  checks::same_dtype(op, residual, "residual", x, "x");
  checks::same_device(op, {{&x, "x"}, {&residual, "residual"}});
  check_rms_norm(x, weight, eps);
}

namespace {

// x [..., D], weight [D] -> [..., D] (contiguous, dtype of x)
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  const at::Tensor xf = x.contiguous().to(acc_dtype(x));
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  // Cast back before the weight multiply, as transformers' Llama/Qwen2 RMSNorm does.
  return normed.to(x.scalar_type()) * weight;
}

// x, residual [..., D], weight [D] -> (x + residual, rms_norm(x + residual)), both contiguous
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, eps);
  at::Tensor sum = (x + residual).contiguous();
  return {sum, rms_norm_cpu(sum, weight, eps)};
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, eps);
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(x.sym_sizes(), x.options())};
}

// Differentiable in x and weight. The backward recomputes the row scale r = rsqrt(mean(x^2) + eps)
// from x rather than saving it (one more row reduction, one less tensor kept alive). With
// n = x * r and gn = g * weight: dweight = sum over rows of g * cast(n),
// dx = r * (gn - n * mean(gn * n)). The cast to x's dtype counts as the identity, as for .to().
class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    return gkv::rms_norm(x, weight, eps);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto acc = acc_dtype(x);
    const at::Tensor xf = x.to(acc), g = grads[0].to(acc);
    const at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);  // [..., 1]
    const at::Tensor n = xf * r;
    at::Tensor dx, dweight;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor gn = g * weight.to(acc);
      dx = (r * (gn - n * (gn * n).mean(-1, /*keepdim=*/true))).to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) {
      const at::Tensor rounded = n.to(x.scalar_type()).to(acc);  // the forward's cast(n)
      dweight = (g * rounded).reshape({-1, x.size(-1)}).sum(0).to(weight.scalar_type());
    }
    return {dx, dweight, at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // Decoding runs with nothing requiring grad: skip building an autograd node (host time).
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || weight.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gkv::rms_norm(x, weight, eps);
  }
  return RmsNormFunction::apply(x, weight, eps);
}

// With a gradient to compute, the composite of two differentiable ops (ATen's add, gkv::rms_norm):
// the fused kernel saves launches at a decode step, where nothing requires grad.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_autograd(const at::Tensor& x,
                                                         const at::Tensor& residual,
                                                         const at::Tensor& weight, double eps) {
  const bool wants_grad = x.requires_grad() || residual.requires_grad() || weight.requires_grad();
  if (!at::GradMode::is_enabled() || !wants_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gkv::add_rms_norm(x, residual, weight, eps);
  }
  check_add_rms_norm(x, residual, weight, eps);
  at::Tensor sum = x + residual;
  return {sum, gkv::rms_norm(sum, weight, eps)};
}

at::Tensor rms_norm_autocast(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto op = [](const at::Tensor& a, const at::Tensor& w, double e) {
    return gkv::rms_norm(a, w, e);
  };
  return call_promoted<2>({x, weight}, op, eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_autocast(const at::Tensor& x,
                                                         const at::Tensor& residual,
                                                         const at::Tensor& weight, double eps) {
  const auto op = [](const at::Tensor& a, const at::Tensor& r, const at::Tensor& w, double e) {
    return gkv::add_rms_norm(a, r, w, e);
  };
  return call_promoted<3>({x, residual, weight}, op, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
}

TORCH_LIBRARY_IMPL(gkv, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("add_rms_norm", &add_rms_norm_meta);
}

TORCH_LIBRARY_IMPL(gkv, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
}

TORCH_LIBRARY_IMPL(gkv, AutocastCUDA, m) {
  m.impl("rms_norm", &rms_norm_autocast);
  m.impl("add_rms_norm", &add_rms_norm_autocast);
}

TORCH_LIBRARY_IMPL(gkv, AutocastCPU, m) {
  m.impl("rms_norm", &rms_norm_autocast);
  m.impl("add_rms_norm", &add_rms_norm_autocast);
}

}  // namespace gkv
