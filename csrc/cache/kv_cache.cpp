#include "cache/kv_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>

#include <unistd.h>

#include "ops.h"

namespace gkv::cache {

namespace {

constexpr int32_t kNever = std::numeric_limits<int32_t>::max();

// Attention of the last T of N slots (query t is slot N-T+t) over the slots j <= N-T+t whose pos
// is >= 0; a query also always sees its own slot, so a pad query's (unused) output stays finite.
// q [B,Hq,T,d], k/v [B,Hkv,N,d], pos [B,Hkv,N] int32 -> out [B,Hq,T,d]. When acc [B,Hkv,N] fp32
// is given, adds to it the sum over the real (pos >= 0) queries of the max over the group of the
// probabilities.
at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& pos, const std::optional<at::Tensor>& acc) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), N = k.size(2), G = Hq / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const auto opts = pos.options().dtype(at::kLong);
  const auto j = at::arange(N, opts);                          // [N]
  const auto slot = at::arange(N - T, N, opts).unsqueeze(1);  // [T,1]
  const auto visible = j.le(slot).logical_and(pos.ge(0).unsqueeze(2)).logical_or(j.eq(slot));
  // visible [B,Hkv,T,N]
  if (!acc) {
    // The G query heads of a KV head become G * T query rows of that head: SDPA's masked
    // kernels take no GQA (enable_gqa falls back to the math path, which copies K and V G times:
    // 30 GB a layer at B=128 and 16K slots).
    const auto mask = visible.unsqueeze(2).expand({B, Hkv, G, T, N}).reshape({B, Hkv, G * T, N});
    return at::scaled_dot_product_attention(q.reshape({B, Hkv, G * T, d}), k, v, mask, 0.0,
                                            /*is_causal=*/false, scale)
        .reshape({B, Hq, T, d});
  }
  // In fp32 (the probabilities feed eviction decisions), with the same G * T rows per KV head: a
  // matmul broadcasting K over the group would copy it G times.
  const auto rows = q.to(at::kFloat).reshape({B, Hkv, G * T, d});
  auto s = at::matmul(rows, k.to(at::kFloat).transpose(-1, -2)).mul_(scale).view({B, Hkv, G, T, N});
  s.masked_fill_(visible.logical_not().unsqueeze(2), -std::numeric_limits<float>::infinity());
  const auto p = at::softmax(s, -1);                                // [B,Hkv,G,T,N]
  const auto real_query = pos.narrow(2, N - T, T).ge(0).unsqueeze(-1);  // [B,Hkv,T,1]
  acc->add_(std::get<0>(p.max(2)).mul_(real_query).sum(2));        // [B,Hkv,N]
  return at::matmul(p.view({B, Hkv, G * T, N}), v.to(at::kFloat))
      .view({B, Hq, T, d})
      .to(q.scalar_type());
}

// The prompt's causal attention through gkv::lifetime_attention: O(P) mask state instead of the
// P x P mask, so prompts of many thousand tokens fit. Pads (pos -1) die at their own slot, so no
// query sees them; a pad query sees nothing and gets 0 (unused).
// q [B,Hq,P,d], k/v [B,Hkv,P,d], pos [B,Hkv,P] int32 -> out [B,Hq,P,d]
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& pos) {
  const auto slot = at::arange(pos.size(2), pos.options()).expand_as(pos);
  const auto death = at::where(pos.ge(0), at::full_like(pos, kNever), slot).contiguous();
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  return std::get<0>(gkv::lifetime_attention(q, k, v, death, scale));
}

// Refuses a CPU cache larger than the machine's physical memory, naming what made it so. Under
// memory overcommit (vm.overcommit_memory = 1) such an allocation does not fail, and filling it
// gets the process killed instead of raising an error.
void check_fits_host_memory(const CacheShape& s, int64_t cap, int64_t observed_queries,
                            int64_t max_tokens, bool eviction_log, bool carries_exemptions) {
  if (!s.device.is_cpu()) return;  // the CUDA allocator refuses what it cannot hold
  const double elem = static_cast<double>(c10::elementSize(s.dtype));
  const double slots = static_cast<double>(s.layers) * s.batch * s.kv_heads * cap;
  double bytes = slots * (2 * s.head_dim * elem + 2 * 4);  // K, V, pos (int32), score (fp32)
  if (carries_exemptions) bytes += slots * 4;               // exempt (int32)
  bytes += static_cast<double>(s.layers) * s.batch * s.q_heads * observed_queries * s.head_dim *
           elem;  // the query ring
  if (eviction_log) {
    bytes += static_cast<double>(s.batch) * s.layers * s.kv_heads * (max_tokens + 1.0) * 4;
  }
  const double host = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  constexpr double kGiB = 1 << 30;
  TORCH_CHECK(host <= 0 || bytes <= host, "CompressedKVCache: the cache needs ",
              static_cast<int64_t>(std::ceil(bytes / kGiB)), " GiB (batch ", s.batch, ", ",
              s.layers, " layers, ", cap, " slots for max_tokens = ", max_tokens,
              eviction_log ? ", with the eviction log" : "",
              "), more than this machine's ", static_cast<int64_t>(host / kGiB),
              " GiB of memory");
}

}  // namespace

CompressedKVCache::CompressedKVCache(Policy policy, CacheShape shape, int64_t max_tokens,
                                     bool eviction_log)
    : policy_(std::move(policy)), shape_(shape), max_tokens_(max_tokens) {
  policy_.validate();
  const auto& s = shape_;
  TORCH_CHECK(s.layers >= 1 && s.batch >= 1 && s.kv_heads >= 1 && s.head_dim >= 1,
              "CompressedKVCache: layers, batch, kv_heads and head_dim must be >= 1");
  TORCH_CHECK(s.q_heads >= s.kv_heads && s.q_heads % s.kv_heads == 0, "CompressedKVCache: q_heads (",
              s.q_heads, ") must be a multiple of kv_heads (", s.kv_heads, ")");
  TORCH_CHECK(s.dtype == at::kFloat || s.dtype == at::kBFloat16 || s.dtype == at::kHalf,
              "CompressedKVCache: dtype must be float32, bfloat16 or float16, got ", s.dtype);
  TORCH_CHECK(max_tokens >= 1, "CompressedKVCache: max_tokens must be >= 1, got ", max_tokens);
  cap_ = policy_.budget ? std::min(*policy_.budget + policy_.divide_length, max_tokens) : max_tokens;
  const auto kv_opts = at::TensorOptions().dtype(s.dtype).device(s.device);
  const auto f32 = kv_opts.dtype(at::kFloat);
  const int64_t W = policy_.observed_queries();
  // The redundancy term's exemptions are carried between compressions (Layer::exempt).
  const bool carries_exemptions = policy_.budget && policy_.lambda < 1;
  check_fits_host_memory(s, cap_, W, max_tokens, eviction_log, carries_exemptions);
  layers_.resize(s.layers);
  // Slots past the live length are masked (pos -1) where read: NaN there makes any leak show.
  for (auto& l : layers_) {
    l.k = at::full({s.batch, s.kv_heads, cap_, s.head_dim}, NAN, kv_opts);
    l.v = at::full({s.batch, s.kv_heads, cap_, s.head_dim}, NAN, kv_opts);
    l.pos = at::full({s.batch, s.kv_heads, cap_}, -1, kv_opts.dtype(at::kInt));
    l.score = at::zeros({s.batch, s.kv_heads, cap_}, f32);
    if (W > 0) l.q_ring = at::full({s.batch, s.q_heads, W, s.head_dim}, NAN, kv_opts);
    if (carries_exemptions) {
      l.exempt = at::full({s.batch, s.kv_heads, cap_}, -2, kv_opts.dtype(at::kInt));
    }
  }
  if (eviction_log) {
    death_ = at::full({s.batch, s.layers, s.kv_heads, max_tokens + 1}, kNever,
                      kv_opts.dtype(at::kInt));
  }
  const auto i64 = kv_opts.dtype(at::kLong);
  step_slots_ = at::arange(2, i64);  // length_ = 0
  live_slot_ = step_slots_.narrow(0, 0, 1);
  attend_end_ = step_slots_.narrow(0, 1, 1);
  ring_slot_ = at::zeros({1}, i64);
  step_pos_ = at::zeros({s.batch, 1}, i64);
  step_new_pos_ = at::zeros({s.batch, s.kv_heads, 1}, kv_opts.dtype(at::kInt));
  // "cuda" means the current device: name it, so device checks compare like with like.
  shape_.device = step_slots_.device();
}

const CompressedKVCache::Layer& CompressedKVCache::layer_at(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < shape_.layers, "CompressedKVCache: layer must be in [0, ",
              shape_.layers, "), got ", layer);
  return layers_[layer];
}

at::Tensor CompressedKVCache::death() const {
  TORCH_CHECK(death_.defined(), "death: this cache keeps no eviction log (made with eviction_log "
              "= false)");
  return death_.narrow(3, 0, max_tokens_);
}

at::Tensor CompressedKVCache::begin_prefill(const at::Tensor& attention_mask) {
  TORCH_CHECK(forwards_ == 0 && tokens_ == 0, "begin_prefill: the cache already holds a prefill");
  TORCH_CHECK(attention_mask.dim() == 2 && attention_mask.size(0) == shape_.batch,
              "begin_prefill: attention_mask must be [B,P] with B = ", shape_.batch, ", got ",
              attention_mask.sizes());
  const int64_t P = attention_mask.size(1);
  TORCH_CHECK(P >= 1 && P <= max_tokens_, "begin_prefill: the prompt length P = ", P,
              " must be in [1, max_tokens = ", max_tokens_, "]");
  const auto real = attention_mask.to(shape_.device).ne(0);  // [B,P]
  next_pos_ = real.sum(1);                                    // [B]
  TORCH_CHECK(next_pos_.gt(0).all().item<bool>(),
              "begin_prefill: every row of attention_mask needs at least one real token");
  const auto positions = real.to(at::kLong).cumsum(1) - 1;     // [B,P]
  new_pos_ = at::where(real, positions, -1).to(at::kInt).unsqueeze(1).expand(
      {shape_.batch, shape_.kv_heads, P}).contiguous();
  tokens_ = P;
  compress_ = true;
  // Compressions see the query n = P - W + k * divide_length oldest: when W divides
  // divide_length, this shift puts it at slot 0 of the ring, so the window needs no roll.
  const int64_t W = policy_.observed_queries();
  ring_shift_ = W > 0 ? (W - P % W) % W : 0;
  ring_slot_.fill_(ring_shift_);  // query 0's slot (a one-token prefill advances it in place)
  done_.assign(shape_.layers, false);
  return positions.clamp_min(0);
}

void CompressedKVCache::check_decode(int64_t tokens) const {
  // A forward that failed part way may have written some layers' slots, query rings and
  // accumulated scores, which cannot be taken back: such a cache stays refused.
  TORCH_CHECK(tokens_ == 0, "begin_decode: a forward of ", tokens_,
              " tokens is in progress (begun, not finished by end_forward); a cache whose forward "
              "failed part way cannot go on: make a new one");
  TORCH_CHECK(forwards_ >= 1, "begin_decode: the cache holds no prefill; call begin_prefill first");
  TORCH_CHECK(tokens >= 1, "begin_decode: tokens must be >= 1, got ", tokens);
  TORCH_CHECK(length_ + tokens <= cap_, "begin_decode: ", tokens, " more tokens overflow the ",
              cap_, " slots of the cache (", length_, " live); max_tokens = ", max_tokens_);
  const int64_t D = policy_.divide_length;
  const int64_t first = forwards_, last = forwards_ + tokens - 1;  // forward indices
  // No multiple of D in [first, last - 1]; first >= 1 after the prefill.
  TORCH_CHECK((last - 1) / D == (first - 1) / D, "begin_decode: forwards ", first, "..", last,
              " cross a compression step (every ", D, "); only the last token of a chunk may be one");
}

bool CompressedKVCache::decode_compresses(int64_t tokens) const {
  const int64_t last = forwards_ + tokens - 1;
  return last % policy_.divide_length == 0 && policy_.budget && length_ + tokens > *policy_.budget;
}

int64_t CompressedKVCache::decode_span() const {
  if (policy_.budget) return cap_;
  return std::min(cap_, (length_ + kSpanQuantum) / kSpanQuantum * kSpanQuantum);
}

at::Tensor CompressedKVCache::begin_decode(int64_t tokens) {
  check_decode(tokens);
  at::Tensor positions;  // [B,T]
  if (tokens == 1) {
    step_pos_.copy_(next_pos_.unsqueeze(1));
    step_new_pos_.copy_(step_pos_.unsqueeze(1));
    positions = step_pos_;
    new_pos_ = step_new_pos_;
  } else {
    positions = next_pos_.unsqueeze(1) + at::arange(tokens, next_pos_.options());
    new_pos_ = positions.to(at::kInt).unsqueeze(1).expand({shape_.batch, shape_.kv_heads, tokens})
                   .contiguous();
  }
  next_pos_.add_(tokens);
  tokens_ = tokens;
  compress_ = (forwards_ + tokens - 1) % policy_.divide_length == 0;
  done_.assign(shape_.layers, false);
  return positions;
}

void CompressedKVCache::account_replayed_decode(const std::function<void()>& replay,
                                                const CompressionRunner& run_compression) {
  check_decode(1);
  replay();
  if (!decode_compresses(1)) {
    length_ += 1;
    q_count_ += 1;
    forwards_ += 1;
    return;
  }
  // The graph did begin_decode's and the layers' device work; the host state of that forward is
  // rebuilt here so that end_forward compresses as an eager forward would.
  tokens_ = 1;
  compress_ = true;
  new_pos_ = step_new_pos_;
  done_.assign(shape_.layers, true);
  finish_forward(run_compression);
}

void CompressedKVCache::check_qkv(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v) const {
  TORCH_CHECK(tokens_ > 0, "attend: call begin_prefill or begin_decode first");
  layer_at(layer);
  TORCH_CHECK(!done_[layer], "attend: layer ", layer, " already attended in this forward");
  const auto& s = shape_;
  TORCH_CHECK(q.dim() == 4 && q.size(0) == s.batch && q.size(1) == s.q_heads &&
                  q.size(2) == tokens_ && q.size(3) == s.head_dim,
              "attend: q must be [B,Hq,T,d] = [", s.batch, ",", s.q_heads, ",", tokens_, ",",
              s.head_dim, "], got ", q.sizes());
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == s.batch && t->size(1) == s.kv_heads &&
                    t->size(2) == tokens_ && t->size(3) == s.head_dim,
                "attend: k and v must be [B,Hkv,T,d] = [", s.batch, ",", s.kv_heads, ",", tokens_,
                ",", s.head_dim, "], got ", t->sizes());
  }
  TORCH_CHECK(q.scalar_type() == s.dtype && k.scalar_type() == s.dtype && v.scalar_type() == s.dtype,
              "attend: q, k and v must be ", s.dtype, " (the cache dtype)");
  TORCH_CHECK(q.device() == s.device && k.device() == s.device && v.device() == s.device,
              "attend: q, k and v must be on ", s.device, " (the cache device)");
}

at::Tensor CompressedKVCache::attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v) {
  check_qkv(layer, q, k, v);
  done_[layer] = true;
  Layer& s = layers_[layer];
  return forwards_ == 0 ? prefill(s, layer, q, k, v) : extend(s, layer, q, k, v);
}

// The prompt is scored from the forward's own tensors, so a prompt longer than the cache never
// has to fit in it: only the kept slots are written.
at::Tensor CompressedKVCache::prefill(Layer& s, int64_t layer, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v) {
  const int64_t P = tokens_;
  const bool accumulate = policy_.observation == Observation::accumulate;
  std::optional<at::Tensor> acc;
  if (accumulate) acc = at::zeros({shape_.batch, shape_.kv_heads, P}, s.score.options());
  // Accumulating policies need every query's probabilities, hence the dense path.
  const auto out = acc ? masked_attention(q, k, v, new_pos_, acc) : prompt_attention(q, k, v, new_pos_);
  push_queries(s, q);
  if (!policy_.budget || P <= *policy_.budget) {
    s.k.narrow(2, 0, P).copy_(k);
    s.v.narrow(2, 0, P).copy_(v);
    s.pos.narrow(2, 0, P).copy_(new_pos_);
    if (acc) s.score.narrow(2, 0, P).copy_(*acc);
    return out;
  }
  const int64_t budget = *policy_.budget, w = policy_.window;
  const auto q_win = s.q_ring.defined() ? q.narrow(2, P - s.q_ring.size(2), s.q_ring.size(2))
                                        : at::Tensor();
  const auto sel = select(policy_, k, new_pos_, q_win, acc.value_or(at::Tensor()), at::Tensor());
  log_evictions(layer, new_pos_, sel.idx);
  if (s.exempt.defined()) s.exempt.narrow(2, 0, budget).copy_(carry_exemptions(sel));
  s.k.narrow(2, 0, budget).copy_(gkv::gather_tokens(k, sel.idx));
  s.v.narrow(2, 0, budget).copy_(gkv::gather_tokens(v, sel.idx));
  s.pos.narrow(2, 0, budget).copy_(new_pos_.gather(2, sel.idx));
  if (acc) {
    s.score.narrow(2, 0, budget).copy_(acc->gather(2, sel.idx));
  } else {
    s.score.narrow(2, 0, budget - w).copy_(sel.F.gather(2, sel.idx.narrow(2, 0, budget - w)));
  }
  return out;
}

at::Tensor CompressedKVCache::extend(Layer& s, int64_t layer, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v) {
  const int64_t T = tokens_, N0 = length_, N = N0 + T;
  const bool accumulate = policy_.observation == Observation::accumulate;
  const auto kN = s.k.narrow(2, 0, N), vN = s.v.narrow(2, 0, N), posN = s.pos.narrow(2, 0, N);
  at::Tensor out;
  if (T == 1) {  // graph-safe: slot and span come from device memory and decode_span
    std::optional<at::Tensor> q_ring, q_token, ring_slot;  // the window's query ring, same launch
    if (s.q_ring.defined()) q_ring = s.q_ring, q_token = q.select(2, 0), ring_slot = ring_slot_;
    gkv::write_slot_(s.k, s.v, s.pos, k.select(2, 0), v.select(2, 0), new_pos_.select(2, 0),
                     live_slot_, q_ring, q_token, ring_slot);
    if (accumulate) s.score.index_fill_(2, live_slot_, 0.0);
    const double scale = 1.0 / std::sqrt(static_cast<double>(shape_.head_dim));
    std::optional<at::Tensor> acc;
    if (accumulate) acc = s.score;
    // The span is fixed for the graph; attend_end_ cuts it to the live slots at run time.
    out = gkv::decode_attention(q.select(2, 0), s.k, s.v, s.pos, decode_span(), scale, acc,
                                attend_end_)
              .unsqueeze(2);
  } else {
    s.k.narrow(2, N0, T).copy_(k);
    s.v.narrow(2, N0, T).copy_(v);
    s.pos.narrow(2, N0, T).copy_(new_pos_);
    if (accumulate) s.score.narrow(2, N0, T).zero_();
    std::optional<at::Tensor> acc;
    if (accumulate) acc = s.score.narrow(2, 0, N);
    out = masked_attention(q, kN, vN, posN, acc);
    push_queries(s, q);
  }
  return out;
}

void CompressedKVCache::compress(Layer& s, int64_t layer) {
  const int64_t N = length_ + tokens_, C = N - policy_.window;
  const bool accumulate = policy_.observation == Observation::accumulate;
  const auto kN = s.k.narrow(2, 0, N), posN = s.pos.narrow(2, 0, N);
  const auto history = policy_.history != History::none
                           ? s.score.narrow(2, 0, history_len_) : at::Tensor();
  const auto carried = s.exempt.defined() ? s.exempt.narrow(2, 0, carried_len_) : at::Tensor();
  const auto sel = select(policy_, kN, posN, s.q_ring.defined() ? window_queries(s) : at::Tensor(),
                          accumulate ? s.score.narrow(2, 0, N) : at::Tensor(), history, carried);
  log_evictions(layer, posN, sel.idx);
  const int64_t budget = *policy_.budget;
  if (s.exempt.defined()) s.exempt.narrow(2, 0, budget).copy_(carry_exemptions(sel));
  if (!accumulate) s.score.narrow(2, 0, C).copy_(sel.F);
  gkv::compact_sorted_(s.k, s.v, s.pos, s.score, sel.idx);
  s.pos.narrow(2, budget, cap_ - budget).fill_(-1);  // decode_span reads past the live slots
}

void CompressedKVCache::push_queries(Layer& s, const at::Tensor& q) const {
  if (!s.q_ring.defined()) return;
  const int64_t W = s.q_ring.size(2), T = q.size(2);
  const int64_t m = std::min(T, W);  // only the last W of this forward can matter
  int64_t n = q_count_ + T - m;      // index of the first query written
  int64_t t = T - m;
  while (t < T) {  // at most two contiguous runs of the ring
    const int64_t at_slot = (n + ring_shift_) % W, run = std::min(T - t, W - at_slot);
    s.q_ring.narrow(2, at_slot, run).copy_(q.narrow(2, t, run));
    t += run;
    n += run;
  }
}

int64_t CompressedKVCache::oldest_query_slot() const {
  const int64_t W = policy_.observed_queries();
  return W > 0 ? (q_count_ + tokens_ + ring_shift_) % W : 0;
}

at::Tensor CompressedKVCache::window_queries(const Layer& s) const {
  const int64_t W = s.q_ring.size(2), seen = q_count_ + tokens_;
  TORCH_CHECK(seen >= W, "CompressedKVCache: ", seen, " queries seen, the window needs ", W);
  const int64_t oldest = oldest_query_slot();
  return oldest == 0 ? s.q_ring : at::roll(s.q_ring, {-oldest}, {2});
}

void CompressedKVCache::log_evictions(int64_t layer, const at::Tensor& pos, const at::Tensor& idx) {
  if (!death_.defined()) return;
  auto kept = at::zeros(pos.sizes(), pos.options().dtype(at::kBool)).scatter_(2, idx, true);
  auto evicted = kept.logical_not_().logical_and_(pos.ge(0));  // [B,Hkv,N]
  // Kept slots and pads all write into the spare last column, which is never read.
  const auto target = at::where(evicted, pos.to(at::kLong), max_tokens_);
  // next_pos_ is already past this forward: the first position that no longer sees the key.
  const auto value = next_pos_.to(at::kInt).view({-1, 1, 1}).expand(target.sizes());
  death_.select(1, layer).scatter_(2, target, value);
}

void CompressedKVCache::end_forward() { finish_forward(nullptr); }

void CompressedKVCache::finish_forward(const CompressionRunner& run_compression) {
  TORCH_CHECK(tokens_ > 0, "end_forward: no forward in progress");
  for (int64_t l = 0; l < shape_.layers; ++l) {
    TORCH_CHECK(done_[l], "end_forward: layer ", l, " did not attend in this forward");
  }
  const int64_t N = length_ + tokens_;
  const bool compressed = compress_ && policy_.budget && N > *policy_.budget;
  // The prefill compressed as it attended; a later forward compresses every layer now, after all
  // of them attended (no layer reads another's cache, so the decisions are the same), which lets
  // a replayed decode graph run first (account_replayed_decode).
  if (compressed && forwards_ > 0) {
    const auto compress_layers = [&] {
      for (int64_t l = 0; l < shape_.layers; ++l) compress(layers_[l], l);
    };
    if (run_compression) {
      // compress() reads no other host state than these.
      run_compression({N, history_len_, carried_len_, oldest_query_slot()}, compress_layers);
    } else {
      compress_layers();
    }
  }
  length_ = compressed ? *policy_.budget : N;
  if (compressed) {
    history_len_ = *policy_.budget - policy_.window;
    if (layers_[0].exempt.defined()) carried_len_ = *policy_.budget;
  }
  q_count_ += tokens_;
  forwards_ += forwards_ == 0 ? 1 : tokens_;
  const int64_t W = policy_.observed_queries();
  if (tokens_ == 1 && !compressed) {  // in place, as a replayed graph does it
    step_slots_.add_(1);
    if (W > 0) ring_slot_.add_(1).remainder_(W);
  } else {
    live_slot_.fill_(length_);
    attend_end_.fill_(length_ + 1);
    if (W > 0) ring_slot_.fill_((q_count_ + ring_shift_) % W);
  }
  tokens_ = 0;
}

}  // namespace gkv::cache
