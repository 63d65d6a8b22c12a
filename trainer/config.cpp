#include "trainer/config.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <variant>

namespace gkv::trainer {

namespace {

using Field = std::variant<std::string Config::*, bool Config::*, int64_t Config::*,
                           uint64_t Config::*, double Config::*>;
// "" when the value is acceptable, else what is expected.
using Check = std::function<std::string(const Config&)>;

struct Key {
  const char* name;
  Field field;
  const char* help;
  Check check;
};

template <typename T>
Check at_least(T Config::*f, T low) {
  return [=](const Config& c) {
    std::ostringstream message;  // "must be >= 0", not std::to_string's "0.000000"
    if (!(c.*f >= low)) message << "must be >= " << low;
    return message.str();
  };
}

Check positive(double Config::*f) {
  return [=](const Config& c) { return c.*f > 0 ? std::string() : std::string("must be > 0"); };
}

Check in_unit(double Config::*f, bool include_zero) {
  return [=](const Config& c) {
    const double v = c.*f;
    const bool ok = (include_zero ? v >= 0 : v > 0) && v <= 1;
    return ok ? std::string() : std::string(include_zero ? "must be in [0, 1]" : "must be in (0, 1]");
  };
}

Check one_of(std::string Config::*f, std::vector<std::string> allowed) {
  return [=](const Config& c) {
    for (const auto& a : allowed) {
      if (c.*f == a) return std::string();
    }
    std::string s = "must be one of";
    for (const auto& a : allowed) s += " " + a;
    return s;
  };
}

// out_dir is created when absent; where it exists it must be a directory.
Check directory_or_absent(std::string Config::*f) {
  return [=](const Config& c) {
    std::error_code ec;
    const bool file = std::filesystem::exists(c.*f, ec) && !std::filesystem::is_directory(c.*f, ec);
    return file ? std::string("must be a directory (made when absent), not a file") : std::string();
  };
}

// A data file: a directory there would read as a file with no examples.
Check not_a_directory(std::string Config::*f) {
  return [=](const Config& c) {
    std::error_code ec;
    return std::filesystem::is_directory(c.*f, ec) ? std::string("must be a JSONL file, not a directory")
                                                    : std::string();
  };
}

Check any() {
  return [](const Config&) { return std::string(); };
}

const std::vector<std::string> kPolicies = {"gkv",  "snapkv", "rkv",          "h2o", "h2o_accumulate",
                                            "tova", "streamingllm", "fullkv"};

const std::vector<Key>& keys() {
  static const std::vector<Key> table = {
      {"model", &Config::model, "checkpoint directory (or llama2.ts .bin) to start from", any()},
      {"data", &Config::data, "training JSONL (prompt, response, answer, answer_kind)",
       not_a_directory(&Config::data)},
      {"out_dir", &Config::out_dir, "checkpoints step-N/ and metrics.jsonl go here",
       directory_or_absent(&Config::out_dir)},
      {"eval_data", &Config::eval_data, "evaluation JSONL; empty: no evaluation",
       not_a_directory(&Config::eval_data)},
      {"vocab", &Config::vocab, "vocab.json; empty: vocab.json beside data", any()},
      {"teacher", &Config::teacher, "distill: teacher checkpoint; empty: the initial weights", any()},
      {"device", &Config::device, "cpu or cuda (cuda: LOCAL_RANK picks the GPU)",
       one_of(&Config::device, {"cpu", "cuda"})},
      {"bf16", &Config::bf16, "bf16 autocast of training forwards on cuda; weights stay fp32", any()},
      {"seed", &Config::seed, "data order and sampling seed", any()},
      {"steps", &Config::steps, "training steps", at_least<int64_t>(&Config::steps, 1)},
      {"batch_size", &Config::batch_size, "examples (rl: prompts) per step over all ranks",
       at_least<int64_t>(&Config::batch_size, 1)},
      {"micro_batch_size", &Config::micro_batch_size,
       "examples per forward; the rest of a step accumulates gradients",
       at_least<int64_t>(&Config::micro_batch_size, 1)},
      {"max_seq_len", &Config::max_seq_len, "prompt + response tokens kept per example",
       at_least<int64_t>(&Config::max_seq_len, 2)},
      {"resume", &Config::resume, "continue from the latest checkpoint in out_dir", any()},
      {"lr", &Config::lr, "peak learning rate", positive(&Config::lr)},
      {"lr_schedule", &Config::lr_schedule, "cosine or constant, after linear warmup",
       one_of(&Config::lr_schedule, {"cosine", "constant"})},
      {"warmup_steps", &Config::warmup_steps, "linear warmup steps",
       at_least<int64_t>(&Config::warmup_steps, 0)},
      {"min_lr_ratio", &Config::min_lr_ratio, "cosine floor as a fraction of lr",
       in_unit(&Config::min_lr_ratio, true)},
      {"weight_decay", &Config::weight_decay, "AdamW decoupled weight decay",
       at_least<double>(&Config::weight_decay, 0.0)},
      {"beta1", &Config::beta1, "AdamW beta1", in_unit(&Config::beta1, true)},
      {"beta2", &Config::beta2, "AdamW beta2", in_unit(&Config::beta2, true)},
      {"adam_eps", &Config::adam_eps, "AdamW epsilon", positive(&Config::adam_eps)},
      {"grad_clip", &Config::grad_clip, "max global gradient norm; 0: no clipping",
       at_least<double>(&Config::grad_clip, 0.0)},
      {"policy", &Config::policy, "KV eviction policy of rollouts and training forwards",
       one_of(&Config::policy, kPolicies)},
      {"budget", &Config::budget, "kept KV slots per head (required unless policy=fullkv)",
       at_least<int64_t>(&Config::budget, 0)},
      {"window", &Config::window, "recent tokens always kept (observation window)",
       at_least<int64_t>(&Config::window, 1)},
      {"divide_length", &Config::divide_length, "compression every this many decode steps",
       at_least<int64_t>(&Config::divide_length, 1)},
      {"max_new_tokens", &Config::max_new_tokens, "rollout / teacher response length limit",
       at_least<int64_t>(&Config::max_new_tokens, 1)},
      {"temperature", &Config::temperature,
       "rollout sampling temperature (0: greedy); rl log-probs use logits / temperature",
       at_least<double>(&Config::temperature, 0.0)},
      {"top_p", &Config::top_p, "rollout nucleus mass", in_unit(&Config::top_p, false)},
      {"top_k", &Config::top_k, "rollout top-k; 0: none", at_least<int64_t>(&Config::top_k, 0)},
      {"log_every", &Config::log_every, "progress line every this many steps",
       at_least<int64_t>(&Config::log_every, 1)},
      {"eval_every", &Config::eval_every,
       "evaluate (compressed and FullKV accuracy) every this many steps and at the end; 0: never",
       at_least<int64_t>(&Config::eval_every, 0)},
      {"eval_samples", &Config::eval_samples, "eval examples used; 0: all",
       at_least<int64_t>(&Config::eval_samples, 0)},
      {"eval_max_new_tokens", &Config::eval_max_new_tokens, "greedy eval generation length",
       at_least<int64_t>(&Config::eval_max_new_tokens, 1)},
      {"save_every", &Config::save_every, "checkpoint every this many steps (and at the end)",
       at_least<int64_t>(&Config::save_every, 0)},
      {"keep_checkpoints", &Config::keep_checkpoints,
       "newest checkpoints kept in out_dir (older ones deleted); 0: all",
       at_least<int64_t>(&Config::keep_checkpoints, 0)},
      {"sft_compressed", &Config::sft_compressed,
       "sft: train under teacher-forced compression with the configured policy", any()},
      {"distill_temperature", &Config::distill_temperature, "distill: KL temperature",
       positive(&Config::distill_temperature)},
      {"distill_generate", &Config::distill_generate,
       "distill: responses generated by the teacher (FullKV) instead of the dataset's", any()},
      {"group_size", &Config::group_size, "rl: samples per prompt (G)",
       at_least<int64_t>(&Config::group_size, 2)},
      {"ppo_epochs", &Config::ppo_epochs, "rl: optimizer steps per rollout batch",
       at_least<int64_t>(&Config::ppo_epochs, 1)},
      {"clip_eps", &Config::clip_eps, "rl: PPO ratio clip epsilon", positive(&Config::clip_eps)},
      {"kl_coef", &Config::kl_coef, "rl: KL to the frozen initial model; 0: no reference",
       at_least<double>(&Config::kl_coef, 0.0)},
      {"clip_overlong", &Config::clip_overlong,
       "rl: truncated samples' negative advantages clamped to 0", any()},
      {"adv_eps", &Config::adv_eps, "rl: advantage = (r - mean) / (std + adv_eps)",
       positive(&Config::adv_eps)},
      {"dist_backend", &Config::dist_backend, "data parallel backend: auto, gloo or nccl",
       one_of(&Config::dist_backend, {"auto", "gloo", "nccl"})},
  };
  return table;
}

[[noreturn]] void fail(const std::string& key, const std::string& why) {
  throw std::invalid_argument("config key '" + key + "': " + why);
}

const Key& find_key(const std::string& name) {
  for (const auto& k : keys()) {
    if (name == k.name) return k;
  }
  fail(name, "unknown key (gkv-train --help lists them)");
}

// A JSON value into the key's field, type-checked.
void set_from_json(Config& c, const Key& key, const nlohmann::json& v) {
  std::visit(
      [&](auto f) {
        using T = std::remove_reference_t<decltype(c.*f)>;
        if constexpr (std::is_same_v<T, std::string>) {
          if (!v.is_string()) fail(key.name, "expected a string, got " + v.dump());
          c.*f = v.get<std::string>();
        } else if constexpr (std::is_same_v<T, bool>) {
          if (!v.is_boolean()) fail(key.name, "expected true or false, got " + v.dump());
          c.*f = v.get<bool>();
        } else if constexpr (std::is_integral_v<T>) {
          if (!v.is_number_integer()) fail(key.name, "expected an integer, got " + v.dump());
          if (std::is_unsigned_v<T> && v.get<int64_t>() < 0) fail(key.name, "must be >= 0");
          c.*f = v.get<T>();
        } else {
          if (!v.is_number()) fail(key.name, "expected a number, got " + v.dump());
          c.*f = v.get<double>();
        }
      },
      key.field);
}

// The text of a key=value override, as the JSON value of the key's type.
nlohmann::json parse_override(const Key& key, const std::string& text) {
  return std::visit(
      [&](auto f) -> nlohmann::json {
        using T = std::remove_reference_t<decltype(Config().*f)>;
        if constexpr (std::is_same_v<T, std::string>) {
          return text;
        } else {
          auto v = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
          if (v.is_discarded()) fail(key.name, "cannot parse '" + text + "'");
          return v;
        }
      },
      key.field);
}

nlohmann::json field_json(const Config& c, const Key& key) {
  return std::visit([&](auto f) { return nlohmann::json(c.*f); }, key.field);
}

}  // namespace

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  Config c;
  if (!path.empty()) {
    std::ifstream in(path);
    if (!in) throw std::invalid_argument("config file " + path + ": cannot open");
    nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      throw std::invalid_argument("config file " + path + ": not a JSON object");
    }
    for (const auto& [name, value] : j.items()) set_from_json(c, find_key(name), value);
  }
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw std::invalid_argument("override '" + o + "': expected key=value");
    }
    const Key& key = find_key(o.substr(0, eq));
    set_from_json(c, key, parse_override(key, o.substr(eq + 1)));
  }
  validate(c);
  return c;
}

void validate(const Config& c) {
  for (const auto& k : keys()) {
    const std::string why = k.check(c);
    if (!why.empty()) fail(k.name, why + ", got " + field_json(c, k).dump());
  }
  for (const char* required : {"model", "data", "out_dir"}) {
    if (field_json(c, find_key(required)).get<std::string>().empty()) fail(required, "is required");
  }
  if (c.batch_size % c.micro_batch_size != 0) {
    fail("micro_batch_size", "must divide batch_size = " + std::to_string(c.batch_size));
  }
  if (c.policy != "fullkv" && c.budget <= 0) fail("budget", "policy " + c.policy + " needs budget > 0");
  try {
    make_policy(c);
  } catch (const std::exception& e) {
    fail("policy", e.what());
  }
}

nlohmann::json to_json(const Config& c) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& k : keys()) j[k.name] = field_json(c, k);
  return j;
}

std::string help_text() {
  const Config defaults;
  std::ostringstream s;
  s << "usage: gkv-train sft|distill|rl --config FILE [key=value ...]\n"
       "FILE is a JSON object of keys; key=value overrides it. Keys (default):\n";
  for (const auto& k : keys()) {
    s << "  " << k.name << " (" << field_json(defaults, k).dump() << "): " << k.help << "\n";
  }
  return s.str();
}

cache::Policy make_policy(const std::string& name, int64_t budget, int64_t window,
                          int64_t divide_length) {
  using cache::Policy;
  Policy p;
  if (name == "fullkv") return Policy::full_kv();
  if (name == "gkv") p = Policy::gkv(budget, window);
  else if (name == "snapkv") p = Policy::snapkv(budget, window);
  else if (name == "rkv") p = Policy::rkv(budget, window);
  else if (name == "h2o") p = Policy::h2o_sampled(budget);  // window 1 by the recipe
  else if (name == "h2o_accumulate") p = Policy::h2o_accumulate(budget, window);
  else if (name == "tova") p = Policy::tova(budget, window);
  else if (name == "streamingllm") p = Policy::streaming_llm(budget);  // sinks + recent
  else throw std::invalid_argument("unknown policy '" + name + "'");
  p.divide_length = divide_length;
  p.validate();
  return p;
}

cache::Policy make_policy(const Config& c) {
  return make_policy(c.policy, c.budget, c.window, c.divide_length);
}

}  // namespace gkv::trainer
