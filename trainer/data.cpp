#include "trainer/data.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <random>
#include <stdexcept>

namespace gkv::trainer {

namespace {

std::vector<int64_t> token_list(const nlohmann::json& j, const char* key, int64_t vocab_size,
                                const std::string& where) {
  if (!j.is_array()) throw std::invalid_argument(where + ": '" + key + "' must be a list of token ids");
  std::vector<int64_t> out;
  for (const auto& v : j) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab_size) {
      throw std::invalid_argument(where + ": '" + key + "' holds " + v.dump() +
                                  ", not a token id in [0, " + std::to_string(vocab_size) + ")");
    }
    out.push_back(v.get<int64_t>());
  }
  return out;
}

}  // namespace

std::vector<Example> load_examples(const std::string& path, int64_t vocab_size) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("data file " + path + ": cannot open");
  std::vector<Example> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(n);
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) throw std::invalid_argument(where + ": not a JSON object");
    if (!j.contains("prompt")) throw std::invalid_argument(where + ": 'prompt' is required");
    Example e;
    e.prompt = token_list(j["prompt"], "prompt", vocab_size, where);
    if (e.prompt.empty()) throw std::invalid_argument(where + ": 'prompt' is empty");
    if (j.contains("response")) e.response = token_list(j["response"], "response", vocab_size, where);
    if (j.contains("answer")) {
      if (!j["answer"].is_string()) throw std::invalid_argument(where + ": 'answer' must be a string");
      e.answer = j["answer"].get<std::string>();
      if (!j.contains("answer_kind") || !j["answer_kind"].is_string()) {
        throw std::invalid_argument(where + ": 'answer_kind' (a string) must come with 'answer'");
      }
      try {
        e.answer_kind = tasks::answer_kind_from_string(j["answer_kind"].get<std::string>());
      } catch (const std::exception& err) {
        throw std::invalid_argument(where + ": 'answer_kind': " + err.what());
      }
    }
    out.push_back(std::move(e));
  }
  if (out.empty()) throw std::invalid_argument("data file " + path + ": no examples");
  return out;
}

DataOrder::DataOrder(int64_t size, uint64_t seed) : size_(size), seed_(seed) {}

int64_t DataOrder::index(int64_t i) {
  const int64_t epoch = i / size_;
  if (epoch != epoch_) {
    std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch));
    perm_.resize(size_);
    for (int64_t k = 0; k < size_; ++k) perm_[k] = k;
    for (int64_t k = size_ - 1; k > 0; --k) {
      const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(k + 1));
      std::swap(perm_[k], perm_[j]);
    }
    epoch_ = epoch;
  }
  return perm_[i % size_];
}

}  // namespace gkv::trainer
