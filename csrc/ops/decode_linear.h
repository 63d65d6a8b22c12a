// The argument check of gkv::decode_linear, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gkv {

// x [..., K], weight [N, K], bias [N] or none, all of one float dtype (float64 too: gradcheck)
// and one device. Works on symbolic sizes (Meta).
void check_decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias);

}  // namespace gkv
