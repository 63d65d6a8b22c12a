// A decode step's projections at a large batch through the cuBLASLt algorithm that timed fastest
// for their shape. cuBLAS picks one algorithm per shape by heuristic; at some row counts its pick
// is well off the best it has (docs/benchmarks.md, "GEMM algorithms timed per shape"), and a
// serving batch runs the same few shapes millions of times, so timing the candidates once pays.
// Not an op of the gkv library: the result is ATen's linear's, only the GEMM algorithm differs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gkv {

// Rows (x's leading dimensions flattened) that tuned_linear times; fewer go to gkv::decode_linear
// or ATen, more (a prefill) are too varied to time each shape and run well under cuBLAS's pick.
inline constexpr int64_t kTunedLinearMinRows = 17;
inline constexpr int64_t kTunedLinearMaxRows = 1024;

// linear(x, weight, bias) for x [..., K], weight [N, K], bias [N]. It takes a CUDA build with
// cuBLASLt, CUDA tensors in bf16 or fp16 with rows in [kTunedLinearMinRows, kTunedLinearMaxRows],
// x with unit column stride, weight and bias contiguous, no gradient wanted and no autocast
// region; anything else goes to ATen's linear. The first call of a shape,
// outside a CUDA graph capture, times ATen's linear and cuBLASLt's heuristic candidates a few
// times each (milliseconds; over copies of the weight that exceed the L2 cache, since a step
// reads its weights from HBM) and keeps the fastest whose result agrees with ATen's; a call inside a
// capture for a shape not yet timed runs ATen's linear.
at::Tensor tuned_linear(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias);

// What the timing chose, per shape, for the benchmarks' tables.
struct TunedLinearChoice {
  int64_t rows, n, k;
  bool bias;
  std::string dtype;
  int candidates;    // cuBLASLt algorithms timed (besides ATen's linear)
  int chosen;        // index of the chosen one among them, -1 for ATen's linear
  // Median times of ATen's linear and of the chosen candidate; NaN when the device had no room
  // for the timing's scratch and the shape kept ATen's linear untimed.
  double aten_us;
  double chosen_us;
};
std::vector<TunedLinearChoice> tuned_linear_choices();

}  // namespace gkv
