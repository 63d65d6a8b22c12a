#include "engine/decode_step.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#ifdef GKV_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace gkv::engine {

at::Tensor cached_forward(const model::Decoder& model, cache::CompressedKVCache& cache,
                          const at::Tensor& tokens, const at::Tensor& positions) {
  CacheAttention attention(cache);
  auto hidden = model.hidden_states(tokens, positions, attention);
  cache.end_forward();
  return hidden;
}

#ifdef GKV_WITH_CUDA
namespace {
// Records work() into graph. If it throws (out of memory, say), the capture is ended before the
// error goes on: a stream left capturing makes every later cudaMalloc on the device fail, so a
// caller that catches the error and retries smaller (a batch search) could not go on.
void record(at::cuda::CUDAGraph& graph, const std::function<void()>& work,
            at::cuda::MempoolId_t pool = {0, 0}) {
  graph.capture_begin(pool);
  try {
    work();
  } catch (...) {
    try {
      graph.capture_end();
    } catch (...) {  // the first error is the one to report
    }
    throw;
  }
  graph.capture_end();
}
}  // namespace

struct DecodeStepper::Graph {
  at::cuda::CUDAGraph graph;
  int64_t span = -1;   // the decode_span it attends over
  at::Tensor tokens;   // [B,1] int64: its input, written before each replay
  at::Tensor logits;   // [B,V] in the model's dtype: its output
};
// A compression recorded after a replayed decode step, for the cache's state `key`.
struct DecodeStepper::CompressionGraph {
  at::cuda::CUDAGraph graph;
  cache::CompressedKVCache::CompressionKey key{};
};
// torch 2.11's capture_begin adds the device's default generator to the graph before the
// generator's first registration allocates its seed and offset; an out-of-memory error in between
// leaves a graph whose destructor aborts the process. This graph is never captured: registered
// once, at the warm-up, it keeps the generator registered, so no capture's registration allocates.
struct DecodeStepper::GeneratorAnchor {
  at::cuda::CUDAGraph graph;
  explicit GeneratorAnchor(c10::DeviceIndex device) {
    graph.register_generator_state(at::cuda::detail::getDefaultCUDAGenerator(device));
  }
};
#else
struct DecodeStepper::Graph {};
struct DecodeStepper::CompressionGraph {};
struct DecodeStepper::GeneratorAnchor {};
#endif

DecodeStepper::DecodeStepper(const model::Decoder& model, cache::CompressedKVCache& cache,
                             bool cuda_graph)
    : model_(model), cache_(cache), use_graph_(cuda_graph && model.device().is_cuda()) {
#ifndef GKV_WITH_CUDA
  use_graph_ = false;
#endif
}

DecodeStepper::~DecodeStepper() = default;

at::Tensor DecodeStepper::eager(const at::Tensor& tokens) {
  const auto positions = cache_.begin_decode(1);
  const auto hidden = cached_forward(model_, cache_, tokens, positions);
  return model_.logits(hidden).select(1, 0);
}

at::Tensor DecodeStepper::step(const at::Tensor& tokens) {
  const int64_t B = cache_.shape().batch;
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == B && tokens.scalar_type() == at::kLong,
              "DecodeStepper::step: tokens must be [B] int64 with B = ", B, ", got ",
              tokens.sizes(), " ", tokens.scalar_type());
  // The forward checks CPU ids only after begin_decode, so a bad id would leave the cache
  // mid-forward, refusing every later step: checked first here (on CUDA it would sync).
  if (tokens.device().is_cpu()) {
    model::check_token_range(tokens, model_.config().vocab_size, "DecodeStepper::step");
  }
  at::NoGradGuard no_grad;
  const auto input = tokens.view({B, 1});
  if (!use_graph_) return eager(input);
#ifdef GKV_WITH_CUDA
  const int64_t span = cache_.decode_span();
  if (graph_ && graph_->span == span) {
    graph_->tokens.copy_(input);
    cache_.account_replayed_decode(
        [&] { graph_->graph.replay(); },
        [&](const auto& key, const auto& compress) { run_compression(key, compress); });
    ++replays_;
    return graph_->logits;
  }
  // The decode graph holds no compression, so a compression step is never the one captured;
  // once the span's graph exists it replays those too, then runs their compression.
  if (cache_.decode_compresses(1)) return eager(input);
  if (const auto warm_up = capture(input, span); warm_up.defined()) return warm_up;
  graph_->graph.replay();  // the capture advanced the cache's host state as it recorded
  ++replays_;
  return graph_->logits;
#else
  return eager(input);
#endif
}

#ifdef GKV_WITH_CUDA
void DecodeStepper::on_capture_stream(bool finish_graphs, const std::function<void()>& work) {
  // Capture runs on a side stream (the legacy default stream cannot be captured), ordered after
  // the work already queued on the current one, and everything after it waits for it.
  const c10::cuda::CUDAGuard device_guard(model_.device());
  const auto current = c10::cuda::getCurrentCUDAStream();
  const auto side = c10::cuda::getStreamFromPool();
  if (finish_graphs) current.synchronize();  // a graph about to be freed may still run
  c10::Event queued(c10::DeviceType::CUDA);
  queued.record(current);
  queued.block(side);
  {
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    work();
  }
  c10::Event done(c10::DeviceType::CUDA);
  done.record(side);
  done.block(current);
}

at::Tensor DecodeStepper::capture(const at::Tensor& input, int64_t span) {
  at::Tensor logits;
  on_capture_stream(graph_ != nullptr, [&] {
    graph_.reset();
    if (!warmed_) {
      // The first graph-eligible step runs eagerly on the side stream instead, so that state the
      // ops make lazily per stream (cuBLAS workspaces) exists before anything is captured.
      logits = eager(input);
      generator_anchor_ = std::make_unique<GeneratorAnchor>(model_.device().index());
      warmed_ = true;
      return;
    }
    auto g = std::make_unique<Graph>();
    g->span = span;
    g->tokens = input.clone();
    // Recorded, not run; the cache's host state advances here.
    record(g->graph, [&] { g->logits = eager(g->tokens); });
    graph_ = std::move(g);
  });
  return logits;
}

void DecodeStepper::run_compression(const cache::CompressedKVCache::CompressionKey& key,
                                    const std::function<void()>& compress) {
  if (!compression_ || compression_->key != key) {
    if (!compression_warmed_) {
      // The first one runs eagerly: the kernels' one-time host setup (shared-memory attributes,
      // occupancy queries) happens outside any capture.
      compress();
      compression_warmed_ = true;
      return;
    }
    on_capture_stream(compression_ != nullptr, [&] {
      compression_.reset();
      auto g = std::make_unique<CompressionGraph>();
      g->key = key;
      // The decode graph's pool: its temporaries and these are never live at the same time (the
      // two graphs replay one after the other on one stream), so they share the memory.
      record(g->graph, compress, graph_->graph.pool());  // recorded, not run
      compression_ = std::move(g);
    });
  }
  compression_->graph.replay();
  ++compression_replays_;
}
#endif

}  // namespace gkv::engine
