// The LibTorch decoder of the Llama / Qwen2 / Qwen3 families: a ModelConfig, plain weight structs,
// builders (HF checkpoint directory, llama2.ts file) and a forward pass that is a flat loop over
// layers. The attention step is an interface, so the compressed KV cache can take it over; the
// default is full causal attention over the tokens of one forward.
//
// Symbols: B batch, T tokens in this forward, D hidden size, F intermediate size, V vocabulary,
// Hq / Hkv query / KV heads, d head_dim, L layers.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <functional>
#include <optional>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"

namespace gkv::model {

struct LayerWeights {
  at::Tensor attn_norm;       // [D]
  at::Tensor wq;              // [Hq*d, D]
  at::Tensor wk;              // [Hkv*d, D]
  at::Tensor wv;              // [Hkv*d, D]
  at::Tensor bq;              // [Hq*d]   when attention_bias, else undefined
  at::Tensor bk;              // [Hkv*d]  when attention_bias
  at::Tensor bv;              // [Hkv*d]  when attention_bias
  at::Tensor q_norm;          // [d]      when qk_norm (Qwen3)
  at::Tensor k_norm;          // [d]      when qk_norm
  at::Tensor wo;              // [D, Hq*d]
  at::Tensor bo;              // [D]      when o_proj_bias
  at::Tensor mlp_norm;        // [D]
  at::Tensor w_gate;          // [F, D]
  at::Tensor w_up;            // [F, D]
  at::Tensor w_down;          // [D, F]
  // The q/k/v rows (and biases) and the gate/up rows, each group joined in one tensor so that one
  // GEMM computes it; the named tensors above are row blocks (views) of these, so an in-place
  // update of either is seen by both. A named tensor replaced by another one leaves its group
  // unused (its own GEMMs run), never stale.
  at::Tensor wqkv;            // [(Hq+2Hkv)*d, D]
  at::Tensor bqkv;            // [(Hq+2Hkv)*d] when attention_bias
  at::Tensor w_gate_up;       // [2F, D]
};

struct Weights {
  at::Tensor embed;                 // [V, D]
  std::vector<LayerWeights> layers;  // L
  at::Tensor final_norm;            // [D]
  at::Tensor lm_head;               // [V, D]; the same tensor as embed when tie_word_embeddings
};

// The attention step of one layer.
class Attention {
 public:
  virtual ~Attention() = default;
  // q [B,Hq,T,d] and k [B,Hkv,T,d] after RoPE, v [B,Hkv,T,d] -> out [B,Hq,T,d].
  // Query head h reads KV head h / (Hq/Hkv).
  virtual at::Tensor forward(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v) = 0;
};

// Full causal attention among the T tokens of this forward (no cache). With attention_mask
// [B,T] (nonzero = real token), pad keys are hidden; a pad query sees only itself, so its (unused)
// output stays finite.
class CausalAttention final : public Attention {
 public:
  explicit CausalAttention(std::optional<at::Tensor> attention_mask = std::nullopt);
  at::Tensor forward(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v) override;

 private:
  std::optional<at::Tensor> attention_mask_;  // [B,T]
  at::Tensor visible_;                        // [B,1,T,T] bool, built once and shared by the layers
};

// positions [B,T] int64 of a left-padded batch: the count of real tokens before each token (pads
// get 0). attention_mask [B,T], nonzero = real token.
at::Tensor positions_from_mask(const at::Tensor& attention_mask);

// Throws "<who>: token ids must lie in [0, vocab_size)" unless they do. Reads the ids on the
// host, so on CUDA it syncs: callers on the decode path check only CPU tensors.
void check_token_range(const at::Tensor& tokens, int64_t vocab_size, const char* who);

class Decoder {
 public:
  // Checks every tensor's shape against the config.
  Decoder(ModelConfig config, Weights weights);

  // Builds from tensors named as in transformers' checkpoints (the one name table, decoder.cpp).
  // `get(name, shape)` returns the tensor or throws naming it. The q/k/v and gate/up weights are
  // copied into joint tensors (LayerWeights); the others are the given tensors.
  static Decoder from_named(
      ModelConfig config,
      const std::function<at::Tensor(const std::string&, c10::IntArrayRef)>& get);

  const ModelConfig& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  Weights& weights() { return weights_; }
  c10::Device device() const { return weights_.embed.device(); }

  // The checkpoint tensors under their transformers names (a tied lm_head is left out, as
  // transformers does). The tensors are the model's own, not copies.
  NamedTensors named_tensors() const;

  // tokens [B,T] int64, positions [B,T] int64 -> hidden [B,T,D] after the final norm.
  at::Tensor hidden_states(const at::Tensor& tokens, const at::Tensor& positions,
                           Attention& attention) const;
  // hidden [B,T,D] -> logits [B,T,V] in the weight dtype.
  at::Tensor logits(const at::Tensor& hidden) const;
  // tokens [B,T], positions [B,T] -> logits [B,T,V].
  at::Tensor forward(const at::Tensor& tokens, const at::Tensor& positions,
                     Attention& attention) const;

  // Moves / casts every weight (RoPE frequencies stay fp32).
  void to(std::optional<c10::Device> device, std::optional<c10::ScalarType> dtype);

 private:
  // Copies each layer's q/k/v and gate/up weights into their joint tensors (LayerWeights).
  void join_projections();

  ModelConfig config_;
  Weights weights_;
  at::Tensor inv_freq_;  // [d/2] fp32, with llama3 scaling applied
};

// A transformers checkpoint directory (config.json + safetensors, sharded or not), or a llama2.ts
// .bin file (stories260K).
Decoder load_decoder(const std::filesystem::path& path);
// Writes config.json + safetensors into `dir` atomically; transformers loads the result.
void save_decoder(const Decoder& decoder, const std::filesystem::path& dir,
                  uint64_t max_shard_bytes = 0);

}  // namespace gkv::model
