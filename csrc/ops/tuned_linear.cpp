#include "ops/tuned_linear.h"

#include <ATen/ATen.h>

#ifdef GKV_WITH_CUBLASLT
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <algorithm>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#endif

namespace gkv {

#ifndef GKV_WITH_CUBLASLT

at::Tensor tuned_linear(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  return at::linear(x, weight, bias);
}

std::vector<TunedLinearChoice> tuned_linear_choices() { return {}; }

#else

namespace {

int64_t rows_of(const at::Tensor& x) {
  return x.dim() == 0 ? 0 : x.numel() / std::max<int64_t>(x.size(-1), 1);
}

void check_lt(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "tuned_linear: ", what, " failed: ",
              cublasGetStatusString(status));
}

// The largest power of two up to 256 that divides the address: cuBLASLt's heuristic assumes
// 256-byte alignment unless told, and an algorithm chosen for one alignment may not run at a lower.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return a == 0 ? 256u : std::min<uint32_t>(256u, static_cast<uint32_t>(a & (~a + 1)));
}

// The descriptors of y [M,N] = x [M,K] weight[N,K]^T (+ bias) for row-major tensors, written as the
// column-major y^T = weight^T' x^T' cuBLASLt computes: A = weight seen as K x N (transposed),
// B = x seen as K x M, C = D = y^T, N x M.
class Problem {
 public:
  Problem(int64_t M, int64_t N, int64_t K, cudaDataType_t type, const void* bias) {
    check_lt(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
    set(CUBLASLT_MATMUL_DESC_TRANSA, transa);
    set(CUBLASLT_MATMUL_DESC_TRANSB, transb);
    if (bias != nullptr) {
      set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
      set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
      set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type);
    }
    check_lt(cublasLtMatrixLayoutCreate(&a_, type, K, N, K), "MatrixLayoutCreate");
    check_lt(cublasLtMatrixLayoutCreate(&b_, type, K, M, K), "MatrixLayoutCreate");
    check_lt(cublasLtMatrixLayoutCreate(&c_, type, N, M, N), "MatrixLayoutCreate");
  }
  ~Problem() {
    cublasLtMatrixLayoutDestroy(c_);
    cublasLtMatrixLayoutDestroy(b_);
    cublasLtMatrixLayoutDestroy(a_);
    cublasLtMatmulDescDestroy(op_);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;

  // Up to `wanted` algorithms by cuBLASLt's heuristic, best guess first.
  std::vector<cublasLtMatmulHeuristicResult_t> candidates(int wanted, uint32_t align_x,
                                                          uint32_t align_w) const {
    cublasLtMatmulPreference_t pref;
    check_lt(cublasLtMatmulPreferenceCreate(&pref), "MatmulPreferenceCreate");
    const std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                          decltype(&cublasLtMatmulPreferenceDestroy)>
        owned(pref, &cublasLtMatmulPreferenceDestroy);
    const uint64_t workspace = kMaxWorkspace;
    check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &workspace, sizeof(workspace)),
             "MatmulPreferenceSetAttribute");
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, kFreshAlignment},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, kFreshAlignment}};
    for (const auto& [attr, value] : aligns) {
      check_lt(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)),
               "MatmulPreferenceSetAttribute");
    }
    std::vector<cublasLtMatmulHeuristicResult_t> found(wanted);
    int count = 0;
    const auto status = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), op_,
                                                       a_, b_, c_, c_, pref, wanted, found.data(),
                                                       &count);
    found.resize(status == CUBLAS_STATUS_SUCCESS ? count : 0);
    return found;
  }

  cublasStatus_t run(const cublasLtMatmulAlgo_t& algo, size_t workspace_bytes, const void* x,
                     const void* w, void* y) const {
    const float one = 1.f, zero = 0.f;
    // From the caching allocator: a replayed graph keeps the block it recorded.
    const auto workspace =
        at::empty({static_cast<int64_t>(std::max<size_t>(workspace_bytes, 1))},
                  at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
    return cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), op_, &one, w, a_, x, b_, &zero,
                          y, c_, y, c_, &algo, workspace.data_ptr(), workspace_bytes,
                          at::cuda::getCurrentCUDAStream());
  }

  static constexpr uint64_t kMaxWorkspace = 32ull << 20;
  // y is always a fresh allocation, which the caching allocator aligns to 512 bytes.
  static constexpr uint32_t kFreshAlignment = 256;

 private:
  template <typename V>
  void set(cublasLtMatmulDescAttributes_t attr, const V& value) {
    check_lt(cublasLtMatmulDescSetAttribute(op_, attr, &value, sizeof(value)),
             "MatmulDescSetAttribute");
  }

  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
};

// Device, shape, dtype, bias and the alignments of x and weight: what the heuristic saw.
using Key = std::tuple<int, int64_t, int64_t, int64_t, int, bool, uint32_t, uint32_t>;

struct Choice {
  std::optional<cublasLtMatmulHeuristicResult_t> algo;  // none: ATen's linear
  TunedLinearChoice report;
};

std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, Choice>& table() {
  static std::map<Key, Choice> t;
  return t;
}

constexpr int kCandidates = 24;
constexpr int kRounds = 5;       // each round times every candidate once, in turn
constexpr int kRunsPerTime = 8;  // GEMMs per timing
// A cuBLASLt algorithm replaces ATen's linear only this much faster, so that timing noise does
// not flip the choice.
constexpr double kMargin = 0.97;

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// Microseconds per call of fn(r), r = 0..kRunsPerTime-1, timed with events on the current stream.
template <typename Fn>
double time_us(const Fn& fn) {
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
  const auto stream = at::cuda::getCurrentCUDAStream();
  start.record(stream);
  for (int r = 0; r < kRunsPerTime; ++r) fn(r);
  stop.record(stream);
  stop.synchronize();
  return start.elapsed_time(stop) * 1e3 / kRunsPerTime;
}

// ATen's linear for the shape, nothing timed: no candidates, NaN times.
Choice untimed(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  Choice choice;
  auto& r = choice.report;
  r.rows = x.size(0), r.n = w.size(0), r.k = w.size(1), r.bias = bias.has_value();
  r.dtype = c10::toString(x.scalar_type());
  r.candidates = 0;
  r.chosen = -1;
  r.aten_us = r.chosen_us = std::numeric_limits<double>::quiet_NaN();
  return choice;
}

// x [M,K] contiguous; y [M,N] scratch for the candidates' results.
Choice tune(const Problem& problem, const at::Tensor& x, const at::Tensor& w,
            const std::optional<at::Tensor>& bias, const at::Tensor& y, uint32_t align_x,
            uint32_t align_w) {
  const auto reference = at::linear(x, w, bias).to(at::kFloat);
  const double scale = reference.abs().max().item<double>();
  auto found = problem.candidates(kCandidates, align_x, align_w);
  // Keep the algorithms that run and agree with ATen's result (bf16 rounding apart).
  std::vector<cublasLtMatmulHeuristicResult_t> usable;
  for (const auto& c : found) {
    if (problem.run(c.algo, c.workspaceSize, x.const_data_ptr(), w.const_data_ptr(),
                    y.data_ptr()) != CUBLAS_STATUS_SUCCESS) {
      continue;
    }
    const double err = (y.to(at::kFloat) - reference).abs().max().item<double>();
    if (err <= 1e-2 * scale + 1e-3) usable.push_back(c);
  }
  // A step reads each layer's weight once, from HBM: timed on one weight that stays in L2 (q/k/v
  // and o fit an H100's 50 MB), an algorithm looked faster than it was among 28 layers' weights.
  // The timed calls therefore take turns over copies of the weight that together exceed L2 twice.
  const int64_t l2_bytes = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
  const int64_t w_bytes = static_cast<int64_t>(w.nbytes());
  const int64_t wanted = std::clamp<int64_t>((2 * l2_bytes + w_bytes - 1) / w_bytes, 1,
                                              kRunsPerTime);
  std::vector<at::Tensor> weights{w};
  // A batch that fills the device may leave no room for the copies: time on fewer, not fail.
  try {
    while (static_cast<int64_t>(weights.size()) < wanted) weights.push_back(w.clone());
  } catch (const c10::OutOfMemoryError&) {
  }
  const auto weight_of = [&](int r) -> const at::Tensor& { return weights[r % weights.size()]; };
  std::vector<std::vector<double>> times(usable.size() + 1);  // [0]: ATen's linear
  for (int round = 0; round < kRounds; ++round) {
    times[0].push_back(time_us([&](int r) { at::linear(x, weight_of(r), bias); }));
    for (size_t i = 0; i < usable.size(); ++i) {
      times[i + 1].push_back(time_us([&](int r) {
        problem.run(usable[i].algo, usable[i].workspaceSize, x.const_data_ptr(),
                    weight_of(r).const_data_ptr(), y.data_ptr());
      }));
    }
  }
  Choice choice = untimed(x, w, bias);
  auto& r = choice.report;
  r.candidates = static_cast<int>(usable.size());
  r.aten_us = r.chosen_us = median(times[0]);
  for (size_t i = 0; i < usable.size(); ++i) {
    const double t = median(times[i + 1]);
    if (t < kMargin * r.aten_us && t < r.chosen_us) {
      r.chosen = static_cast<int>(i);
      r.chosen_us = t;
      choice.algo = usable[i];
    }
  }
  return choice;
}

bool applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const auto dtype = x.scalar_type();
  const int64_t rows = rows_of(x);
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() ||
                           (bias && bias->requires_grad()));
  return x.is_cuda() && weight.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) &&
         weight.scalar_type() == dtype && weight.dim() == 2 && x.dim() >= 1 &&
         x.size(-1) == weight.size(1) && rows >= kTunedLinearMinRows &&
         rows <= kTunedLinearMaxRows && x.stride(-1) == 1 && weight.is_contiguous() &&
         (!bias || (bias->is_cuda() && bias->scalar_type() == dtype && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->is_contiguous())) &&
         !wants_grad && !at::autocast::is_autocast_enabled(at::kCUDA);
}

}  // namespace

at::Tensor tuned_linear(const at::Tensor& x_in, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  if (!applies(x_in, weight, bias)) return at::linear(x_in, weight, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const auto type = x.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const void* bias_ptr = bias ? bias->const_data_ptr() : nullptr;
  const uint32_t ax = alignment(x.const_data_ptr()), aw = alignment(weight.const_data_ptr());
  const Key key{x.get_device(), M, N, K, static_cast<int>(x.scalar_type()), bias.has_value(),
                ax, aw};

  std::optional<cublasLtMatmulHeuristicResult_t> algo;
  {
    std::unique_lock lock(table_mutex());
    auto it = table().find(key);
    if (it == table().end()) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      AT_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
      // Timing syncs the device, which a capture forbids: ATen's linear until an eager call.
      if (capture != cudaStreamCaptureStatusNone) return at::linear(x_in, weight, bias);
      const Problem problem(M, N, K, type, bias_ptr);
      Choice choice;
      try {
        choice = tune(problem, x, weight, bias, at::empty({M, N}, x.options()), ax, aw);
      } catch (const c10::OutOfMemoryError&) {
        // No room for the timing's own scratch (results, workspaces): a device this full keeps
        // ATen's linear for the shape rather than fail a call that ATen alone can serve.
        choice = untimed(x, weight, bias);
      }
      it = table().emplace(key, std::move(choice)).first;
    }
    algo = it->second.algo;
  }
  if (!algo) return at::linear(x_in, weight, bias);
  at::Tensor y = at::empty({M, N}, x.options());
  const Problem problem(M, N, K, type, bias_ptr);
  check_lt(problem.run(algo->algo, algo->workspaceSize, x.const_data_ptr(),
                       weight.const_data_ptr(), y.data_ptr()),
           "cublasLtMatmul");
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

std::vector<TunedLinearChoice> tuned_linear_choices() {
  std::lock_guard lock(table_mutex());
  std::vector<TunedLinearChoice> out;
  for (const auto& [key, choice] : table()) out.push_back(choice.report);
  return out;
}

#endif

}  // namespace gkv
