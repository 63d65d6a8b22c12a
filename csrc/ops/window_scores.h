// The argument check of gkv::window_scores, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// q_win [B,Hq,W,d], k [B,Hkv,N,d] (dtype of q_win), pos [B,Hkv,N] int32, 1 <= W <= N,
// Hq % Hkv == 0. Works on symbolic sizes (Meta).
void check_window_scores(const at::Tensor& q_win, const at::Tensor& k, const at::Tensor& pos);

}  // namespace gkv
