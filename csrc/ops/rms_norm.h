// The argument check of gkv::rms_norm, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// x [..., D] float32/bfloat16/float16 (float64 too: gradcheck), D >= 1, weight [D] of x's dtype on
// x's device, eps >= 0. Works on symbolic sizes (Meta).
void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace gkv
