#include "trainer/checkpoint.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <ATen/core/grad_mode.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"

namespace gkv::trainer {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = "step-";

std::optional<int64_t> step_of(const fs::path& dir) {
  const std::string name = dir.filename().string();
  if (name.rfind(kPrefix, 0) != 0) return std::nullopt;
  const std::string digits = name.substr(std::char_traits<char>::length(kPrefix));
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  return std::stoll(digits);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "checkpoint: cannot read ", path.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

fs::path save_checkpoint(const fs::path& out_dir, const model::Decoder& model,
                         torch::optim::Optimizer& optimizer, const TrainerState& state,
                         const Config& config) {
  char name[32];
  std::snprintf(name, sizeof(name), "%s%08lld", kPrefix, static_cast<long long>(state.step));
  const fs::path dir = out_dir / name;
  fs::create_directories(out_dir);
  model::write_directory_atomically(dir, [&](const fs::path& tmp) {
    model::write_file_synced(tmp / "config.json", model::config_to_json(model.config()).dump(2) + "\n");
    model::write_safetensors_shards(tmp, model.named_tensors());
    torch::serialize::OutputArchive archive;
    optimizer.save(archive);
    std::ostringstream bytes;
    archive.save_to(bytes);
    model::write_file_synced(tmp / "optimizer.pt", bytes.str());
    const nlohmann::json s = {{"step", state.step}, {"updates", state.updates},
                              {"cursor", state.cursor}, {"seed", state.seed}};
    model::write_file_synced(tmp / "trainer_state.json", s.dump(2) + "\n");
    model::write_file_synced(tmp / "train_config.json", to_json(config).dump(2) + "\n");
  });
  return dir;
}

// out_dir's checkpoints, oldest first.
std::vector<fs::path> checkpoints(const fs::path& out_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  if (fs::is_directory(out_dir)) {
    for (const auto& entry : fs::directory_iterator(out_dir)) {
      const auto step = step_of(entry.path());
      if (entry.is_directory() && step) found.emplace_back(*step, entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& [step, path] : found) out.push_back(std::move(path));
  return out;
}

void prune_checkpoints(const fs::path& out_dir, int64_t keep) {
  const auto all = checkpoints(out_dir);
  if (keep <= 0 || static_cast<int64_t>(all.size()) <= keep) return;
  for (size_t i = 0; i + keep < all.size(); ++i) fs::remove_all(all[i]);
}

std::optional<fs::path> latest_checkpoint(const fs::path& out_dir) {
  const auto all = checkpoints(out_dir);
  if (all.empty()) return std::nullopt;
  return all.back();
}

namespace {

TrainerState load_checkpoint_files(const fs::path& dir, model::Decoder& model,
                                   torch::optim::Optimizer& optimizer) {
  const model::Decoder saved = model::load_decoder(dir);
  const auto from = saved.named_tensors();
  auto to = model.named_tensors();
  TORCH_CHECK(from.size() == to.size(), "it has ", from.size(), " tensors, the model ", to.size());
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < to.size(); ++i) {
      TORCH_CHECK(from[i].first == to[i].first && from[i].second.sizes() == to[i].second.sizes(),
                  "tensor ", from[i].first, " ", from[i].second.sizes(), " does not match the model's ",
                  to[i].first, " ", to[i].second.sizes());
      to[i].second.copy_(from[i].second);
    }
  }
  try {
    torch::serialize::InputArchive archive;
    archive.load_from((dir / "optimizer.pt").string(), model.device());
    optimizer.load(archive);
  } catch (const c10::Error& e) {
    throw std::runtime_error(std::string("optimizer.pt: ") + e.what_without_backtrace());
  }
  try {
    const auto s = nlohmann::json::parse(read_text(dir / "trainer_state.json"));
    return {s.at("step").get<int64_t>(), s.at("updates").get<int64_t>(), s.at("cursor").get<int64_t>(),
            s.at("seed").get<uint64_t>()};
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(std::string("trainer_state.json: ") + e.what());
  }
}

}  // namespace

TrainerState load_checkpoint(const fs::path& dir, model::Decoder& model,
                             torch::optim::Optimizer& optimizer) {
  // A checkpoint is written whole or not at all (write_directory_atomically), so a bad one was
  // changed afterwards: say which, and how to go on from the one before it.
  const auto cannot = [&](const std::string& why) {
    return std::runtime_error("cannot resume from " + dir.string() + ": " + why +
                              " (remove that directory to resume from the checkpoint before it, "
                              "or set resume=false)");
  };
  try {
    return load_checkpoint_files(dir, model, optimizer);
  } catch (const c10::Error& e) {
    throw cannot(e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw cannot(e.what());
  }
}

}  // namespace gkv::trainer
