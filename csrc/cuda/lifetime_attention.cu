// CUDA adapter of gkv::lifetime_attention and gkv::lifetime_attention_backward: checks the
// tensors (the CPU kernel's checks), makes them contiguous, dispatches dtype and head_dim, and
// launches csrc/kernels/lifetime_attention{,_bwd}.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "cuda/dispatch.h"
#include "kernels/lifetime_attention.cuh"
#include "kernels/lifetime_attention_bwd.cuh"
#include "ops/lifetime_attention.h"

namespace gkv {
namespace {

namespace lk = kernels::lifetime;

lk::Shape shape_of(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, "gkv::", op, ": B * Hq = ", q.size(0) * q.size(1),
              " exceeds the CUDA kernels' grid limit of 65535");
  TORCH_CHECK(q.size(2) < std::numeric_limits<int32_t>::max(), "gkv::", op, ": T = ", q.size(2),
              " must fit in int32");
  return {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
          static_cast<int>(q.size(2))};
}

// Contiguous and 16-byte aligned (the kernels copy rows with 16-byte cp.async); a contiguous view
// at an odd storage offset is copied.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

at::Tensor stats_workspace(const lk::Shape& s, const at::Tensor& like) {
  return at::empty({lk::stats_elems(s), 2}, like.options().dtype(at::kInt));
}

std::tuple<at::Tensor, at::Tensor> lifetime_attention_cuda(const at::Tensor& q,
                                                           const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const at::Tensor& death,
                                                           double scale) {
  constexpr const char* op = "lifetime_attention";
  check_lifetime_attention(op, q, k, v, death, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(q.device());
  const lk::Shape s = shape_of(op, q, k);
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v), dc = death.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  at::Tensor stats = stats_workspace(s, q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(op, q.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(op, q.size(3), [&] {
      GKV_CUDA_CHECK(op, (lk::forward<scalar_t, kHeadDim>(
                             reinterpret_cast<const scalar_t*>(qc.const_data_ptr()),
                             reinterpret_cast<const scalar_t*>(kc.const_data_ptr()),
                             reinterpret_cast<const scalar_t*>(vc.const_data_ptr()),
                             dc.const_data_ptr<int32_t>(),
                             reinterpret_cast<scalar_t*>(out.mutable_data_ptr()),
                             lse.mutable_data_ptr<float>(),
                             reinterpret_cast<int2*>(stats.mutable_data_ptr<int32_t>()), s,
                             static_cast<float>(scale), stream)));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifetime_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& death, const at::Tensor& out, const at::Tensor& lse, double scale) {
  constexpr const char* op = "lifetime_attention_backward";
  check_lifetime_attention_backward(op, grad_out, q, k, v, death, out, lse,
                                    /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(q.device());
  const lk::Shape s = shape_of(op, q, k);
  const at::Tensor gc = dense(grad_out), qc = dense(q), kc = dense(k), vc = dense(v);
  const at::Tensor oc = out.contiguous(), dc = death.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  at::Tensor stats = stats_workspace(s, q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(op, q.scalar_type(), [&] {
    GKV_DISPATCH_HEAD_DIM(op, q.size(3), [&] {
      GKV_CUDA_CHECK(op, (lk::backward<scalar_t, kHeadDim>(
                             reinterpret_cast<const scalar_t*>(gc.const_data_ptr()),
                             reinterpret_cast<const scalar_t*>(qc.const_data_ptr()),
                             reinterpret_cast<const scalar_t*>(kc.const_data_ptr()),
                             reinterpret_cast<const scalar_t*>(vc.const_data_ptr()),
                             dc.const_data_ptr<int32_t>(),
                             reinterpret_cast<const scalar_t*>(oc.const_data_ptr()),
                             lc.const_data_ptr<float>(),
                             reinterpret_cast<scalar_t*>(dq.mutable_data_ptr()),
                             reinterpret_cast<scalar_t*>(dk.mutable_data_ptr()),
                             reinterpret_cast<scalar_t*>(dv.mutable_data_ptr()),
                             delta.mutable_data_ptr<float>(),
                             reinterpret_cast<int2*>(stats.mutable_data_ptr<int32_t>()), s,
                             static_cast<float>(scale), stream)));
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) {
  m.impl("lifetime_attention", &lifetime_attention_cuda);
  m.impl("lifetime_attention_backward", &lifetime_attention_backward_cuda);
}

}  // namespace gkv
