// Argument checks of gkv::redundancy_scores and gkv::redundancy_scores_carry, shared by its CPU, Meta and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// k [B,Hkv,N,d] fp32/bf16/fp16, pos [B,Hkv,N] int32 on k's device; threshold not NaN.
void check_redundancy_scores(const at::Tensor& k, const at::Tensor& pos, double threshold);
// The same, and carried [B,Hkv,M] int32 with M <= N on k's device.
void check_redundancy_scores_carry(const at::Tensor& k, const at::Tensor& pos,
                                   const at::Tensor& carried, double threshold);

}  // namespace gkv
