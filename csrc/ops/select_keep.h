// Argument checks of gkv::select_keep, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// score [B,Hkv,M] fp32; 0 <= keep <= M; window >= 0.
void check_select_keep(const at::Tensor& score, int64_t keep, int64_t window);

}  // namespace gkv
