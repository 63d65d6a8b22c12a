// The argument checks of gkv::rms_norm and gkv::add_rms_norm, shared by their CPU, Meta and CUDA
// kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// x [..., D] float32/bfloat16/float16 (float64 too: gradcheck), D >= 1, weight [D] of x's dtype on
// x's device, eps >= 0. Works on symbolic sizes (Meta).
void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// As check_rms_norm, and residual of x's shape, dtype and device.
void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        double eps);

}  // namespace gkv
