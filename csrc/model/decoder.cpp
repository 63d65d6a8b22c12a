#include "model/decoder.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/StringUtil.h>
#include <torch/cuda.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <numbers>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "model/llama2ts.h"
#include "ops.h"
#include "ops/tuned_linear.h"
#include "switches.h"

namespace gkv::model {

namespace {

using Shape = std::vector<int64_t> (*)(const ModelConfig&);
using Present = bool (*)(const ModelConfig&);

bool always(const ModelConfig&) { return true; }
bool qkv_bias(const ModelConfig& c) { return c.attention_bias; }
bool o_bias(const ModelConfig& c) { return c.o_proj_bias; }
bool qk_norm(const ModelConfig& c) { return c.qk_norm; }
bool untied(const ModelConfig& c) { return !c.tie_word_embeddings; }

// The one table of transformers weight names. Layer names follow "model.layers.{i}.".
struct GlobalSlot {
  const char* name;
  at::Tensor Weights::*field;
  Shape shape;
  Present present;
};
struct LayerSlot {
  const char* name;
  at::Tensor LayerWeights::*field;
  Shape shape;
  Present present;
};

const GlobalSlot kGlobalSlots[] = {
    {"model.embed_tokens.weight", &Weights::embed,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.vocab_size, c.hidden_size}; }, always},
    {"model.norm.weight", &Weights::final_norm,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.hidden_size}; }, always},
    {"lm_head.weight", &Weights::lm_head,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.vocab_size, c.hidden_size}; }, untied},
};

std::vector<int64_t> q_out(const ModelConfig& c) { return {c.num_heads * c.head_dim, c.hidden_size}; }
std::vector<int64_t> kv_out(const ModelConfig& c) { return {c.num_kv_heads * c.head_dim, c.hidden_size}; }
std::vector<int64_t> hidden(const ModelConfig& c) { return {c.hidden_size}; }

const LayerSlot kLayerSlots[] = {
    {"input_layernorm.weight", &LayerWeights::attn_norm, hidden, always},
    {"self_attn.q_proj.weight", &LayerWeights::wq, q_out, always},
    {"self_attn.k_proj.weight", &LayerWeights::wk, kv_out, always},
    {"self_attn.v_proj.weight", &LayerWeights::wv, kv_out, always},
    {"self_attn.q_proj.bias", &LayerWeights::bq,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.num_heads * c.head_dim}; }, qkv_bias},
    {"self_attn.k_proj.bias", &LayerWeights::bk,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.num_kv_heads * c.head_dim}; }, qkv_bias},
    {"self_attn.v_proj.bias", &LayerWeights::bv,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.num_kv_heads * c.head_dim}; }, qkv_bias},
    {"self_attn.q_norm.weight", &LayerWeights::q_norm,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.head_dim}; }, qk_norm},
    {"self_attn.k_norm.weight", &LayerWeights::k_norm,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.head_dim}; }, qk_norm},
    {"self_attn.o_proj.weight", &LayerWeights::wo,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.hidden_size, c.num_heads * c.head_dim}; },
     always},
    {"self_attn.o_proj.bias", &LayerWeights::bo, hidden, o_bias},
    {"post_attention_layernorm.weight", &LayerWeights::mlp_norm, hidden, always},
    {"mlp.gate_proj.weight", &LayerWeights::w_gate,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.intermediate_size, c.hidden_size}; }, always},
    {"mlp.up_proj.weight", &LayerWeights::w_up,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.intermediate_size, c.hidden_size}; }, always},
    {"mlp.down_proj.weight", &LayerWeights::w_down,
     [](const ModelConfig& c) { return std::vector<int64_t>{c.hidden_size, c.intermediate_size}; }, always},
};

std::string layer_name(int64_t layer, const char* name) {
  return c10::str("model.layers.", layer, ".", name);
}

// Calls fn(name, tensor&, shape) for every tensor the config has, in checkpoint order. With
// AddLayers, w.layers gains each layer as it is reached (loading: see from_named).
template <bool AddLayers = false, typename W, typename Fn>
void for_each_slot(const ModelConfig& c, W& w, Fn&& fn) {
  fn(kGlobalSlots[0].name, w.*kGlobalSlots[0].field, kGlobalSlots[0].shape(c));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if constexpr (AddLayers) w.layers.emplace_back();
    for (const LayerSlot& s : kLayerSlots) {
      if (s.present(c)) fn(layer_name(l, s.name), w.layers[l].*s.field, s.shape(c));
    }
  }
  for (size_t i = 1; i < std::size(kGlobalSlots); ++i) {
    const GlobalSlot& s = kGlobalSlots[i];
    if (s.present(c)) fn(s.name, w.*s.field, s.shape(c));
  }
}

// Up to this many rows a projection goes through gkv::decode_linear when Switch::decode_linear
// (csrc/switches.h) is on. On an H200 its kernel beat cuBLAS at 16 rows (the engine's step 5-6%
// faster). Its wgmma shape for 17-64 rows still loses at 64 (the engine's step 2% slower on an
// H100) and won by 2% at 32 in the GEMMs alone, not yet timed in the engine
// (docs/benchmarks.md, "Our own decode GEMM", "wgmma for 17-64 rows").
constexpr int64_t kDecodeLinearRowsItWins = 16;

// ATen's linear, or for one token per row (a decode step's shapes, which a generation repeats
// every step) the GEMM algorithm timed fastest for the shape, where gkv::tuned_linear applies
// (CUDA, 17-1024 rows, no gradient). A prefill's many shapes are not worth timing each.
at::Tensor fastest_linear(const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& bias) {
  const bool one_token_per_row = x.dim() >= 2 && x.size(-2) == 1;
  return switch_on(Switch::tuned_linear) && one_token_per_row ? gkv::tuned_linear(x, w, bias)
                                                              : at::linear(x, w, bias);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {}) {
  const std::optional<at::Tensor> bias = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  return switch_on(Switch::decode_linear) && rows <= kDecodeLinearRowsItWins
             ? gkv::decode_linear(x, w, bias)
             : fastest_linear(x, w, bias);
}

// True when `parts` are, in order, the consecutive row blocks of `joint` (views of it, as
// join_rows left them).
template <typename TensorPtr>
bool rows_of(const at::Tensor& joint, std::initializer_list<TensorPtr> parts) {
  if (!joint.defined()) return false;
  const char* next = static_cast<const char*>(joint.const_data_ptr());
  for (const at::Tensor* p : parts) {
    if (!p->defined() || p->const_data_ptr() != next || !p->is_contiguous() ||
        p->scalar_type() != joint.scalar_type()) {
      return false;
    }
    next += p->nbytes();
  }
  return next == static_cast<const char*>(joint.const_data_ptr()) + joint.nbytes();
}

// The joint tensor of `parts` (their rows stacked), each part then made a view of its rows;
// no copy when they already are.
at::Tensor join_rows(const at::Tensor& joint, std::initializer_list<at::Tensor*> parts) {
  if (rows_of(joint, parts)) return joint;
  at::NoGradGuard no_grad;  // the views must stay leaves the trainer can mark trainable
  std::vector<at::Tensor> rows;
  for (const at::Tensor* p : parts) rows.push_back(*p);
  at::Tensor joined = at::cat(rows, 0);
  int64_t row = 0;
  for (at::Tensor* p : parts) {
    const int64_t n = p->size(0);
    *p = joined.narrow(0, row, n);
    row += n;
  }
  return joined;
}

// Whether a forward may compute `parts` by one GEMM over `joint`: they are still its rows, and
// autograd needs none of them (a gradient must reach the named tensors themselves).
bool joint_usable(const at::Tensor& joint, std::initializer_list<const at::Tensor*> parts) {
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* p : parts) {
      if (p->requires_grad()) return false;
    }
  }
  return rows_of(joint, parts);
}

// [d/2] fp32 inverse frequencies, with Llama 3.1's frequency-dependent scaling when configured.
at::Tensor inverse_frequencies(const ModelConfig& c) {
  at::Tensor exponent = at::arange(0, c.head_dim, 2, at::kLong).to(at::kFloat) / c.head_dim;
  at::Tensor inv_freq = 1.0 / at::pow(c.rope_theta, exponent);
  if (!c.rope_scaling) return inv_freq;
  const Llama3RopeScaling& s = *c.rope_scaling;
  const double old_len = static_cast<double>(s.original_max_position_embeddings);
  const double low_wavelen = old_len / s.low_freq_factor;    // longer: divide by factor
  const double high_wavelen = old_len / s.high_freq_factor;  // shorter: unchanged
  at::Tensor wavelen = 2 * std::numbers::pi / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq);
  // In between, interpolate smoothly between the scaled and unscaled frequencies.
  at::Tensor smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
  at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
  return at::where(medium, smoothed, scaled);
}

void check_tokens(const at::Tensor& tokens, const at::Tensor& positions, const ModelConfig& c,
                  c10::Device device) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong,
              "forward: tokens must be [B,T] int64, got ", tokens.sizes(), " ", tokens.scalar_type());
  TORCH_CHECK(positions.sizes() == tokens.sizes() && positions.scalar_type() == at::kLong,
              "forward: positions must be int64 with the shape of tokens ", tokens.sizes(), ", got ",
              positions.sizes(), " ", positions.scalar_type());
  TORCH_CHECK(tokens.device() == device && positions.device() == device,
              "forward: tokens and positions must be on the model's device ", device);
  TORCH_CHECK(tokens.size(1) > 0, "forward: tokens must hold at least one token per row");
  // A range check syncs with the device, so only on CPU (CUDA's embedding asserts by itself).
  if (device.is_cpu()) check_token_range(tokens, c.vocab_size, "forward");
}

// q [B,T,Hq,d], k [B,T,Hkv,d] -> RoPE'd (after the per-head q/k norms when configured)
// [B,Hq,T,d], [B,Hkv,T,d].
std::pair<at::Tensor, at::Tensor> rotated_qk(at::Tensor q, at::Tensor k, const LayerWeights& w,
                                             const ModelConfig& c, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  if (c.qk_norm) {
    q = gkv::rms_norm(q, w.q_norm, c.rms_eps);
    k = gkv::rms_norm(k, w.k_norm, c.rms_eps);
  }
  return {gkv::apply_rope(q.transpose(1, 2), cos, sin),
          gkv::apply_rope(k.transpose(1, 2), cos, sin)};
}

}  // namespace

CausalAttention::CausalAttention(std::optional<at::Tensor> attention_mask)
    : attention_mask_(std::move(attention_mask)) {}

at::Tensor CausalAttention::forward(int64_t /*layer*/, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const bool gqa = q.size(1) != k.size(1);
  if (!attention_mask_) {
    return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, scale, gqa);
  }
  const int64_t batch = q.size(0), t = q.size(2);
  const at::Tensor& mask = *attention_mask_;
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == t,
              "CausalAttention: attention_mask must be [B,T] = [", batch, ",", t, "], got ", mask.sizes());
  if (!visible_.defined()) {
    auto opts = at::TensorOptions().dtype(at::kBool).device(q.device());
    at::Tensor causal = at::ones({t, t}, opts).tril();                     // [T,T]
    at::Tensor real_key = mask.to(q.device()).ne(0).view({batch, 1, 1, t});  // [B,1,1,T]
    visible_ = causal.logical_and(real_key).logical_or(at::eye(t, opts));   // [B,1,T,T]
  }
  return at::scaled_dot_product_attention(q, k, v, visible_, 0.0, /*is_causal=*/false, scale, gqa);
}

void check_token_range(const at::Tensor& tokens, int64_t vocab_size, const char* who) {
  TORCH_CHECK(tokens.numel() == 0 ||
                  (tokens.min().item<int64_t>() >= 0 && tokens.max().item<int64_t>() < vocab_size),
              who, ": token ids must lie in [0, ", vocab_size, ")");
}

at::Tensor positions_from_mask(const at::Tensor& attention_mask) {
  TORCH_CHECK(attention_mask.dim() == 2, "attention_mask must be [B,T], got ", attention_mask.sizes());
  return (attention_mask.ne(0).to(at::kLong).cumsum(-1) - 1).clamp_min(0);
}

Decoder::Decoder(ModelConfig config, Weights weights)
    : config_(std::move(config)), weights_(std::move(weights)) {
  config_.validate();
  if (config_.tie_word_embeddings) weights_.lm_head = weights_.embed;
  TORCH_CHECK(static_cast<int64_t>(weights_.layers.size()) == config_.num_layers, "Decoder: ",
              weights_.layers.size(), " layers of weights for num_hidden_layers = ", config_.num_layers);
  const c10::Device device = weights_.embed.device();
  for_each_slot(config_, weights_, [&](const std::string& name, const at::Tensor& t,
                                       const std::vector<int64_t>& shape) {
    TORCH_CHECK(t.defined(), "Decoder: weight '", name, "' is missing");
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), "Decoder: weight '", name, "' has shape ",
                t.sizes(), ", expected ", c10::IntArrayRef(shape));
    TORCH_CHECK(t.device() == device && t.scalar_type() == weights_.embed.scalar_type(),
                "Decoder: weight '", name, "' is ", t.scalar_type(), " on ", t.device(),
                ", the embedding ", weights_.embed.scalar_type(), " on ", device);
  });
  config_.dtype = weights_.embed.scalar_type();
  inv_freq_ = inverse_frequencies(config_).to(device);
  join_projections();
}

void Decoder::join_projections() {
  for (LayerWeights& w : weights_.layers) {
    w.wqkv = join_rows(w.wqkv, {&w.wq, &w.wk, &w.wv});
    if (config_.attention_bias) w.bqkv = join_rows(w.bqkv, {&w.bq, &w.bk, &w.bv});
    w.w_gate_up = join_rows(w.w_gate_up, {&w.w_gate, &w.w_up});
  }
}

Decoder Decoder::from_named(ModelConfig config,
                            const std::function<at::Tensor(const std::string&, c10::IntArrayRef)>& get) {
  config.validate();
  // The layers are added as their tensors load, so a layer count that the checkpoint does not
  // back fails at its first missing tensor. A resize to the count up front relied on the
  // allocation being refused; under memory overcommit (the GPU machine) 2^31 empty layers were
  // written page by page until the process was killed.
  Weights w;
  for_each_slot</*AddLayers=*/true>(config, w, [&](const std::string& name, at::Tensor& t,
                                                   const std::vector<int64_t>& shape) {
    t = get(name, shape).to(config.dtype);
  });
  return Decoder(std::move(config), std::move(w));
}

NamedTensors Decoder::named_tensors() const {
  NamedTensors out;
  for_each_slot(config_, weights_, [&](const std::string& name, const at::Tensor& t,
                                       const std::vector<int64_t>&) { out.emplace_back(name, t); });
  return out;
}

at::Tensor Decoder::hidden_states(const at::Tensor& tokens, const at::Tensor& positions,
                                  Attention& attention) const {
  const ModelConfig& c = config_;
  check_tokens(tokens, positions, c, device());
  const int64_t batch = tokens.size(0), t = tokens.size(1), d = c.head_dim;
  const auto dtype = weights_.embed.scalar_type();

  // RoPE tables in fp32 (as transformers), cast to the weight dtype: cos/sin [B,1,T,d].
  at::Tensor angles = positions.to(at::kFloat).unsqueeze(-1) * inv_freq_;  // [B,T,d/2]
  at::Tensor emb = at::cat({angles, angles}, -1).unsqueeze(1);             // [B,1,T,d]
  at::Tensor cos = emb.cos().to(dtype), sin = emb.sin().to(dtype);

  at::Tensor h = at::embedding(weights_.embed, tokens);  // [B,T,D]
  // x is the normed input of the next block; each residual add is fused with the norm after it.
  at::Tensor x = gkv::rms_norm(h, weights_.layers.front().attn_norm, c.rms_eps);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    at::Tensor q, k, v;  // [B,Hq,T,d], [B,Hkv,T,d] x 2
    if (joint_usable(w.wqkv, {&w.wq, &w.wk, &w.wv}) &&
        (!c.attention_bias || joint_usable(w.bqkv, {&w.bq, &w.bk, &w.bv}))) {
      // [B,T,Hq+2Hkv,d]: q's and k's heads are adjacent, so one RoPE pass turns both (when no
      // per-head norm comes first).
      const at::Tensor qkv = project(x, w.wqkv, w.bqkv).view({batch, t, -1, d});
      const int64_t hq = c.num_heads, hkv = c.num_kv_heads;
      v = qkv.narrow(2, hq + hkv, hkv).transpose(1, 2);
      if (c.qk_norm) {
        std::tie(q, k) = rotated_qk(qkv.narrow(2, 0, hq), qkv.narrow(2, hq, hkv), w, c, cos, sin);
      } else {
        const at::Tensor qk = gkv::apply_rope(qkv.narrow(2, 0, hq + hkv).transpose(1, 2), cos, sin);
        q = qk.narrow(1, 0, hq), k = qk.narrow(1, hq, hkv);
      }
    } else {
      std::tie(q, k) = rotated_qk(project(x, w.wq, w.bq).view({batch, t, c.num_heads, d}),
                                  project(x, w.wk, w.bk).view({batch, t, c.num_kv_heads, d}), w,
                                  c, cos, sin);
      v = project(x, w.wv, w.bv).view({batch, t, c.num_kv_heads, d}).transpose(1, 2);
    }
    at::Tensor o = attention.forward(l, q, k, v);  // [B,Hq,T,d]
    o = o.transpose(1, 2).reshape({batch, t, c.num_heads * d});
    std::tie(h, x) = gkv::add_rms_norm(h, project(o, w.wo, w.bo), w.mlp_norm, c.rms_eps);
    at::Tensor gated;  // silu(gate) * up [B,T,F]
    if (joint_usable(w.w_gate_up, {&w.w_gate, &w.w_up})) {
      gated = gkv::silu_mul(project(x, w.w_gate_up));
    } else {
      gated = at::silu(project(x, w.w_gate)) * project(x, w.w_up);
    }
    const at::Tensor& next_norm =
        l + 1 < c.num_layers ? weights_.layers[l + 1].attn_norm : weights_.final_norm;
    std::tie(h, x) = gkv::add_rms_norm(h, project(gated, w.w_down), next_norm, c.rms_eps);
  }
  return x;
}

at::Tensor Decoder::logits(const at::Tensor& hidden) const {
  return fastest_linear(hidden, weights_.lm_head, std::nullopt);
}

at::Tensor Decoder::forward(const at::Tensor& tokens, const at::Tensor& positions,
                            Attention& attention) const {
  return logits(hidden_states(tokens, positions, attention));
}

void Decoder::to(std::optional<c10::Device> device, std::optional<c10::ScalarType> dtype) {
  const c10::Device dev = device.value_or(this->device());
  const c10::ScalarType type = dtype.value_or(config_.dtype);
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
              "Decoder::to: unsupported model dtype ", type, " (float32, bfloat16 or float16)");
  if (dev.is_cuda()) {  // named here: the copy itself would fail with a page of dispatcher backends
    const auto gpus = static_cast<int64_t>(torch::cuda::device_count());
    TORCH_CHECK(gpus > 0, "Decoder::to: device ", dev, ", but no CUDA device is available");
    TORCH_CHECK(dev.index() < gpus, "Decoder::to: device ", dev, ", but there are ", gpus,
                " CUDA devices (cuda:0 to cuda:", gpus - 1, ")");
  }
  for_each_slot(config_, weights_, [&](const std::string&, at::Tensor& t, const std::vector<int64_t>&) {
    t = t.to(dev, type);
  });
  if (config_.tie_word_embeddings) weights_.lm_head = weights_.embed;
  config_.dtype = type;
  inv_freq_ = inv_freq_.to(dev);
  join_projections();
}

Decoder load_decoder(const std::filesystem::path& path) {
  if (std::filesystem::is_regular_file(path)) {
    Llama2tsModel m = load_llama2ts(path);
    return Decoder(std::move(m.config), std::move(m.weights));
  }
  TORCH_CHECK(std::filesystem::is_directory(path), "load_decoder: ", path.string(),
              " is neither a checkpoint directory nor a llama2.ts file");
  ModelConfig config = load_config(path / "config.json");
  SafetensorsCheckpoint checkpoint(path);
  return Decoder::from_named(std::move(config), [&](const std::string& name, c10::IntArrayRef shape) {
    return checkpoint.load(name, shape);
  });
}

void save_decoder(const Decoder& decoder, const std::filesystem::path& dir, uint64_t max_shard_bytes) {
  write_directory_atomically(dir, [&](const std::filesystem::path& tmp) {
    write_file_synced(tmp / "config.json", config_to_json(decoder.config()).dump(2) + "\n");
    write_safetensors_shards(tmp, decoder.named_tensors(), max_shard_bytes);
  });
}

}  // namespace gkv::model
