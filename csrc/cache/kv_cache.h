// CompressedKVCache: the per-layer KV cache of one batch of sequences, preallocated once at
// cap = budget + divide_length slots (FullKV: every token), compressed in place by a Policy on the
// schedule of DESIGN.md "The cache and its invariants".
//
// A forward is begin_prefill / begin_decode, then attend() once per layer (in layer order or not),
// then end_forward(). attend() appends the new keys and values and computes this forward's
// attention over the uncompressed cache; when the schedule says so and the cache holds more than
// the budget, every layer is then selected and compacted (the prefill's as it attends, a later
// forward's in end_forward): eviction takes effect from the next forward.
//
// Positions: a token's position is the count of real tokens before it in its row (left padding
// excluded); pad slots have pos -1. Keys are stored after RoPE at their position.
// Eviction log: death[b, l, h, p] = the first query position that no longer sees the key at
// position p (the position after the forward that evicted it), INT32_MAX if never evicted.
//
// One-token decode forwards keep their per-step state in device memory (the write slot, the
// query ring slot, the positions), updated in place, and attend over a span fixed in advance
// (decode_span) rather than the live length: such a forward launches the same kernels with the
// same arguments every step, so a CUDA graph of it can be replayed (engine::DecodeStepper).
// Slots past the live length hold pos -1, so the span's extra slots are masked; the attention
// also reads the live length from device memory and skips them.
//
// Symbols: B batch, L layers, Hq / Hkv query / KV heads, G = Hq / Hkv, d head_dim, P prompt
// length (padding included), T tokens in this forward, cap slots per head, W queries remembered.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <functional>
#include <vector>

#include "cache/policy.h"

namespace gkv::cache {

struct CacheShape {
  int64_t layers = 1;
  int64_t batch = 1;
  int64_t q_heads = 1;   // Hq
  int64_t kv_heads = 1;  // Hkv
  int64_t head_dim = 1;  // d
  c10::ScalarType dtype = c10::kFloat;
  c10::Device device = c10::kCPU;
};

class CompressedKVCache {
 public:
  // max_tokens: the most tokens one row will ever hold, padding included (prompt + new tokens);
  // it sizes FullKV's cache and the eviction log's position axis. Without eviction_log the cache
  // keeps no death log ([B,L,Hkv,max_tokens] int32, the one allocation that grows with
  // max_tokens under a budget) and death() refuses.
  CompressedKVCache(Policy policy, CacheShape shape, int64_t max_tokens, bool eviction_log = true);

  // attention_mask [B,P] (nonzero = real token; every row needs one) -> positions [B,P] int64
  // for RoPE (pads get 0). Forward 0: compression is tried.
  at::Tensor begin_prefill(const at::Tensor& attention_mask);
  // T new tokens per row -> positions [B,T] int64. The tokens are the forwards i+1 .. i+T; a
  // compression step (a multiple of divide_length) may only be the last of them. For T = 1 the
  // positions are the cache's own buffer, valid until the next begin_decode.
  at::Tensor begin_decode(int64_t tokens);
  // Whether a forward of T new tokens would compress (select and compact) the cache.
  bool decode_compresses(int64_t tokens) const;
  // The slots a one-token forward attends over (masked past the live length): the capacity under
  // a budget, else the live length rounded up to kSpanQuantum, so it changes rarely.
  int64_t decode_span() const;
  static constexpr int64_t kSpanQuantum = 512;
  // What the device work of a one-token forward's compression depends on besides the cache's
  // own buffers: the slots scored, the slots holding history, the slots carrying redundancy
  // exemptions, the query ring's oldest slot. Equal keys, equal kernels with equal arguments.
  using CompressionKey = std::array<int64_t, 4>;
  // Runs `compress` (every layer's selection and compaction, device work only) or replays a CUDA
  // graph recorded from an earlier call with the same key.
  using CompressionRunner =
      std::function<void(const CompressionKey& key, const std::function<void()>& compress)>;
  // One one-token forward whose device work (that of begin_decode(1), every layer's attend and
  // end_forward) is `replay`, a CUDA graph's replay: checks that the forward fits, runs replay,
  // then does the host bookkeeping of those calls; when the forward is a compression step, the
  // compression itself runs here too, after the replay, through run_compression when given.
  void account_replayed_decode(const std::function<void()>& replay,
                               const CompressionRunner& run_compression = nullptr);
  // q [B,Hq,T,d], k/v [B,Hkv,T,d] post-RoPE -> out [B,Hq,T,d] in the dtype of q.
  at::Tensor attend(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
  void end_forward();

  const Policy& policy() const { return policy_; }
  const CacheShape& shape() const { return shape_; }
  int64_t capacity() const { return cap_; }
  int64_t length() const { return length_; }     // live slots per head, every layer
  int64_t forwards() const { return forwards_; }  // forwards done, the prefill included
  // The layer's buffers themselves (not copies), every slot: keys/values [B,Hkv,cap,d],
  // positions [B,Hkv,cap] int32, scores [B,Hkv,cap] fp32.
  const at::Tensor& keys(int64_t layer) const { return layer_at(layer).k; }
  const at::Tensor& values(int64_t layer) const { return layer_at(layer).v; }
  const at::Tensor& positions(int64_t layer) const { return layer_at(layer).pos; }
  const at::Tensor& scores(int64_t layer) const { return layer_at(layer).score; }
  // [B,Hkv,cap] int32, undefined without a redundancy term: slot j's exemption (the slot of its
  // most recent near-copy among the slots [0, carried_length()), -1 none, -2 evicted), carried
  // to the next compression.
  const at::Tensor& exemptions(int64_t layer) const { return layer_at(layer).exempt; }
  int64_t carried_length() const { return carried_len_; }
  // [B,L,Hkv,max_tokens] int32
  at::Tensor death() const;
  bool keeps_eviction_log() const { return death_.defined(); }

 private:
  struct Layer {
    at::Tensor k, v;    // [B,Hkv,cap,d]
    at::Tensor pos;     // [B,Hkv,cap] int32, -1 for padding and empty slots
    at::Tensor score;   // [B,Hkv,cap] fp32: F of slots [0, history_len_), or the accumulated
                        // attention (Observation::accumulate)
    at::Tensor q_ring;  // [B,Hq,W,d]: the last W queries, query n at (n + ring_shift_) % W
    at::Tensor exempt;  // [B,Hkv,cap] int32 with a redundancy term: the exemptions of slots
                        // [0, carried_len_) carried to the next compression (carry_exemptions)
  };
  const Layer& layer_at(int64_t layer) const;
  void check_qkv(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const;
  at::Tensor prefill(Layer& s, int64_t layer, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v);
  at::Tensor extend(Layer& s, int64_t layer, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v);
  // end_forward, with the compression of a later forward run through run_compression.
  void finish_forward(const CompressionRunner& run_compression);
  // Selects and compacts one layer of the forward in progress (its N = length_ + tokens_ slots).
  void compress(Layer& s, int64_t layer);
  // Remembers q [B,Hq,T,d] as queries q_count_ .. q_count_+T-1 (a one-token decode step writes
  // its query with its K and V instead: extend's write_slot_).
  void push_queries(Layer& s, const at::Tensor& q) const;
  // The query ring's slot of its oldest query, after this forward's queries (0 without a ring).
  int64_t oldest_query_slot() const;
  // [B,Hq,W,d] oldest first, after this forward's queries.
  at::Tensor window_queries(const Layer& s) const;
  // pos [B,Hkv,N] int32 of the scored slots, idx [B,Hkv,budget] the kept ones.
  void log_evictions(int64_t layer, const at::Tensor& pos, const at::Tensor& idx);
  void check_decode(int64_t tokens) const;

  Policy policy_;
  CacheShape shape_;
  int64_t max_tokens_;
  int64_t cap_;
  std::vector<Layer> layers_;
  at::Tensor death_;     // [B,L,Hkv,max_tokens+1] int32; the last column absorbs kept slots
  at::Tensor next_pos_;  // [B] int64: position of the next token of each row
  // Device copies of the per-step state, updated in place (see the top of this file).
  at::Tensor step_slots_;    // [2] int64: live_slot_ and attend_end_, advanced by one add
  at::Tensor live_slot_;     // [1] int64: = length_, where a one-token forward writes
  at::Tensor attend_end_;    // [1] int64: = length_ + 1, the slots its attention reads
  at::Tensor ring_slot_;     // [1] int64: (q_count_ + ring_shift_) % W, where it writes its query
  at::Tensor step_pos_;      // [B,1] int64: positions of a one-token forward
  at::Tensor step_new_pos_;  // [B,Hkv,1] int32: the same per KV head

  // State of the forward in progress, shared by its layers.
  int64_t length_ = 0;        // live slots before this forward
  int64_t forwards_ = 0;      // forwards done
  int64_t history_len_ = 0;   // slots [0, history_len_) hold F (after a compression: budget - w)
  int64_t carried_len_ = 0;   // slots [0, carried_len_) hold exempt (after a compression: budget)
  int64_t q_count_ = 0;       // queries seen
  int64_t ring_shift_ = 0;    // query n is at slot (n + ring_shift_) % W of the ring
  int64_t tokens_ = 0;        // T of the forward in progress; 0 when none is
  bool compress_ = false;     // this forward is a compression step
  at::Tensor new_pos_;        // [B,Hkv,T] int32 positions of this forward's tokens, -1 pads
  std::vector<bool> done_;    // layers attended in this forward
};

}  // namespace gkv::cache
