// ModelConfig: the architecture of a Llama / Qwen2 / Qwen3 decoder, read from (and written back to)
// a transformers config.json. One struct with defaults; a missing or ill-typed key, or a feature
// the decoder does not implement (sliding window, MLP bias, another rope type), is an error that
// names the key.
#pragma once

#include <c10/core/ScalarType.h>
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace gkv::model {

// Llama 3.1 frequency-dependent RoPE scaling ("rope_type": "llama3").
struct Llama3RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string model_type = "llama";  // "llama", "qwen2" or "qwen3"
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_layers = 32;
  int64_t num_heads = 32;     // Hq
  int64_t num_kv_heads = 32;  // Hkv (GQA when < Hq)
  int64_t head_dim = 128;     // d
  int64_t vocab_size = 32000;
  int64_t max_position_embeddings = 2048;
  double rope_theta = 10000.0;
  std::optional<Llama3RopeScaling> rope_scaling;
  double rms_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q/k/v projections (always on for Qwen2)
  bool o_proj_bias = false;     // bias on o_proj (Llama/Qwen3 attention_bias; never for Qwen2)
  bool qk_norm = false;         // per-head RMSNorm of q and k before RoPE (Qwen3)
  c10::ScalarType dtype = c10::kFloat;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;

  // Throws when the numbers are inconsistent (heads not divisible by kv heads, ...).
  void validate() const;
};

// Parses a transformers config.json object (transformers 4.x "rope_theta"/"rope_scaling" and 5.x
// "rope_parameters" layouts). `where` names the file in error messages.
ModelConfig parse_config(const nlohmann::json& j, const std::string& where = "config.json");
ModelConfig load_config(const std::filesystem::path& path);
// A config.json that transformers 5 loads as the matching *ForCausalLM.
nlohmann::json config_to_json(const ModelConfig& c);

// "float32" / "bfloat16" / "float16" <-> dtype; other names throw.
c10::ScalarType dtype_from_name(const std::string& name);
std::string dtype_name(c10::ScalarType dtype);

}  // namespace gkv::model
