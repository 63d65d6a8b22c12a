// Tasks with checkable answers, shared by the trainer's rewards, the evaluation harness and the
// data preparation: the verifiers (GSM8K "#### N", \boxed{...}, exact match), the token-id -> text
// table that lets C++ read what a model wrote, and the synthetic long chain-of-thought task whose
// answers depend on tokens far back in the sequence (the task that makes eviction matter).
//
// Data files (written by scripts/prepare_data.py, read by gkv-train and `python -m gkv_ext eval`):
//   <name>.jsonl, one example per line:
//     {"prompt": [int, ...],            token ids, required
//      "response": [int, ...],          token ids of a reference response (sft / distill), optional
//      "answer": "text",                the reference answer (rl rewards, eval accuracy), optional
//      "answer_kind": "gsm8k" | "boxed" | "exact"}   how `answer` is checked, with "answer"
//   vocab.json beside it: {"tokens": ["<hex of token 0's bytes>", ...]}: what each token id
//   decodes to (byte-level BPE tokens are partial UTF-8, hence bytes, not strings).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace gkv::tasks {

enum class AnswerKind { gsm8k, boxed, exact };
AnswerKind answer_kind_from_string(const std::string& s);  // throws naming the accepted values
std::string to_string(AnswerKind k);

// The answer a response states, or "" when it states none:
//   gsm8k: the number after the last "####" (a leading "$", commas and a trailing ".0..."
//          dropped: "#### $1,234.00" -> "1234");
//   boxed: the contents of the last \boxed{...} (nested braces balanced), trimmed;
//   exact: the text after the last "Answer:" marker up to the end of its line, trimmed (the
//          synthetic task's format; text the model writes on later lines does not count).
// Callers decode a response without its stop token (an EOS's text is not part of the answer).
std::string extract_answer(AnswerKind kind, std::string_view response);
// 1 when the response's answer matches `reference` (numerically for gsm8k and for boxed numbers:
// "72" == "72.0" == "7.2e1"; boxed text otherwise compared with whitespace removed; exact as
// trimmed text), 0 otherwise, and 0 when the response states no answer. `reference` is the bare
// answer ("1,234", "\frac{1}{2}", "7"), normalised the same way.
double reward(AnswerKind kind, std::string_view response, std::string_view reference);

// Token id -> bytes, from vocab.json.
class Vocab {
 public:
  static Vocab load(const std::filesystem::path& path);  // throws naming the file and the problem
  explicit Vocab(std::vector<std::string> token_bytes);
  int64_t size() const { return static_cast<int64_t>(tokens_.size()); }
  // Concatenated bytes of the ids. Ids in [size(), padded_size) are a model's padding rows
  // (embeddings are often rounded up past the tokenizer's vocabulary) and have no text; any other id
  // outside [0, size()) throws.
  std::string decode(const std::vector<int64_t>& ids, int64_t padded_size = 0) const;

 private:
  std::vector<std::string> tokens_;
};

// A generated response's text for extract_answer / reward: the ids decoded without a final stop
// token (one of stop_ids; its text, "<eos>" say, would stick to the answer).
std::string response_text(const Vocab& vocab, std::vector<int64_t> response,
                          const std::vector<int64_t>& stop_ids, int64_t padded_size = 0);

}  // namespace gkv::tasks
