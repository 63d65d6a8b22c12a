// Data parallelism over torch.distributed's c10d process groups, configured by the standard
// RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables (torchrun-style). Each rank
// computes gradients on its slice of the global batch, already divided by the global batch size,
// and the allreduce sums them, so every rank applies the same update as one rank on the whole
// batch. Gloo (CPU) and NCCL (CUDA) are compile-time optional (GKV_WITH_GLOO / GKV_WITH_NCCL);
// asking for one that was not built is a clear error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <string>
#include <vector>

namespace gkv::trainer {

class DataParallel {
 public:
  // From the environment; WORLD_SIZE unset or 1: a single process, no process group.
  // backend: "auto" (nccl for cuda, gloo for cpu), "gloo" or "nccl".
  static DataParallel from_env(const std::string& backend, const std::string& device_kind);

  int rank() const { return rank_; }
  int world() const { return world_; }
  int local_rank() const { return local_rank_; }
  bool is_main() const { return rank_ == 0; }

  // In place: the sum over ranks.
  void allreduce_sum(std::vector<at::Tensor>& tensors) const;
  // In place: rank 0's values everywhere.
  void broadcast(std::vector<at::Tensor>& tensors) const;

  struct Group;  // the c10d store and backend (distributed.cpp)

 private:
  int rank_ = 0, world_ = 1, local_rank_ = 0;
  std::shared_ptr<Group> group_;
};

}  // namespace gkv::trainer
