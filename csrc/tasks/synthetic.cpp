#include "tasks/synthetic.h"

#include <algorithm>
#include <array>
#include <stdexcept>
#include <unordered_set>

namespace gkv::tasks::synthetic {

namespace {

// Distractors refer to another variable this often (in 1/4ths); the rest are constants.
constexpr uint64_t kReferenceQuarters = 3;

// splitmix64: tiny, and the same numbers everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n): the modulo bias is below 2^-40 for the n used here.
  uint64_t below(uint64_t n) { return next() % n; }

 private:
  uint64_t state_;
};

struct Definition {
  std::string name;
  int64_t source = -1;  // index of the variable it refers to; -1: a constant
  int64_t offset = 0;   // the constant, or the amount added / subtracted
  bool minus = false;
  int64_t value = 0;
};

// Shortest name length that leaves at least four names per variable, so names are spread out.
int64_t name_length(int64_t num_variables) {
  int64_t length = 2, names = 26 * 26;
  while (names < 4 * num_variables) {
    ++length;
    names *= 26;
  }
  return length;
}

int64_t digits(int64_t n) { return static_cast<int64_t>(std::to_string(n).size()); }

std::string definition_line(const Definition& d, const std::vector<Definition>& defs) {
  if (d.source < 0) return d.name + "=" + std::to_string(d.offset) + "\n";
  return d.name + "=" + defs[d.source].name + (d.minus ? "-" : "+") + std::to_string(d.offset) + "\n";
}

// Expected characters of an example, prompt plus response, with names of length L and values of
// D digits: a constant line "L=D\n", a reference "L=L+D\n", an evaluation step "L=D+D=D\n".
double expected_chars(const Options& o) {
  const double L = static_cast<double>(name_length(o.num_variables));
  const double D = static_cast<double>(digits(o.modulus - 1));
  const double constant = L + D + 2, reference = 2 * L + D + 3, step = L + 3 * D + 4;
  const double distractor = (kReferenceQuarters * reference + (4 - kReferenceQuarters) * constant) / 4;
  const double depth = static_cast<double>(o.chain_depth);
  const double chain = (depth - 1) * reference + constant;  // written twice: prompt and lookups
  return 2 * chain + (static_cast<double>(o.num_variables) - depth) * distractor +
         (depth - 1) * step + (L + 2) + (8 + D);  // + "L?\n" + "Answer: D"
}

}  // namespace

void Options::validate() const {
  if (modulus < 2 || modulus > 1000) {
    throw std::invalid_argument("synthetic options: modulus must be in [2, 1000], got " + std::to_string(modulus));
  }
  if (chain_depth < 1 || chain_depth > 4096) {
    throw std::invalid_argument("synthetic options: chain_depth must be in [1, 4096], got " +
                                std::to_string(chain_depth));
  }
  if (num_variables < chain_depth || num_variables > 100000) {
    throw std::invalid_argument("synthetic options: num_variables must be in [chain_depth = " +
                                std::to_string(chain_depth) + ", 100000], got " +
                                std::to_string(num_variables));
  }
}

Example make_example(const Options& options, uint64_t seed) {
  options.validate();
  Rng rng(seed);
  const int64_t n = options.num_variables, m = options.modulus;

  std::vector<Definition> defs(static_cast<size_t>(n));
  std::unordered_set<std::string> used;
  const int64_t length = name_length(n);
  for (auto& d : defs) {
    do {
      d.name.clear();
      for (int64_t i = 0; i < length; ++i) d.name += static_cast<char>('a' + rng.below(26));
    } while (!used.insert(d.name).second);
  }
  // Variables 0..depth-1 form the asked chain (0 a constant, each next one refers to the one
  // before); the distractors after them refer only to earlier variables, so there is no cycle.
  const int64_t depth = options.chain_depth;
  for (int64_t i = 0; i < n; ++i) {
    auto& d = defs[i];
    const bool is_reference =
        i < depth ? i > 0 : rng.below(4) < kReferenceQuarters;
    if (!is_reference) {
      d.offset = static_cast<int64_t>(rng.below(m));
      d.value = d.offset;
      continue;
    }
    d.source = i < depth ? i - 1 : static_cast<int64_t>(rng.below(i));
    d.offset = 1 + static_cast<int64_t>(rng.below(m - 1));
    d.minus = rng.below(2) == 1;
    const int64_t base = defs[d.source].value;
    d.value = ((d.minus ? base - d.offset : base + d.offset) % m + m) % m;
  }

  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);  // Fisher-Yates

  Example ex;
  for (const int64_t i : order) ex.prompt += definition_line(defs[i], defs);
  const auto& asked = defs[depth - 1];
  ex.prompt += asked.name + "?\n";
  for (int64_t i = depth - 1; i >= 0; --i) ex.response += definition_line(defs[i], defs);
  for (int64_t i = 1; i < depth; ++i) {
    const auto& d = defs[i];
    ex.response += d.name + "=" + std::to_string(defs[d.source].value) + (d.minus ? "-" : "+") +
                   std::to_string(d.offset) + "=" + std::to_string(d.value) + "\n";
  }
  ex.answer = std::to_string(asked.value);
  ex.response += "Answer: " + ex.answer;
  return ex;
}

Options options_for_length(int64_t tokens) {
  if (tokens < 64 || tokens > 65536) {
    throw std::invalid_argument("synthetic options_for_length: tokens must be in [64, 65536], got " +
                                std::to_string(tokens));
  }
  Options o;
  o.chain_depth = std::clamp<int64_t>(tokens / 64, 2, 4096);
  o.num_variables = o.chain_depth;
  while (expected_chars(o) < static_cast<double>(tokens)) ++o.num_variables;
  o.validate();
  return o;
}

const std::vector<std::string>& char_vocabulary() {
  static const std::vector<std::string> vocab = [] {
    std::vector<std::string> v = {"<pad>", "<bos>", "<eos>", "<unk>", "\n", " ", "+", "-", ":", "=", "?", "A"};
    for (char c = '0'; c <= '9'; ++c) v.emplace_back(1, c);
    for (char c = 'a'; c <= 'z'; ++c) v.emplace_back(1, c);
    return v;
  }();
  return vocab;
}

std::vector<int64_t> char_token_ids(std::string_view text) {
  static const std::array<int64_t, 256> ids = [] {
    std::array<int64_t, 256> table;
    table.fill(-1);
    const auto& vocab = char_vocabulary();
    for (size_t i = 0; i < vocab.size(); ++i) {
      if (vocab[i].size() == 1) table[static_cast<unsigned char>(vocab[i][0])] = static_cast<int64_t>(i);
    }
    return table;
  }();
  std::vector<int64_t> out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const int64_t id = ids[static_cast<unsigned char>(text[i])];
    if (id < 0) {
      throw std::invalid_argument("char_token_ids: byte " + std::to_string(static_cast<unsigned char>(text[i])) +
                                  " at offset " + std::to_string(i) + " is not in the character vocabulary");
    }
    out.push_back(id);
  }
  return out;
}

}  // namespace gkv::tasks::synthetic
