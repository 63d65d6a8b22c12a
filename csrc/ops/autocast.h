// Autocast kernels of the fused elementwise ops (rms_norm, add_rms_norm, apply_rope). Under
// autocast the decoder's activations come out of linear layers in the low-precision dtype while the
// norm weights, the RoPE tables and the residual stream stay fp32; the composite formulas these ops
// replace promoted such mixes, so the Autocast kernels cast every input to the promoted floating
// type and call the op below autocast. Inputs that are not all floating pass through unchanged,
// for the op's own check.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <tuple>

namespace gkv {

// Calls op(casted inputs..., rest...) with autocast excluded.
template <size_t N, typename Op, typename... Rest>
auto call_promoted(const std::array<at::Tensor, N>& inputs, Op&& op, Rest... rest) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  bool floating = true;
  at::ScalarType common = inputs[0].scalar_type();
  for (const at::Tensor& t : inputs) {
    floating = floating && at::isFloatingType(t.scalar_type());
    common = at::promote_types(common, t.scalar_type());
  }
  std::array<at::Tensor, N> cast = inputs;
  if (floating) {
    for (at::Tensor& t : cast) t = t.to(common);
  }
  return std::apply([&](const auto&... ts) { return op(ts..., rest...); }, cast);
}

}  // namespace gkv
