// gkv::apply_rope: the argument check, the CPU kernel (the oracle: the composite formula), the
// Meta kernel, the Autograd kernel (backward through ATen ops, so it runs on every device) and the
// Autocast kernel (csrc/ops/autocast.h).
#include "ops/apply_rope.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"
#include "ops/autocast.h"
#include "ops/checks.h"

namespace gkv {

namespace {
constexpr const char* kOp = "apply_rope";

// rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]) (the rotate-half RoPE convention).
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// The transpose of rotate_half: cat(y[..., d/2:], -y[..., :d/2]).
at::Tensor rotate_half_transposed(const at::Tensor& y) {
  const int64_t half = y.size(-1) / 2;
  return at::cat({y.slice(-1, half), -y.slice(-1, 0, half)}, -1);
}
}  // namespace

void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  checks::rank(kOp, x, "x", 4, "[B, H, T, d]");
  if (x.scalar_type() != at::kDouble) checks::floating(kOp, x, "x");
  TORCH_CHECK(x.sym_size(3) % 2 == 0, "gkv::", kOp, ": the head size d = x.size(3) must be even "
              "(rotate-half pairs element i with i + d/2), got ", x.sym_size(3));
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    checks::rank(kOp, *t, name, 4, "[B or 1, H or 1, T or 1, d]");
    checks::same_dtype(kOp, *t, name, x, "x");
    for (int64_t dim = 0; dim < 3; ++dim) {
      TORCH_CHECK(t->sym_size(dim) == 1 || t->sym_size(dim) == x.sym_size(dim), "gkv::", kOp, ": ",
                  name, ".size(", dim, ") must be 1 or x.size(", dim, ") = ", x.sym_size(dim),
                  ", got ", name, " sizes ", t->sym_sizes(), " for x sizes ", x.sym_sizes());
    }
    checks::size(kOp, *t, name, 3, x.sym_size(3), "d of x");
  }
  checks::same_device(kOp, {{&x, "x"}, {&cos, "cos"}, {&sin, "sin"}});
}

namespace {

// x [B,H,T,d], cos/sin [B|1,H|1,T|1,d] -> [B,H,T,d] (contiguous, dtype of x)
at::Tensor apply_rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_apply_rope(x, cos, sin);
  const at::Tensor xc = x.contiguous();
  return xc * cos + rotate_half(xc) * sin;
}

at::Tensor apply_rope_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_apply_rope(x, cos, sin);
  return at::empty_symint(x.sym_sizes(), x.options());
}

// Differentiable in x only: out is linear in x, so dx = g * cos + rotate_half^T(g * sin). cos and
// sin are functions of the positions and get no gradient; one that requires grad is an error
// rather than a silently missing gradient.
class ApplyRopeFunction : public torch::autograd::Function<ApplyRopeFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(!cos.requires_grad() && !sin.requires_grad(), "gkv::", kOp,
                ": cos and sin get no gradient (they are functions of the positions); pass them "
                "detached (cos.requires_grad = ", cos.requires_grad(), ", sin.requires_grad = ",
                sin.requires_grad(), ")");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({cos, sin});
    return gkv::apply_rope(x, cos, sin);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &cos = saved[0], &sin = saved[1], &g = grads[0];
    return {g * cos + rotate_half_transposed(g * sin), at::Tensor(), at::Tensor()};
  }
};

at::Tensor apply_rope_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // Decoding runs with nothing requiring grad: skip building an autograd node (host time).
  const bool wants_grad = x.requires_grad() || cos.requires_grad() || sin.requires_grad();
  if (!at::GradMode::is_enabled() || !wants_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gkv::apply_rope(x, cos, sin);
  }
  return ApplyRopeFunction::apply(x, cos, sin);
}

at::Tensor apply_rope_autocast(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const auto op = [](const at::Tensor& a, const at::Tensor& c, const at::Tensor& s) {
    return gkv::apply_rope(a, c, s);
  };
  return call_promoted<3>({x, cos, sin}, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("apply_rope", &apply_rope_cpu); }

TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("apply_rope", &apply_rope_meta); }

TORCH_LIBRARY_IMPL(gkv, Autograd, m) { m.impl("apply_rope", &apply_rope_autograd); }

TORCH_LIBRARY_IMPL(gkv, AutocastCUDA, m) { m.impl("apply_rope", &apply_rope_autocast); }

TORCH_LIBRARY_IMPL(gkv, AutocastCPU, m) { m.impl("apply_rope", &apply_rope_autocast); }

}  // namespace gkv
