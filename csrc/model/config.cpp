#include "model/config.h"

#include <c10/util/StringUtil.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace gkv::model {

using nlohmann::json;

namespace {

// Typed access to the keys of one JSON object; every error names the file and the key.
class Keys {
 public:
  Keys(const json& j, std::string where, std::string prefix = "")
      : j_(j), where_(std::move(where)), prefix_(std::move(prefix)) {
    if (!j_.is_object()) throw std::runtime_error(c10::str(where_, ": ", name_or_root(), " must be a JSON object"));
  }

  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  int64_t integer(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_number_integer()) bad(key, "an integer", v);
    return v.get<int64_t>();
  }
  double number(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_number()) bad(key, "a number", v);
    return v.get<double>();
  }
  bool boolean(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_boolean()) bad(key, "a boolean", v);
    return v.get<bool>();
  }
  std::string string(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_string()) bad(key, "a string", v);
    return v.get<std::string>();
  }
  // Missing or null -> the default.
  int64_t integer(const std::string& key, int64_t def) const { return has(key) ? integer(key) : def; }
  double number(const std::string& key, double def) const { return has(key) ? number(key) : def; }
  bool boolean(const std::string& key, bool def) const { return has(key) ? boolean(key) : def; }
  std::string string(const std::string& key, const std::string& def) const {
    return has(key) ? string(key) : def;
  }
  std::vector<int64_t> integers(const std::string& key) const {  // null, an int or a list of ints
    if (!has(key)) return {};
    const json& v = j_.at(key);
    if (v.is_number_integer()) return {v.get<int64_t>()};
    if (!v.is_array()) bad(key, "an integer or a list of integers", v);
    std::vector<int64_t> out;
    for (const json& e : v) {
      if (!e.is_number_integer()) bad(key, "an integer or a list of integers", v);
      out.push_back(e.get<int64_t>());
    }
    return out;
  }
  Keys object(const std::string& key) const { return Keys(at(key), where_, full(key)); }

  [[noreturn]] void unsupported(const std::string& key, const std::string& why) const {
    throw std::runtime_error(c10::str(where_, ": key '", full(key), "' ", why));
  }

 private:
  const json& at(const std::string& key) const {
    if (!has(key)) throw std::runtime_error(c10::str(where_, ": key '", full(key), "' is missing"));
    return j_.at(key);
  }
  [[noreturn]] void bad(const std::string& key, const char* want, const json& got) const {
    throw std::runtime_error(c10::str(where_, ": key '", full(key), "' must be ", want, ", got ",
                                      got.dump()));
  }
  std::string full(const std::string& key) const { return prefix_.empty() ? key : prefix_ + "." + key; }
  std::string name_or_root() const { return prefix_.empty() ? "the top level" : "'" + prefix_ + "'"; }

  const json& j_;
  std::string where_;
  std::string prefix_;
};

Llama3RopeScaling parse_llama3(const Keys& k) {
  Llama3RopeScaling s;
  s.factor = k.number("factor");
  s.low_freq_factor = k.number("low_freq_factor");
  s.high_freq_factor = k.number("high_freq_factor");
  s.original_max_position_embeddings = k.integer("original_max_position_embeddings");
  return s;
}

// rope_type "default" -> no scaling, "llama3" -> its parameters; anything else is unsupported.
std::optional<Llama3RopeScaling> parse_rope_type(const Keys& k, const std::string& type_key) {
  std::string type = k.string(type_key, "default");
  if (type == "default") return std::nullopt;
  if (type == "llama3") return parse_llama3(k);
  k.unsupported(type_key, c10::str("is '", type, "'; only 'default' and 'llama3' are supported"));
}

}  // namespace

c10::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32") return c10::kFloat;
  if (name == "bfloat16") return c10::kBFloat16;
  if (name == "float16") return c10::kHalf;
  throw std::runtime_error(c10::str("unsupported dtype '", name,
                                    "' (expected float32, bfloat16 or float16)"));
}

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat: return "float32";
    case c10::kBFloat16: return "bfloat16";
    case c10::kHalf: return "float16";
    default: throw std::runtime_error(c10::str("unsupported model dtype ", dtype));
  }
}

ModelConfig parse_config(const json& j, const std::string& where) {
  Keys k(j, where);
  ModelConfig c;
  c.model_type = k.string("model_type");
  if (c.model_type != "llama" && c.model_type != "qwen2" && c.model_type != "qwen3") {
    k.unsupported("model_type", c10::str("is '", c.model_type,
                                         "'; supported: 'llama', 'qwen2', 'qwen3'"));
  }
  c.hidden_size = k.integer("hidden_size");
  c.intermediate_size = k.integer("intermediate_size");
  c.num_layers = k.integer("num_hidden_layers");
  c.num_heads = k.integer("num_attention_heads");
  c.num_kv_heads = k.integer("num_key_value_heads", c.num_heads);
  c.vocab_size = k.integer("vocab_size");
  if (c.num_heads <= 0) k.unsupported("num_attention_heads", "must be positive");
  c.head_dim = k.integer("head_dim", c.hidden_size / c.num_heads);
  c.max_position_embeddings = k.integer("max_position_embeddings", c.max_position_embeddings);
  c.rms_eps = k.number("rms_norm_eps", c.rms_eps);
  c.tie_word_embeddings = k.boolean("tie_word_embeddings", false);

  if (k.string("hidden_act", "silu") != "silu") k.unsupported("hidden_act", "must be 'silu'");
  if (k.boolean("mlp_bias", false)) k.unsupported("mlp_bias", "must be false (MLP bias is not implemented)");
  if (k.boolean("use_sliding_window", false)) {
    k.unsupported("use_sliding_window", "must be false (sliding-window attention is not implemented)");
  }

  // transformers 5 keeps theta and scaling in "rope_parameters"; 4.x in "rope_theta"/"rope_scaling".
  if (k.has("rope_parameters")) {
    Keys rope = k.object("rope_parameters");
    c.rope_theta = rope.number("rope_theta");
    c.rope_scaling = parse_rope_type(rope, "rope_type");
  } else {
    c.rope_theta = k.number("rope_theta", c.rope_theta);
    if (k.has("rope_scaling")) {
      Keys s = k.object("rope_scaling");
      c.rope_scaling = parse_rope_type(s, s.has("rope_type") ? "rope_type" : "type");
    }
  }

  if (c.model_type == "qwen2") {
    c.attention_bias = true;
    c.o_proj_bias = false;
  } else {
    c.attention_bias = c.o_proj_bias = k.boolean("attention_bias", false);
  }
  c.qk_norm = c.model_type == "qwen3";

  // transformers 5 writes "dtype", 4.x "torch_dtype".
  if (k.has("dtype")) {
    c.dtype = dtype_from_name(k.string("dtype"));
  } else if (k.has("torch_dtype")) {
    c.dtype = dtype_from_name(k.string("torch_dtype"));
  }
  if (k.has("bos_token_id")) c.bos_token_id = k.integer("bos_token_id");
  c.eos_token_ids = k.integers("eos_token_id");
  try {
    c.validate();
  } catch (const std::exception& e) {
    throw std::runtime_error(c10::str(where, ": ", e.what()));
  }
  return c;
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* key) {
    if (v <= 0) throw std::runtime_error(c10::str("key '", key, "' must be positive, got ", v));
  };
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_layers, "num_hidden_layers");
  positive(num_heads, "num_attention_heads");
  positive(num_kv_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(vocab_size, "vocab_size");
  if (num_heads % num_kv_heads != 0) {
    throw std::runtime_error(c10::str("key 'num_attention_heads' (", num_heads,
                                      ") must be a multiple of 'num_key_value_heads' (",
                                      num_kv_heads, ")"));
  }
  if (head_dim % 2 != 0) throw std::runtime_error(c10::str("key 'head_dim' must be even for RoPE, got ", head_dim));
  if (!(rope_theta > 0)) throw std::runtime_error("key 'rope_theta' must be positive");
  if (!(rms_eps > 0)) throw std::runtime_error("key 'rms_norm_eps' must be positive");
  if (rope_scaling && !(rope_scaling->high_freq_factor > rope_scaling->low_freq_factor)) {
    throw std::runtime_error("llama3 rope scaling needs high_freq_factor > low_freq_factor");
  }
  // The bias / norm switches each family has, so config_to_json can write them back.
  bool ok = model_type == "qwen2"   ? attention_bias && !o_proj_bias && !qk_norm
            : model_type == "qwen3" ? o_proj_bias == attention_bias && qk_norm
            : model_type == "llama" ? o_proj_bias == attention_bias && !qk_norm
                                    : false;
  if (!ok) {
    throw std::runtime_error(c10::str("model_type '", model_type,
                                      "' does not match attention_bias/o_proj_bias/qk_norm"));
  }
}

ModelConfig load_config(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(c10::str("cannot open config file ", path.string()));
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw std::runtime_error(c10::str(path.string(), ": invalid JSON"));
  return parse_config(j, path.string());
}

json config_to_json(const ModelConfig& c) {
  c.validate();
  static const std::map<std::string, std::string> kArch = {
      {"llama", "LlamaForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"}, {"qwen3", "Qwen3ForCausalLM"}};
  json rope = {{"rope_theta", c.rope_theta}, {"rope_type", "default"}};
  if (c.rope_scaling) {
    rope["rope_type"] = "llama3";
    rope["factor"] = c.rope_scaling->factor;
    rope["low_freq_factor"] = c.rope_scaling->low_freq_factor;
    rope["high_freq_factor"] = c.rope_scaling->high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope_scaling->original_max_position_embeddings;
  }
  json j = {
      {"architectures", {kArch.at(c.model_type)}},
      {"model_type", c.model_type},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_layers},
      {"num_attention_heads", c.num_heads},
      {"num_key_value_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rope_parameters", rope},
      {"rms_norm_eps", c.rms_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", "silu"},
      {"dtype", dtype_name(c.dtype)},
      {"bos_token_id", c.bos_token_id ? json(*c.bos_token_id) : json(nullptr)},
  };
  if (c.model_type != "qwen2") j["attention_bias"] = c.attention_bias;
  if (c.model_type == "llama") j["mlp_bias"] = false;
  if (c.model_type != "llama") j["use_sliding_window"] = false;
  if (c.eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else {
    j["eos_token_id"] = c.eos_token_ids;
  }
  return j;
}

}  // namespace gkv::model
