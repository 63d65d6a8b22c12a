// Training and evaluation examples (the JSONL format of csrc/tasks/tasks.h) and the data order:
// example i of the run (over epochs) is a pure function of the seed and i, so the data cursor is
// one integer and a resumed run reads exactly what the uninterrupted one would have.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tasks/tasks.h"

namespace gkv::trainer {

struct Example {
  std::vector<int64_t> prompt;
  std::vector<int64_t> response;  // empty when the file has none
  std::string answer;             // empty when the file has none
  tasks::AnswerKind answer_kind = tasks::AnswerKind::exact;
};

// Throws naming the file, the line and the key. `vocab_size` bounds the token ids.
std::vector<Example> load_examples(const std::string& path, int64_t vocab_size);

// The dataset index of the run's i-th example: epoch i / N visits a permutation of [0, N) drawn
// from (seed, epoch) with our own Fisher-Yates over mt19937_64, identical on every platform.
class DataOrder {
 public:
  DataOrder(int64_t size, uint64_t seed);
  int64_t index(int64_t i);

 private:
  int64_t size_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  std::vector<int64_t> perm_;
};

}  // namespace gkv::trainer
