// DecodeStepper: the one-token decode forward of a model through its compressed cache, replayed
// from a CUDA graph where it can be. An eager decode step is ~30 small kernels per layer, each
// launched by the host; the graph launches them all at once, so the step costs what the GPU
// needs rather than what the host needs to launch it.
//
// A step is replayed when it runs on CUDA and attends over the span the graph was captured with
// (one span under a budget; FullKV's grows by CompressedKVCache::kSpanQuantum, and the graph is
// captured again). A compression step (every divide_length steps) replays the same graph, then
// compresses: eagerly the first time, then from a second graph recorded for the cache's
// CompressionKey (one key under a budget once the cache is full, so one capture). The replays
// are the eager steps' own kernels with the same arguments, so both give the same bits; the
// cache's host bookkeeping goes through account_replayed_decode.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>

#include "cache/kv_cache.h"
#include "model/decoder.h"

namespace gkv::engine {

// The model's attention step backed by a cache.
class CacheAttention final : public model::Attention {
 public:
  explicit CacheAttention(cache::CompressedKVCache& cache) : cache_(cache) {}
  at::Tensor forward(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v) override {
    return cache_.attend(layer, q, k, v);
  }

 private:
  cache::CompressedKVCache& cache_;
};

// One forward through the cache, after its begin_prefill / begin_decode gave `positions`:
// tokens [B,T] -> final hidden states [B,T,D].
at::Tensor cached_forward(const model::Decoder& model, cache::CompressedKVCache& cache,
                          const at::Tensor& tokens, const at::Tensor& positions);

class DecodeStepper {
 public:
  // The model and the cache must outlive the stepper; the cache must hold a finished prefill
  // before the first step. cuda_graph = false: every step eager.
  DecodeStepper(const model::Decoder& model, cache::CompressedKVCache& cache, bool cuda_graph);
  ~DecodeStepper();
  DecodeStepper(const DecodeStepper&) = delete;
  DecodeStepper& operator=(const DecodeStepper&) = delete;

  // tokens [B] int64 (one new token per row) -> logits [B,V] of the next token, in the model's
  // dtype as the lm_head wrote them: a greedy pick reads them as they are, and a sampler that
  // wants fp32 converts them exactly (a bf16 step at B=437 would spend 0.2 ms converting its
  // 137 MB of logits). The returned tensor may be overwritten by the next step.
  at::Tensor step(const at::Tensor& tokens);
  int64_t replays() const { return replays_; }  // steps that were graph replays
  int64_t compression_replays() const { return compression_replays_; }  // and compressions

 private:
  at::Tensor eager(const at::Tensor& tokens);  // tokens [B,1]
  // CUDA builds: makes graph_ the captured step for `span` (host bookkeeping done, device work
  // left to a replay) and returns an undefined tensor, or, the first time, runs the step eagerly
  // on the capture stream (a warm-up) and returns its logits.
  at::Tensor capture(const at::Tensor& input, int64_t span);
  // CUDA builds: runs work on a side stream that a capture may use, ordered after the current
  // stream's queued work (all of it finished first when finish_graphs: a graph is to be freed),
  // and orders the current stream after it.
  void on_capture_stream(bool finish_graphs, const std::function<void()>& work);
  // The cache's CompressionRunner: replays compression_ when its key matches, else runs compress
  // eagerly (the first time) or records it into a new compression_ and replays that.
  void run_compression(const cache::CompressedKVCache::CompressionKey& key,
                       const std::function<void()>& compress);

  const model::Decoder& model_;
  cache::CompressedKVCache& cache_;
  bool use_graph_;
  bool warmed_ = false;              // a step already ran on the capture stream
  bool compression_warmed_ = false;  // a compression already ran after a replay
  int64_t replays_ = 0;
  int64_t compression_replays_ = 0;
  struct Graph;  // CUDA only: defined in decode_step.cpp
  std::unique_ptr<Graph> graph_;
  struct CompressionGraph;  // CUDA only: defined in decode_step.cpp
  std::unique_ptr<CompressionGraph> compression_;
  struct GeneratorAnchor;  // CUDA only: a graph never captured (decode_step.cpp says why)
  std::unique_ptr<GeneratorAnchor> generator_anchor_;
};

}  // namespace gkv::engine
