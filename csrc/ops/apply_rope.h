// The argument check of gkv::apply_rope, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// x [B,H,T,d] float32/bfloat16/float16 (float64 too: gradcheck), d even; cos/sin of x's dtype on
// x's device, each of shape [B or 1, H or 1, T or 1, d] (broadcast to x's shape). Works on
// symbolic sizes (Meta).
void check_apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace gkv
