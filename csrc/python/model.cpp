// Python bindings of the decoder (gkv_ext._C.Model), its config and the llama2.c tokenizer.
// Bindings only bind: the logic lives in csrc/model/.
#include <pybind11/stl/filesystem.h>  // str and os.PathLike -> std::filesystem::path
#include <torch/extension.h>

#include <nlohmann/json.hpp>
#include <variant>

#include "cache/kv_cache.h"
#include "engine/generate.h"
#include "model/decoder.h"
#include "model/llama2ts.h"

namespace py = pybind11;
using namespace gkv::model;

namespace {

// tokens [B,T] int64, positions [B,T] int64 (default: from the mask, else 0..T-1), attention_mask
// [B,T] (nonzero = real token) -> logits [B,T,V]; with a cache, through it (see the binding).
at::Tensor forward(const Decoder& model, const at::Tensor& tokens,
                   std::optional<at::Tensor> positions, std::optional<at::Tensor> attention_mask,
                   gkv::cache::CompressedKVCache* cache, bool last_only) {
  py::gil_scoped_release no_gil;
  if (cache) {
    TORCH_CHECK(positions && !attention_mask,
                "forward: with a cache, pass the positions its begin_prefill / begin_decode "
                "returned, and no attention_mask (the cache has it)");
    auto hidden = gkv::engine::cached_forward(model, *cache, tokens, *positions);
    if (last_only) hidden = hidden.narrow(1, hidden.size(1) - 1, 1);
    return model.logits(hidden);
  }
  if (!positions) {
    positions = attention_mask
                    ? positions_from_mask(attention_mask->to(tokens.device()))
                    : at::arange(tokens.size(-1), tokens.options().dtype(at::kLong)).expand(tokens.sizes());
  }
  CausalAttention attention(attention_mask);
  auto hidden = model.hidden_states(tokens, *positions, attention);
  if (last_only) hidden = hidden.narrow(1, hidden.size(1) - 1, 1);
  return model.logits(hidden);
}

// Tokens may end inside a character, and a corrupt vocabulary need not be UTF-8: decoded as
// transformers' tokenizers do, with U+FFFD, instead of raising UnicodeDecodeError.
py::str replacing_bad_utf8(const std::string& bytes) {
  PyObject* text = PyUnicode_DecodeUTF8(bytes.data(), static_cast<Py_ssize_t>(bytes.size()), "replace");
  if (!text) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(text);
}

}  // namespace

// pybind11's own types are hidden; ours are exported (the trainer links them), which GCC reports
// as a visibility mismatch for every bound class. It is harmless here: one module binds them.
#pragma GCC diagnostic ignored "-Wattributes"

void bind_model(py::module& m) {
  py::class_<Llama3RopeScaling>(m, "Llama3RopeScaling")
      .def_readonly("factor", &Llama3RopeScaling::factor)
      .def_readonly("low_freq_factor", &Llama3RopeScaling::low_freq_factor)
      .def_readonly("high_freq_factor", &Llama3RopeScaling::high_freq_factor)
      .def_readonly("original_max_position_embeddings",
                    &Llama3RopeScaling::original_max_position_embeddings);

  py::class_<ModelConfig>(m, "ModelConfig", "A decoder's architecture, as in config.json.")
      .def_static("from_json",
                  [](const std::string& text) {
                    auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
                    if (j.is_discarded()) throw std::runtime_error("config: invalid JSON");
                    return parse_config(j, "config");
                  },
                  py::arg("text"), "Parses the text of a transformers config.json.")
      .def_static("load", &load_config, py::arg("path"), "Reads a transformers config.json.")
      .def("to_json", [](const ModelConfig& c) { return config_to_json(c).dump(2); })
      .def_readonly("model_type", &ModelConfig::model_type)
      .def_readonly("hidden_size", &ModelConfig::hidden_size)
      .def_readonly("intermediate_size", &ModelConfig::intermediate_size)
      .def_readonly("num_layers", &ModelConfig::num_layers)
      .def_readonly("num_heads", &ModelConfig::num_heads)
      .def_readonly("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readonly("head_dim", &ModelConfig::head_dim)
      .def_readonly("vocab_size", &ModelConfig::vocab_size)
      .def_readonly("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def_readonly("rope_theta", &ModelConfig::rope_theta)
      .def_readonly("rope_scaling", &ModelConfig::rope_scaling)
      .def_readonly("rms_eps", &ModelConfig::rms_eps)
      .def_readonly("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_readonly("attention_bias", &ModelConfig::attention_bias)
      .def_readonly("o_proj_bias", &ModelConfig::o_proj_bias)
      .def_readonly("qk_norm", &ModelConfig::qk_norm)
      .def_readonly("dtype", &ModelConfig::dtype)
      .def_readonly("bos_token_id", &ModelConfig::bos_token_id)
      .def_readonly("eos_token_ids", &ModelConfig::eos_token_ids)
      .def("__repr__", [](const ModelConfig& c) { return "ModelConfig(" + config_to_json(c).dump() + ")"; });

  py::class_<Decoder>(m, "Model", "Llama / Qwen2 / Qwen3 decoder (csrc/model/decoder.h).")
      // Files are read and written without the GIL: a checkpoint saved from a background thread
      // leaves the other Python threads running.
      .def_static("load", &load_decoder, py::arg("path"), py::call_guard<py::gil_scoped_release>(),
                  "Loads a transformers checkpoint directory or a llama2.ts .bin file.")
      .def_property_readonly("config", &Decoder::config)
      .def_property_readonly("device", &Decoder::device)
      .def_property_readonly("dtype", [](const Decoder& d) { return d.config().dtype; })
      .def_static("from_tensors",
                  [](const ModelConfig& config, const std::map<std::string, at::Tensor>& tensors) {
                    return Decoder::from_named(config, [&](const std::string& name, c10::IntArrayRef) {
                      const auto it = tensors.find(name);
                      TORCH_CHECK(it != tensors.end(), "Model.from_tensors: tensors has no '", name, "'");
                      return it->second;
                    });
                  },
                  py::arg("config"), py::arg("tensors"),
                  "A decoder over the given tensors (named as in transformers' checkpoints, as "
                  "state_dict() returns them); shapes are checked against the config. The q/k/v "
                  "and gate/up weights are copied into one joint tensor each (one GEMM per group); "
                  "state_dict() returns views of them.")
      .def("forward", &forward, py::arg("tokens"), py::arg("positions") = py::none(),
           py::arg("attention_mask") = py::none(), py::arg("cache") = nullptr,
           py::arg("last_only") = false,
           "tokens [B,T] int64 -> logits [B,T,V] (or [B,1,V] for the last token with last_only).\n"
           "Without a cache: full causal attention among the tokens, pads masked. With a "
           "CompressedKVCache: one forward through it, after its begin_prefill / begin_decode "
           "(whose positions are passed here); the forward is ended before returning.")
      .def("__call__", &forward, py::arg("tokens"), py::arg("positions") = py::none(),
           py::arg("attention_mask") = py::none(), py::arg("cache") = nullptr,
           py::arg("last_only") = false)
      .def("to",
           [](Decoder& d, std::optional<std::variant<std::string, at::Device>> device,
              std::optional<at::ScalarType> dtype) -> Decoder& {
             std::optional<at::Device> dev;
             if (device) {
               dev = std::holds_alternative<at::Device>(*device)
                         ? std::get<at::Device>(*device)
                         : at::Device(std::get<std::string>(*device));  // "cpu", "cuda:1"
             }
             d.to(dev, dtype);
             return d;
           },
           py::arg("device") = py::none(), py::arg("dtype") = py::none(),
           py::return_value_policy::reference_internal)
      .def("save", &save_decoder, py::arg("dir"), py::arg("max_shard_bytes") = 0,
           py::call_guard<py::gil_scoped_release>(),
           "Writes config.json + safetensors atomically (sharded above max_shard_bytes > 0).")
      .def("state_dict", [](const Decoder& d) {
        py::dict out;
        for (const auto& [name, t] : d.named_tensors()) out[py::str(name)] = t;
        return out;
      }, "The weights under their transformers names (the model's own tensors).");

  py::class_<Llama2Tokenizer>(m, "Tokenizer", "The llama2.c tokenizer (stories260K).")
      .def_static("load", &Llama2Tokenizer::load, py::arg("path"),
                  "Reads tok512.bin (llama2.c format) or the vocabulary of a llama2.ts .bin file.")
      .def("encode", &Llama2Tokenizer::encode, py::arg("text"), py::arg("bos") = true,
           py::arg("eos") = false)
      .def("decode", [](const Llama2Tokenizer& t, const std::vector<int64_t>& ids) {
        return replacing_bad_utf8(t.decode(ids));
      }, py::arg("ids"), "The text; bytes that are not UTF-8 (a character cut short) become U+FFFD.")
      .def("piece", [](const Llama2Tokenizer& t, int64_t id) {
        return replacing_bad_utf8(t.piece(id));
      }, py::arg("id"))
      .def_property_readonly("vocab_size", &Llama2Tokenizer::vocab_size)
      .def_readonly_static("bos_id", &Llama2Tokenizer::kBos)
      .def_readonly_static("eos_id", &Llama2Tokenizer::kEos);
}
