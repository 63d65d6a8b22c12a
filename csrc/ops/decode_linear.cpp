// gkv::decode_linear: the argument check, the CPU kernel (the oracle: ATen's linear), the Meta
// kernel, the Autograd kernel (ATen's linear itself when a gradient is needed) and the Autocast
// kernels (ATen's linear's cast policy).
#include "ops/decode_linear.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "ops.h"
#include "ops/checks.h"

namespace gkv {

namespace {
constexpr const char* kOp = "decode_linear";

at::Tensor composite(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  return at::linear(x, weight, bias);
}
}  // namespace

void check_decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "gkv::", kOp, ": x must have shape [..., K] (rank >= 1), got rank 0");
  checks::rank(kOp, weight, "weight", 2, "[N, K]");
  checks::size(kOp, weight, "weight", 1, x.sym_size(-1), "K of x");
  if (x.scalar_type() != at::kDouble) checks::floating(kOp, x, "x");
  checks::same_dtype(kOp, weight, "weight", x, "x");
  if (bias.has_value()) {
    checks::rank(kOp, *bias, "bias", 1, "[N]");
    checks::size(kOp, *bias, "bias", 0, weight.sym_size(0), "N of weight");
    checks::same_dtype(kOp, *bias, "bias", x, "x");
    checks::same_device(kOp, {{&x, "x"}, {&weight, "weight"}, {&*bias, "bias"}});
  } else {
    checks::same_device(kOp, {{&x, "x"}, {&weight, "weight"}});
  }
}

namespace {

// x [..., K] -> [..., N] (contiguous, dtype of x)
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  check_decode_linear(x, weight, bias);
  return composite(x, weight, bias).contiguous();
}

at::Tensor decode_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_decode_linear(x, weight, bias);
  auto sizes = x.sym_sizes().vec();
  sizes.back() = weight.sym_size(0);
  return at::empty_symint(sizes, x.options());
}

// With a gradient to compute, ATen's linear (it carries the gradient); the kernel is for
// decoding, where nothing requires grad.
at::Tensor decode_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  const bool needs_grad = x.requires_grad() || weight.requires_grad() ||
                          (bias.has_value() && bias->requires_grad());
  if (!at::GradMode::is_enabled() || !needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gkv::decode_linear(x, weight, bias);
  }
  check_decode_linear(x, weight, bias);
  return composite(x, weight, bias);
}

// Under autocast, ATen's linear runs in the autocast dtype: every floating input is cast there
// (weights through autocast's per-region cache). The same here, so that the op stays a drop-in for
// linear in the decoder, which the trainer runs under bf16 autocast with fp32 weights.
template <c10::DeviceType kDevice>
at::Tensor decode_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  return gkv::decode_linear(at::autocast::cached_cast(dtype, x, kDevice),
                            at::autocast::cached_cast(dtype, weight, kDevice),
                            at::autocast::cached_cast(dtype, bias, kDevice));
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

TORCH_LIBRARY_IMPL(gkv, Meta, m) { m.impl("decode_linear", &decode_linear_meta); }

TORCH_LIBRARY_IMPL(gkv, Autograd, m) { m.impl("decode_linear", &decode_linear_autograd); }

TORCH_LIBRARY_IMPL(gkv, AutocastCUDA, m) {
  m.impl("decode_linear", &decode_linear_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(gkv, AutocastCPU, m) {
  m.impl("decode_linear", &decode_linear_autocast<c10::DeviceType::CPU>);
}

}  // namespace gkv
