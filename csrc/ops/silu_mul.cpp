// gkv::silu_mul: the argument check, the CPU kernel (the oracle: the composite formula), the Meta
// kernel and the Autograd kernel (the composite itself when a gradient is needed).
#include "ops/silu_mul.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"
#include "ops/checks.h"

namespace gkv {

namespace {
constexpr const char* kOp = "silu_mul";

// silu(gate) * up over the halves of x, as the decoder computed it before the fusion.
at::Tensor composite(const at::Tensor& x) {
  const auto halves = x.chunk(2, -1);
  return at::silu(halves[0]) * halves[1];
}
}  // namespace

void check_silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "gkv::", kOp, ": x must have shape [..., 2F] (rank >= 1), got rank 0");
  if (x.scalar_type() != at::kDouble) checks::floating(kOp, x, "x");
  TORCH_CHECK(x.sym_size(-1) >= 2 && x.sym_size(-1) % 2 == 0, "gkv::", kOp,
              ": x.size(-1) = 2F must be even and >= 2 (gate and up halves), got sizes ",
              x.sym_sizes());
}

namespace {

// x [..., 2F] -> [..., F] (contiguous, dtype of x)
at::Tensor silu_mul_cpu(const at::Tensor& x) {
  check_silu_mul(x);
  return composite(x).contiguous();
}

at::Tensor silu_mul_meta(const at::Tensor& x) {
  check_silu_mul(x);
  auto sizes = x.sym_sizes().vec();
  sizes.back() = sizes.back() / 2;
  return at::empty_symint(sizes, x.options());
}

// With a gradient to compute, the composite (ATen's silu and mul carry it); the fused kernel is
// for decoding, where nothing requires grad.
at::Tensor silu_mul_autograd(const at::Tensor& x) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gkv::silu_mul(x);
  }
  check_silu_mul(x);
  return composite(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("silu_mul", &silu_mul_cpu); }

TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("silu_mul", &silu_mul_meta); }

TORCH_LIBRARY_IMPL(gkv, Autograd, m) { m.impl("silu_mul", &silu_mul_autograd); }

}  // namespace gkv
