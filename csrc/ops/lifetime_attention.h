// Argument checks of gkv::lifetime_attention and gkv::lifetime_attention_backward, shared by the
// CPU, Meta and CUDA kernels so every backend rejects the same inputs with the same message.
#pragma once

#include <ATen/core/Tensor.h>

namespace gkv {

// q [B,Hq,T,d], k/v [B,Hkv,T,d], death [B,Hkv,T] int32; Hq a multiple of Hkv; one device.
// Float tensors are float32/bfloat16/float16, all of one dtype; allow_double also admits float64
// (the CPU oracle and its Meta twin accept it so that gradcheck can run in double precision).
void check_lifetime_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& death, bool allow_double);

// The forward's checks, plus grad_out/out [B,Hq,T,d] of q's dtype and lse [B,Hq,T] float32.
void check_lifetime_attention_backward(const char* op, const at::Tensor& grad_out,
                                       const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& death,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       bool allow_double);

}  // namespace gkv
