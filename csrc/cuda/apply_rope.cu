// CUDA adapter of gkv::apply_rope: checks (shared with the CPU kernel), strides (x is read in
// place through its strides, cos/sin through broadcast strides; only an innermost stride other
// than 1 costs a copy), dtype and vector-width dispatch, launch on the current stream. It makes
// no views: at a decode step every extra ATen call is host time the fusion is meant to save.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/dispatch.h"
#include "kernels/apply_rope.cuh"
#include "ops/apply_rope.h"

namespace gkv {
namespace {

constexpr const char* kOp = "apply_rope";

// t with innermost stride 1 (a copy only when it is not).
at::Tensor rows_readable(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// The strides of dims 0..2 of t broadcast to x: 0 where t has size 1.
void broadcast_strides(const at::Tensor& t, int64_t* strides) {
  for (int i = 0; i < 3; ++i) strides[i] = t.size(i) == 1 ? 0 : t.stride(i);
}

// x [B,H,T,d], cos/sin [B|1,H|1,T|1,d] -> [B,H,T,d] contiguous
at::Tensor apply_rope_cuda(const at::Tensor& x_in, const at::Tensor& cos_in,
                           const at::Tensor& sin_in) {
  check_apply_rope(x_in, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_readable(x_in);
  const at::Tensor cos = rows_readable(cos_in), sin = rows_readable(sin_in);
  at::Tensor out = at::empty(x.sizes(), x.options());
  kernels::RopeParams p{};
  p.x = x.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.out = out.data_ptr();
  broadcast_strides(x, p.x_stride);
  broadcast_strides(cos, p.cos_stride);
  broadcast_strides(sin, p.sin_stride);
  p.H = x.size(1);
  p.T = x.size(2);
  p.half = x.size(3) / 2;
  p.rows = x.size(0) * x.size(1) * x.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GKV_DISPATCH_FLOATING(kOp, x.scalar_type(), [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = vectorizable(
        kVec, {p.half, p.x_stride[0], p.x_stride[1], p.x_stride[2], p.cos_stride[0],
               p.cos_stride[1], p.cos_stride[2], p.sin_stride[0], p.sin_stride[1], p.sin_stride[2]},
        {p.x, p.cos, p.sin, p.out});
    if (vec) {
      GKV_CUDA_CHECK(kOp, (kernels::apply_rope_launch<scalar_t, kVec>(p, stream)));
    } else {
      GKV_CUDA_CHECK(kOp, (kernels::apply_rope_launch<scalar_t, 1>(p, stream)));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gkv, CUDA, m) { m.impl("apply_rope", &apply_rope_cuda); }

}  // namespace gkv
