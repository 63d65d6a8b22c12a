#include "tasks/tasks.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>

namespace gkv::tasks {

namespace {

constexpr std::string_view kWhitespace = " \t\r\n\f\v";

std::string_view trim(std::string_view s) {
  const auto begin = s.find_first_not_of(kWhitespace);
  if (begin == std::string_view::npos) return {};
  return s.substr(begin, s.find_last_not_of(kWhitespace) - begin + 1);
}

std::string without_whitespace(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (kWhitespace.find(c) == std::string_view::npos) out += c;
  }
  return out;
}

// The whole of `s` as a number ("-1234", "0.5", "7.2e1"), or nothing. from_chars takes no '+'
// and no locale; "inf" and "nan" are not answers.
std::optional<double> parse_number(std::string_view s) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty() || !(std::isdigit(static_cast<unsigned char>(s.front())) || s.front() == '-' || s.front() == '.')) {
    return std::nullopt;
  }
  double value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(value)) return std::nullopt;
  return value;
}

bool same_number(double a, double b) {
  return std::abs(a - b) <= 1e-9 * std::max({1.0, std::abs(a), std::abs(b)});
}

// "$1,234.00" -> "1234", "-3.50" -> "-3.50", "18." -> "18"; "" when no digits lead the text.
std::string gsm8k_number(std::string_view s) {
  s = trim(s);
  if (!s.empty() && s.front() == '$') s = trim(s.substr(1));
  std::string number;
  size_t i = 0;
  if (i < s.size() && s[i] == '-') number += s[i++];
  bool any_digit = false;
  for (; i < s.size(); ++i) {
    const char c = s[i];
    if (std::isdigit(static_cast<unsigned char>(c))) {
      number += c;
      any_digit = true;
    } else if (c == '.' && number.find('.') == std::string::npos) {
      number += c;
    } else if (c != ',') {
      break;
    }
  }
  if (!any_digit) return "";
  const auto dot = number.find('.');
  if (dot != std::string::npos &&
      number.find_first_not_of('0', dot + 1) == std::string::npos) {
    number.erase(dot);  // an all-zero (or empty) fraction: "72.0" and "72" are one answer
  }
  return number;
}

std::string boxed_contents(std::string_view response) {
  static constexpr std::string_view kBoxed = "\\boxed{";
  const auto start = response.rfind(kBoxed);
  if (start == std::string_view::npos) return "";
  int depth = 1;
  for (size_t i = start + kBoxed.size(); i < response.size(); ++i) {
    if (response[i] == '{') {
      ++depth;
    } else if (response[i] == '}' && --depth == 0) {
      return std::string(trim(response.substr(start + kBoxed.size(), i - start - kBoxed.size())));
    }
  }
  return "";  // unbalanced: the box never closes (a truncated response)
}

std::string exact_answer(std::string_view response) {
  static constexpr std::string_view kMarker = "Answer:";
  const auto start = response.rfind(kMarker);
  if (start == std::string_view::npos) return "";
  auto rest = response.substr(start + kMarker.size());
  return std::string(trim(rest.substr(0, rest.find('\n'))));
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

AnswerKind answer_kind_from_string(const std::string& s) {
  if (s == "gsm8k") return AnswerKind::gsm8k;
  if (s == "boxed") return AnswerKind::boxed;
  if (s == "exact") return AnswerKind::exact;
  throw std::invalid_argument("answer_kind must be one of gsm8k, boxed, exact; got '" + s + "'");
}

std::string to_string(AnswerKind k) {
  switch (k) {
    case AnswerKind::gsm8k: return "gsm8k";
    case AnswerKind::boxed: return "boxed";
    case AnswerKind::exact: return "exact";
  }
  throw std::invalid_argument("to_string: not an AnswerKind value");
}

std::string extract_answer(AnswerKind kind, std::string_view response) {
  switch (kind) {
    case AnswerKind::gsm8k: {
      const auto marker = response.rfind("####");
      return marker == std::string_view::npos ? "" : gsm8k_number(response.substr(marker + 4));
    }
    case AnswerKind::boxed: return boxed_contents(response);
    case AnswerKind::exact: return exact_answer(response);
  }
  throw std::invalid_argument("extract_answer: not an AnswerKind value");
}

double reward(AnswerKind kind, std::string_view response, std::string_view reference) {
  const std::string answer = extract_answer(kind, response);
  if (answer.empty()) return 0.0;
  switch (kind) {
    case AnswerKind::gsm8k: {
      const auto a = parse_number(answer), b = parse_number(gsm8k_number(reference));
      return a && b && same_number(*a, *b) ? 1.0 : 0.0;
    }
    case AnswerKind::boxed: {
      const std::string a = without_whitespace(answer), b = without_whitespace(reference);
      std::string a_digits = a, b_digits = b;  // "1,000" is a number too
      std::erase(a_digits, ',');
      std::erase(b_digits, ',');
      const auto x = parse_number(a_digits), y = parse_number(b_digits);
      if (x && y) return same_number(*x, *y) ? 1.0 : 0.0;
      return a == b ? 1.0 : 0.0;
    }
    case AnswerKind::exact: return answer == trim(reference) ? 1.0 : 0.0;
  }
  throw std::invalid_argument("reward: not an AnswerKind value");
}

Vocab::Vocab(std::vector<std::string> token_bytes) : tokens_(std::move(token_bytes)) {}

std::string response_text(const Vocab& vocab, std::vector<int64_t> response,
                          const std::vector<int64_t>& stop_ids, int64_t padded_size) {
  if (!response.empty() && std::find(stop_ids.begin(), stop_ids.end(), response.back()) != stop_ids.end()) {
    response.pop_back();
  }
  return vocab.decode(response, padded_size);
}

Vocab Vocab::load(const std::filesystem::path& path) {
  const auto fail = [&](const std::string& why) {
    return std::runtime_error("vocab file " + path.string() + ": " + why);
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail("cannot open it (missing or unreadable)");
  std::stringstream text;
  text << in.rdbuf();
  const auto j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw fail("invalid JSON");
  if (!j.is_object() || !j.contains("tokens") || !j["tokens"].is_array()) {
    throw fail("expected an object {\"tokens\": [\"<hex bytes>\", ...]}");
  }
  std::vector<std::string> tokens;
  tokens.reserve(j["tokens"].size());
  for (const auto& entry : j["tokens"]) {
    const std::string where = "tokens[" + std::to_string(tokens.size()) + "]";
    if (!entry.is_string()) throw fail(where + " is not a string of hex digits");
    const auto& hex = entry.get_ref<const std::string&>();
    if (hex.size() % 2 != 0) throw fail(where + " '" + hex + "' has an odd number of hex digits");
    std::string bytes;
    for (size_t i = 0; i < hex.size(); i += 2) {
      const int hi = hex_digit(hex[i]), lo = hex_digit(hex[i + 1]);
      if (hi < 0 || lo < 0) throw fail(where + " '" + hex + "' is not hex");
      bytes += static_cast<char>(hi * 16 + lo);
    }
    tokens.push_back(std::move(bytes));
  }
  if (tokens.empty()) throw fail("no tokens");
  return Vocab(std::move(tokens));
}

std::string Vocab::decode(const std::vector<int64_t>& ids, int64_t padded_size) const {
  const int64_t limit = std::max(size(), padded_size);
  std::string out;
  for (const int64_t id : ids) {
    if (id < 0 || id >= limit) {
      throw std::out_of_range("Vocab::decode: token id " + std::to_string(id) + " outside [0, " +
                              std::to_string(limit) + ")");
    }
    if (id < size()) out += tokens_[static_cast<size_t>(id)];
  }
  return out;
}

}  // namespace gkv::tasks
