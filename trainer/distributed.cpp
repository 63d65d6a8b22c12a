#include "trainer/distributed.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <chrono>
#include <cstdlib>
#include <stdexcept>

#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef GKV_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef GKV_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace gkv::trainer {

namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0) {
    throw std::invalid_argument(std::string("environment variable ") + name +
                                " must be a non-negative integer, got '" + v + "'");
  }
  return static_cast<int>(x);
}

#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    throw std::invalid_argument(std::string("environment variable ") + name +
                                " is required when WORLD_SIZE > 1");
  }
  return v;
}
#endif

}  // namespace

#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
struct DataParallel::Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};
#else
struct DataParallel::Group {};
#endif

DataParallel DataParallel::from_env(const std::string& backend, const std::string& device_kind) {
  DataParallel dp;
  dp.world_ = env_int("WORLD_SIZE", 1);
  dp.rank_ = env_int("RANK", 0);
  dp.local_rank_ = env_int("LOCAL_RANK", dp.rank_);
  if (dp.world_ < 1 || dp.rank_ >= dp.world_) {
    throw std::invalid_argument("RANK must be in [0, WORLD_SIZE), got RANK=" + std::to_string(dp.rank_) +
                                " WORLD_SIZE=" + std::to_string(dp.world_));
  }
  if (device_kind == "cuda") {  // this rank's GPU, checked before any process group needs it
    const auto gpus = static_cast<int>(torch::cuda::device_count());
    if (gpus == 0) throw std::invalid_argument("config key 'device': cuda, but no CUDA device is available");
    if (dp.local_rank_ < 0 || dp.local_rank_ >= gpus) {
      throw std::invalid_argument("LOCAL_RANK must be in [0, " + std::to_string(gpus) + ") (the CUDA devices here), got " +
                                  std::to_string(dp.local_rank_));
    }
  }
  if (dp.world_ == 1) return dp;
  const std::string kind = backend == "auto" ? (device_kind == "cuda" ? "nccl" : "gloo") : backend;
  if (kind == "nccl" && device_kind != "cuda") {
    throw std::invalid_argument("config key 'dist_backend': nccl needs device=cuda");
  }
#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
  const std::string addr = env_str("MASTER_ADDR");
  const int port = env_int("MASTER_PORT", -1);
  if (port <= 0 || port > 65535) throw std::invalid_argument("MASTER_PORT must be a port number");
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(port);
  opts.isServer = dp.rank_ == 0;
  opts.numWorkers = dp.world_;
  opts.waitWorkers = true;
  opts.timeout = std::chrono::seconds(300);
  auto group = std::make_shared<Group>();
  group->store = c10::make_intrusive<c10d::TCPStore>(addr, opts);
#endif
  if (kind == "gloo") {
#ifdef GKV_WITH_GLOO
    auto options = c10d::ProcessGroupGloo::Options::create();
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, dp.rank_, dp.world_, options);
#else
    throw std::invalid_argument(
        "config key 'dist_backend': gloo was not built into this gkv-train (install the gloo "
        "headers, Debian libgloo-dev, and rebuild)");
#endif
  } else {
#ifdef GKV_WITH_NCCL
    group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, dp.rank_, dp.world_);
#else
    throw std::invalid_argument(
        "config key 'dist_backend': nccl was not built into this gkv-train (needs torch with CUDA "
        "and nccl.h from the nvidia-nccl pip package; rebuild)");
#endif
  }
#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
  dp.group_ = std::move(group);
#endif
  return dp;
}

void DataParallel::allreduce_sum(std::vector<at::Tensor>& tensors) const {
  if (world_ == 1 || tensors.empty()) return;
#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
  // One flat buffer: one collective per call, whatever the number of tensors.
  std::vector<at::Tensor> flat{at::cat([&] {
    std::vector<at::Tensor> parts;
    for (const auto& t : tensors) parts.push_back(t.reshape(-1));
    return parts;
  }())};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  group_->backend->allreduce(flat, opts)->wait();
  int64_t offset = 0;
  for (auto& t : tensors) {
    t.copy_(flat[0].narrow(0, offset, t.numel()).view_as(t));
    offset += t.numel();
  }
#endif
}

void DataParallel::broadcast(std::vector<at::Tensor>& tensors) const {
  if (world_ == 1) return;
#if defined(GKV_WITH_GLOO) || defined(GKV_WITH_NCCL)
  for (auto& t : tensors) {
    std::vector<at::Tensor> one{t};
    c10d::BroadcastOptions opts;
    opts.rootRank = 0;
    group_->backend->broadcast(one, opts)->wait();
  }
#endif
}

}  // namespace gkv::trainer
