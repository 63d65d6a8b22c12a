// The argument check of gkv::silu_mul, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// x [..., 2F] float32/bfloat16/float16 (float64 too: gradcheck), F >= 1. Works on symbolic sizes
// (Meta).
void check_silu_mul(const at::Tensor& x);

}  // namespace gkv
