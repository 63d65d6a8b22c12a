// Python bindings of the eviction policies, the compressed KV cache and the generation engine
// (gkv_ext._C.Policy, CompressedKVCache, generate, teacher_forced). Bindings only bind: the logic
// lives in csrc/cache/ and csrc/engine/.
#include <pybind11/functional.h>
#include <torch/extension.h>

#include "cache/kv_cache.h"
#include "cache/policy.h"
#include "engine/generate.h"
#include "engine/sm_partition.h"

namespace py = pybind11;
using gkv::cache::CacheShape;
using gkv::cache::CompressedKVCache;
using gkv::cache::History;
using gkv::cache::Observation;
using gkv::cache::Policy;
using gkv::cache::kAlpha, gkv::cache::kGkvLambda, gkv::cache::kRkvLambda, gkv::cache::kSinks,
    gkv::cache::kWindow;

#pragma GCC diagnostic ignored "-Wattributes"  // see csrc/python/model.cpp

namespace {

// Enum fields travel as their names ("window", "max", ...), so Python code reads like the paper.
template <typename E, E Policy::*field, E (*parse)(const std::string&)>
void enum_property(py::class_<Policy>& cls, const char* name, const char* doc) {
  cls.def_property(
      name, [](const Policy& p) { return gkv::cache::to_string(p.*field); },
      [](Policy& p, const std::string& s) { p.*field = parse(s); }, doc);
}

}  // namespace

void bind_engine(py::module& m) {
  py::class_<Policy> policy(m, "Policy",
                            "An eviction policy: budget, schedule and score parts "
                            "(csrc/cache/policy.h has the formula).");
  policy.def(py::init<>())
      .def_readwrite("name", &Policy::name)
      .def_readwrite("budget", &Policy::budget, "Kept slots per KV head; None keeps everything.")
      .def_readwrite("window", &Policy::window)
      .def_readwrite("divide_length", &Policy::divide_length)
      .def_readwrite("normalize", &Policy::normalize)
      .def_readwrite("alpha", &Policy::alpha)
      .def_readwrite("pool_kernel", &Policy::pool_kernel)
      .def_readwrite("lam", &Policy::lambda, "lambda: score = lam * P - (1 - lam) * R")
      .def_readwrite("threshold", &Policy::threshold)
      .def_readwrite("sinks", &Policy::sinks)
      .def("validate", &Policy::validate)
      .def_property_readonly("evicts", &Policy::evicts)
      .def_static("full_kv", &Policy::full_kv)
      .def_static("streaming_llm", &Policy::streaming_llm, py::arg("budget"),
                  py::arg("sinks") = kSinks)
      .def_static("h2o_sampled", &Policy::h2o_sampled, py::arg("budget"),
                  py::arg("alpha") = kAlpha)
      .def_static("h2o_accumulate", &Policy::h2o_accumulate, py::arg("budget"),
                  py::arg("window") = kWindow)
      .def_static("snapkv", &Policy::snapkv, py::arg("budget"), py::arg("window") = kWindow)
      .def_static("rkv", &Policy::rkv, py::arg("budget"), py::arg("window") = kWindow,
                  py::arg("lam") = kRkvLambda)
      .def_static("tova", &Policy::tova, py::arg("budget"), py::arg("window") = kWindow)
      .def_static("gkv",
                  [](int64_t budget, int64_t window, double alpha, double lam,
                     const std::string& history) {
                    return Policy::gkv(budget, window, alpha, lam,
                                       gkv::cache::history_from_string(history));
                  },
                  py::arg("budget"), py::arg("window") = kWindow, py::arg("alpha") = kAlpha,
                  py::arg("lam") = kGkvLambda, py::arg("history") = "max")
      .def("__repr__", [](const Policy& p) {
        return "Policy(name=" + p.name +
               ", budget=" + (p.budget ? std::to_string(*p.budget) : std::string("None")) +
               ", window=" + std::to_string(p.window) +
               ", divide_length=" + std::to_string(p.divide_length) +
               ", observation=" + gkv::cache::to_string(p.observation) +
               ", normalize=" + (p.normalize ? "True" : "False") +
               ", history=" + gkv::cache::to_string(p.history) +
               ", alpha=" + std::to_string(p.alpha) +
               ", pool_kernel=" + std::to_string(p.pool_kernel) +
               ", lam=" + std::to_string(p.lambda) +
               ", threshold=" + std::to_string(p.threshold) +
               ", sinks=" + std::to_string(p.sinks) + ")";
      });
  enum_property<Observation, &Policy::observation, gkv::cache::observation_from_string>(
      policy, "observation", "'window', 'last', 'accumulate' or 'none'");
  enum_property<History, &Policy::history, gkv::cache::history_from_string>(
      policy, "history", "'none', 'max', 'mean' or 'sum'");

  py::class_<CompressedKVCache>(m, "CompressedKVCache",
                                "The compressed KV cache of one batch (csrc/cache/kv_cache.h).")
      .def(py::init([](const Policy& policy, int64_t layers, int64_t batch, int64_t q_heads,
                       int64_t kv_heads, int64_t head_dim, int64_t max_tokens,
                       at::ScalarType dtype, const std::string& device, bool eviction_log) {
             const CacheShape shape{layers,   batch, q_heads, kv_heads,
                                    head_dim, dtype, at::Device(device)};
             return CompressedKVCache(policy, shape, max_tokens, eviction_log);
           }),
           py::arg("policy"), py::arg("layers"), py::arg("batch"), py::arg("q_heads"),
           py::arg("kv_heads"), py::arg("head_dim"), py::arg("max_tokens"),
           py::arg("dtype") = at::kFloat, py::arg("device") = "cpu", py::arg("eviction_log") = true)
      .def("begin_prefill", &CompressedKVCache::begin_prefill, py::arg("attention_mask"),
           "attention_mask [B,P] -> positions [B,P] int64")
      .def("begin_decode", &CompressedKVCache::begin_decode, py::arg("tokens") = 1,
           "-> positions [B,T] int64 of T new tokens per row")
      .def("attend", &CompressedKVCache::attend, py::arg("layer"), py::arg("q"), py::arg("k"),
           py::arg("v"), "q [B,Hq,T,d], k/v [B,Hkv,T,d] post-RoPE -> out [B,Hq,T,d]")
      .def("end_forward", &CompressedKVCache::end_forward)
      .def("decode_compresses", &CompressedKVCache::decode_compresses, py::arg("tokens") = 1,
           "whether a forward of `tokens` new tokens would compress the cache")
      .def("decode_span", &CompressedKVCache::decode_span,
           "slots a one-token forward attends over (masked past the live length)")
      .def("account_replayed_decode",
           [](CompressedKVCache& cache, const std::function<void()>& replay) {
             cache.account_replayed_decode(replay);
           },
           py::arg("replay"),
           "a one-token forward whose device work is replay() (a CUDA graph's replay): checks "
           "that it fits, calls replay, keeps the host books, and compresses after it on a "
           "compression step")
      .def_property_readonly("capacity", &CompressedKVCache::capacity)
      .def_property_readonly("length", &CompressedKVCache::length)
      .def_property_readonly("forwards", &CompressedKVCache::forwards)
      .def("keys", &CompressedKVCache::keys, py::arg("layer"))
      .def("values", &CompressedKVCache::values, py::arg("layer"))
      .def("positions", &CompressedKVCache::positions, py::arg("layer"))
      .def("scores", &CompressedKVCache::scores, py::arg("layer"))
      .def("exemptions", &CompressedKVCache::exemptions, py::arg("layer"),
           "[B,Hkv,cap] int32: the redundancy exemptions carried to the next compression (slots "
           "[0, carried_length)); undefined (None) without a redundancy term")
      .def_property_readonly("carried_length", &CompressedKVCache::carried_length)
      .def("death", &CompressedKVCache::death, "[B,L,Hkv,max_tokens] int32 eviction log")
      .def_property_readonly("keeps_eviction_log", &CompressedKVCache::keeps_eviction_log);

  py::class_<gkv::engine::GenerateResult>(m, "GenerateResult")
      .def_readonly("tokens", &gkv::engine::GenerateResult::tokens)
      .def_readonly("logprobs", &gkv::engine::GenerateResult::logprobs)
      .def_readonly("lengths", &gkv::engine::GenerateResult::lengths)
      .def_readonly("prompt_lengths", &gkv::engine::GenerateResult::prompt_lengths)
      .def_readonly("death", &gkv::engine::GenerateResult::death)
      .def_readonly("kv_slots", &gkv::engine::GenerateResult::kv_slots);
  py::class_<gkv::engine::ForcedResult>(m, "ForcedResult")
      .def_readonly("logprobs", &gkv::engine::ForcedResult::logprobs)
      .def_readonly("death", &gkv::engine::ForcedResult::death);

  m.def(
      "generate",
      [](const gkv::model::Decoder& model, const std::vector<std::vector<int64_t>>& prompts,
         const Policy& policy, int64_t max_new_tokens, double temperature, double top_p,
         int64_t top_k, uint64_t seed, std::optional<std::vector<int64_t>> eos_token_ids,
         std::vector<int64_t> stop_token_ids, std::optional<int64_t> pad_token_id,
         bool cuda_graph, const py::object& on_token, bool eviction_log) {
        gkv::engine::GenerateOptions o;
        o.max_new_tokens = max_new_tokens;
        o.sampling = {temperature, top_p, top_k, seed};
        o.eos_token_ids = std::move(eos_token_ids);
        o.stop_token_ids = std::move(stop_token_ids);
        o.pad_token_id = pad_token_id;
        o.cuda_graph = cuda_graph;
        o.eviction_log = eviction_log;
        if (!on_token.is_none()) {
          // The engine runs without the GIL; the call takes it. Only False stops, None goes on.
          o.on_token = [on_token](int64_t step, const at::Tensor& tokens) {
            py::gil_scoped_acquire gil;
            return on_token(step, tokens).ptr() != Py_False;
          };
        }
        py::gil_scoped_release no_gil;
        return gkv::engine::generate(model, prompts, policy, o);
      },
      py::arg("model"), py::arg("prompts"), py::arg("policy"), py::arg("max_new_tokens") = 128,
      py::arg("temperature") = 0.0, py::arg("top_p") = 1.0, py::arg("top_k") = 0,
      py::arg("seed") = 0, py::arg("eos_token_ids") = py::none(),
      py::arg("stop_token_ids") = std::vector<int64_t>{}, py::arg("pad_token_id") = py::none(),
      py::arg("cuda_graph") = true, py::arg("on_token") = py::none(),
      py::arg("eviction_log") = true,
      "Batched generation with a compressed KV cache (csrc/engine/generate.h).");
  m.def(
      "teacher_forced",
      [](const gkv::model::Decoder& model, const std::vector<std::vector<int64_t>>& prompts,
         const at::Tensor& tokens, const Policy& policy, std::optional<int64_t> pad_token_id,
         bool eviction_log) {
        py::gil_scoped_release no_gil;
        return gkv::engine::teacher_forced(model, prompts, tokens, policy, pad_token_id,
                                           eviction_log);
      },
      py::arg("model"), py::arg("prompts"), py::arg("tokens"), py::arg("policy"),
      py::arg("pad_token_id") = py::none(), py::arg("eviction_log") = true,
      "Runs given tokens [B,T] after the prompts in chunks ending at the compression steps.");

  using gkv::engine::DecodeStepper;
  py::class_<DecodeStepper>(m, "DecodeStepper",
                            "One-token decode steps of a model through its cache, replayed from a "
                            "CUDA graph where possible (csrc/engine/decode_step.h).")
      .def(py::init<const gkv::model::Decoder&, CompressedKVCache&, bool>(), py::arg("model"),
           py::arg("cache"), py::arg("cuda_graph") = true,
           py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
      .def(
          "step",
          [](DecodeStepper& s, const at::Tensor& tokens) {
            py::gil_scoped_release no_gil;
            return s.step(tokens);
          },
          py::arg("tokens"),
          "tokens [B] int64 -> logits [B,V] in the model's dtype (overwritten by the next step)")
      .def_property_readonly("replays", &DecodeStepper::replays,
                             "steps that were CUDA graph replays")
      .def_property_readonly("compression_replays", &DecodeStepper::compression_replays,
                             "compressions that were CUDA graph replays");

  using gkv::engine::SmPartition;
  py::class_<SmPartition>(m, "SmPartition",
                          "The device's SMs in two disjoint sets, each behind its own stream "
                          "(CUDA green contexts; csrc/engine/sm_partition.h).")
      .def(py::init<int, int>(), py::arg("device"), py::arg("first_sms"))
      .def("sms", &SmPartition::sms, py::arg("set"), "SMs of set 0 or 1")
      .def("stream", &SmPartition::stream, py::arg("set"),
           "cudaStream_t of set 0 or 1 as an integer, for torch.cuda.ExternalStream; valid "
           "while the SmPartition lives")
      .def_property_readonly("device", &SmPartition::device);
}
