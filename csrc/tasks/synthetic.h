// The synthetic long chain-of-thought task: a shuffled system of variable definitions, one
// variable asked for, and a reference response that resolves it step by step. Each step looks up
// a definition somewhere in the prompt, so the answer depends on tokens far back in the sequence:
// a cache that evicts the definition it needs (StreamingLLM at a small budget) gets it wrong,
// while FullKV keeps everything. Deterministic from a seed on every platform (own PRNG and
// shuffle; the standard distributions differ between libraries).
//
//   prompt:    "ab=cd+3\nef=5\ncd=ef-7\n...\nab?\n"      (shuffled; values mod `modulus`)
//   response:  "ab=cd+3\ncd=ef-7\nef=5\n"                 (the lookups, from the asked variable down)
//              "cd=5-7=8\nab=8+3=1\nAnswer: 1"            (the evaluation, back up)
//   answer:    "1"                                        (checked with AnswerKind::exact)
//
// The text uses a small alphabet (char_vocabulary) so a character-level tokenizer fits a tiny model.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace gkv::tasks::synthetic {

struct Options {
  int64_t num_variables = 24;  // definitions in the prompt: the asked chain plus distractors
  int64_t chain_depth = 6;     // definitions on the asked variable's chain, down to a constant
  int64_t modulus = 10;        // constants, offsets and values live in [0, modulus)
  void validate() const;       // throws naming the field and its accepted range
};

struct Example {
  std::string prompt, response, answer;
};

Example make_example(const Options& options, uint64_t seed);

// Options whose examples are about `tokens` characters long, prompt plus response (so about that
// many tokens with the character tokenizer); the chain grows with the length. tokens in [64, 65536].
Options options_for_length(int64_t tokens);

// The character tokenizer's tokens in id order: the special tokens <pad> <bos> <eos> <unk>, then
// every character the task writes. gkv_ext.tasks.save_char_tokenizer writes the same tokenizer
// for transformers (which also puts <bos> first when encoding a prompt).
const std::vector<std::string>& char_vocabulary();
inline constexpr int64_t kCharPad = 0, kCharBos = 1, kCharEos = 2;
// One id per character, no special tokens (so the trainer can tokenize made examples itself, as
// scripts/prepare_data.py does: prompt = <bos> + its characters, response = its characters +
// <eos>); throws naming the first character outside the vocabulary.
std::vector<int64_t> char_token_ids(std::string_view text);

}  // namespace gkv::tasks::synthetic
