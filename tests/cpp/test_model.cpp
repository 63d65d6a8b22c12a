// The decoder's C++ API as the trainer uses it: config parsing errors, a safetensors round trip and
// a corrupt file, and the forward pass of a small random model (left padding, pluggable attention).
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "catch.hpp"
#include "model/decoder.h"
#include "model/llama2ts.h"

namespace fs = std::filesystem;
using namespace gkv::model;

namespace {

nlohmann::json small_config() {
  return {{"model_type", "qwen3"}, {"hidden_size", 32},         {"intermediate_size", 48},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
          {"head_dim", 8},          {"vocab_size", 50},         {"tie_word_embeddings", true}};
}

Decoder random_decoder() {
  at::manual_seed(0);
  ModelConfig c = parse_config(small_config());
  return Decoder::from_named(c, [](const std::string&, c10::IntArrayRef shape) {
    return at::randn(shape) * 0.3;
  });
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("gkv_test_model_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// Counts the forwards of its layers and runs full causal attention.
struct CountingAttention final : Attention {
  CausalAttention inner;
  int64_t calls = 0;
  at::Tensor forward(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) override {
    REQUIRE(layer == calls++);
    return inner.forward(layer, q, k, v);
  }
};

}  // namespace

TEST_CASE("parse_config names the missing or ill-typed key", "[model]") {
  auto j = small_config();
  j.erase("hidden_size");
  REQUIRE_THROWS_WITH(parse_config(j), gkv_test::contains("key 'hidden_size' is missing"));
  j = small_config();
  j["num_attention_heads"] = 4.5;
  REQUIRE_THROWS_WITH(parse_config(j), gkv_test::contains("key 'num_attention_heads' must be an integer"));
  j = small_config();
  j["model_type"] = "mistral";
  REQUIRE_THROWS_WITH(parse_config(j), gkv_test::contains("'mistral'"));
  auto c = parse_config(small_config());
  REQUIRE(c.qk_norm);
  REQUIRE(parse_config(config_to_json(c)).head_dim == 8);
}

TEST_CASE("safetensors round trip, and a truncated file is one clear error", "[model]") {
  fs::path dir = temp_dir("st");
  NamedTensors tensors = {{"a", at::randn({3, 5})},
                          {"b", at::arange(7, at::kLong)},
                          {"c", at::randn({2, 2}).to(at::kBFloat16)}};
  save_safetensors(dir / "x.safetensors", tensors);
  SafetensorsFile file(dir / "x.safetensors");
  REQUIRE(file.metadata().at("format") == "pt");
  for (const auto& [name, t] : tensors) REQUIRE(at::equal(file.load(name), t));

  fs::resize_file(dir / "x.safetensors", fs::file_size(dir / "x.safetensors") - 3);
  REQUIRE_THROWS_WITH(SafetensorsFile(dir / "x.safetensors"),
                      gkv_test::contains("outside the data section"));
  fs::remove_all(dir);
}

TEST_CASE("decoder forward: shapes, layer order, left padding, save/load", "[model]") {
  Decoder model = random_decoder();
  auto tokens = at::randint(0, 50, {2, 9}, at::kLong);
  auto positions = at::arange(9, at::kLong).expand({2, 9});
  CountingAttention attention;
  auto logits = model.forward(tokens, positions, attention);
  REQUIRE(logits.sizes() == at::IntArrayRef({2, 9, 50}));
  REQUIRE(attention.calls == 2);

  // Row 1 left-padded by 4: its real tokens give the logits of the same tokens alone.
  auto mask = at::ones({2, 9}, at::kLong);
  mask[1].slice(0, 0, 4).zero_();
  CausalAttention masked(mask);
  auto padded = model.forward(tokens, positions_from_mask(mask), masked);
  CausalAttention plain;
  auto alone = model.forward(tokens[1].slice(0, 4).unsqueeze(0).contiguous(),
                             at::arange(5, at::kLong).unsqueeze(0), plain);
  REQUIRE(at::allclose(padded[1].slice(0, 4), alone[0], 1e-5, 1e-4));
  REQUIRE(at::allclose(padded[0], logits[0], 1e-5, 1e-4));

  fs::path dir = temp_dir("save");
  save_decoder(model, dir / "ckpt");
  Decoder again = load_decoder(dir / "ckpt");
  CausalAttention fresh;
  REQUIRE(at::equal(again.forward(tokens, positions, fresh), logits));
  fs::remove_all(dir);
}

TEST_CASE("stories260K tokenizer round trip (skipped without ../shared)", "[model]") {
  fs::path tok = fs::path(__FILE__).parent_path() / "../../../shared/models/stories260k/tok512.bin";
  if (!fs::exists(tok)) {
    WARN("stories260K tokenizer not found at " << tok << "; skipped");
    return;
  }
  Llama2Tokenizer t = Llama2Tokenizer::load(tok);
  const std::string text = "Once upon a time, there was a little";
  auto ids = t.encode(text);
  REQUIRE(ids.front() == Llama2Tokenizer::kBos);
  REQUIRE(t.decode(ids) == text);
}

TEST_CASE("a replaced projection weight is used instead of the joint tensor it left", "[model]") {
  Decoder model = random_decoder();
  const at::Tensor tokens = at::randint(0, 50, {2, 6}, at::kLong);
  const at::Tensor positions = at::arange(6, at::kLong).expand({2, 6}).contiguous();
  CausalAttention attention;
  at::NoGradGuard no_grad;
  const at::Tensor before = model.forward(tokens, positions, attention);
  LayerWeights& layer = model.weights().layers[1];
  // Fresh tensors in the named slots: the joint ones keep the old values.
  layer.wk = layer.wk * -2;
  layer.w_up = layer.w_up * -2;
  const at::Tensor after = model.forward(tokens, positions, attention);
  REQUIRE((after - before).abs().max().item<float>() > 1e-3);
  // The same change made in place through the joint tensors gives the same logits.
  Decoder joint = random_decoder();
  LayerWeights& same = joint.weights().layers[1];
  same.wqkv.narrow(0, same.wq.size(0), same.wk.size(0)).mul_(-2);
  same.w_gate_up.narrow(0, same.w_gate.size(0), same.w_up.size(0)).mul_(-2);
  REQUIRE(at::allclose(joint.forward(tokens, positions, attention), after, 1e-5, 1e-5));
}
