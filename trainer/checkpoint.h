// Checkpoints: out_dir/step-NNNNNNNN/ holds the model as a transformers checkpoint (config.json +
// model.safetensors, loadable unchanged), the optimizer state (optimizer.pt), the trainer state
// (trainer_state.json: step, optimizer updates, data cursor, seed) and the resolved config
// (train_config.json). The whole directory is written to a temporary directory, fsynced and
// renamed, so a killed run leaves either the complete checkpoint or none. Every random draw of a
// run is a function of (seed, step, rank), so the seed and the step restore the RNG exactly.
#pragma once

#include <torch/optim/optimizer.h>

#include <cstdint>
#include <filesystem>
#include <optional>

#include "model/decoder.h"
#include "trainer/config.h"

namespace gkv::trainer {

struct TrainerState {
  int64_t step = 0;     // steps done
  int64_t updates = 0;  // optimizer updates done
  int64_t cursor = 0;   // examples of the global data order consumed
  uint64_t seed = 0;
};

std::filesystem::path save_checkpoint(const std::filesystem::path& out_dir, const model::Decoder& model,
                                      torch::optim::Optimizer& optimizer, const TrainerState& state,
                                      const Config& config);

// Deletes all but the newest `keep` checkpoints of out_dir (keep = 0: none deleted).
void prune_checkpoints(const std::filesystem::path& out_dir, int64_t keep);

// The checkpoint with the highest step in out_dir, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& out_dir);

// Copies the checkpoint's weights into `model` (same architecture) and its optimizer state into
// `optimizer`; returns the trainer state.
TrainerState load_checkpoint(const std::filesystem::path& dir, model::Decoder& model,
                             torch::optim::Optimizer& optimizer);

}  // namespace gkv::trainer
