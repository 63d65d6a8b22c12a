#include "engine/decode_step.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#ifdef GKV_WITH_CUDA
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
struct DecodeStepper::Graph {
  at::cuda::CUDAGraph graph;
  int64_t span = -1;   // the decode_span it attends over
  at::Tensor tokens;   // [B,1] int64: its input, written before each replay
  at::Tensor logits;   // [B,V] fp32: its output
};
#else
struct DecodeStepper::Graph {};
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
  return model_.logits(hidden).select(1, 0).to(at::kFloat);
}

at::Tensor DecodeStepper::step(const at::Tensor& tokens) {
  const int64_t B = cache_.shape().batch;
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == B && tokens.scalar_type() == at::kLong,
              "DecodeStepper::step: tokens must be [B] int64 with B = ", B, ", got ",
              tokens.sizes(), " ", tokens.scalar_type());
  at::NoGradGuard no_grad;
  const auto input = tokens.view({B, 1});
  if (!use_graph_) return eager(input);
#ifdef GKV_WITH_CUDA
  const int64_t span = cache_.decode_span();
  if (graph_ && graph_->span == span) {
    graph_->tokens.copy_(input);
    cache_.account_replayed_decode([&] { graph_->graph.replay(); });
    ++replays_;
    return graph_->logits;
  }
  // A graph holds no compression (compaction sizes its work on the host), so a compression
  // step is never the one captured; once the span's graph exists it replays those too.
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
at::Tensor DecodeStepper::capture(const at::Tensor& input, int64_t span) {
  // Capture runs on a side stream (the legacy default stream cannot be captured), ordered after
  // the work already queued on the current one, and everything after it waits for it.
  const c10::cuda::CUDAGuard device_guard(model_.device());
  const auto current = c10::cuda::getCurrentCUDAStream();
  const auto side = c10::cuda::getStreamFromPool();
  if (graph_) current.synchronize();  // the old span's graph may still run: finish it first
  graph_.reset();
  c10::Event queued(c10::DeviceType::CUDA);
  queued.record(current);
  queued.block(side);
  at::Tensor logits;
  {
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    if (!warmed_) {
      // The first graph-eligible step runs eagerly on the side stream instead, so that state the
      // ops make lazily per stream (cuBLAS workspaces) exists before anything is captured.
      logits = eager(input);
      warmed_ = true;
    } else {
      auto g = std::make_unique<Graph>();
      g->span = span;
      g->tokens = input.clone();
      g->graph.capture_begin();
      g->logits = eager(g->tokens);  // recorded, not run; the cache's host state advances here
      g->graph.capture_end();
      graph_ = std::move(g);
    }
  }
  c10::Event done(c10::DeviceType::CUDA);
  done.record(side);
  done.block(current);
  return logits;
}
#endif

}  // namespace gkv::engine
