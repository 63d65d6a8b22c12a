// llama2.c / llama2.ts material: the stories260K model file (a 256-byte header, the vocabulary,
// then fp32 tensors; ../shared/DATA.md) and the llama2.c tokenizer (greedy merge by piece score,
// dummy-prefix space, byte fallback).
#pragma once

#include <filesystem>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/config.h"
#include "model/decoder.h"

namespace gkv::model {

class Llama2Tokenizer {
 public:
  static constexpr int64_t kUnk = 0, kBos = 1, kEos = 2;
  static constexpr int64_t kFirstByte = 3;  // ids 3..258 are the byte pieces <0x00>..<0xFF>

  // pieces may spell a space as U+2581 (sentencepiece) or ' ' (llama2.c export); both work.
  Llama2Tokenizer(std::vector<std::string> pieces, std::vector<float> scores);
  // A llama2.c tokenizer file (tok512.bin) or a llama2.ts model file (its vocabulary).
  static Llama2Tokenizer load(const std::filesystem::path& path);

  std::vector<int64_t> encode(const std::string& text, bool bos = true, bool eos = false) const;
  // Skips bos/eos, turns byte pieces back into bytes and drops the dummy-prefix space.
  std::string decode(const std::vector<int64_t>& ids) const;
  int64_t vocab_size() const { return static_cast<int64_t>(pieces_.size()); }
  const std::string& piece(int64_t id) const;

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int64_t> ids_;  // mergeable pieces only (no control/byte pieces)
};

struct Llama2tsModel {
  ModelConfig config;   // model_type llama, fp32, tied embeddings, theta 1e4, eps 1e-5
  Weights weights;       // fp32 CPU; wq/wk permuted from interleaved pairs to rotate-half
  Llama2Tokenizer tokenizer;
};

Llama2tsModel load_llama2ts(const std::filesystem::path& path);

}  // namespace gkv::model
