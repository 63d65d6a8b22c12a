// SmPartition: the device's SMs cut in two disjoint sets, each behind its own stream (CUDA green
// contexts). Kernels launched on one stream run only on that stream's SMs, whatever their grid,
// so a memory-bound kernel (decode attention) and compute-bound ones (the weight GEMMs) can run
// side by side instead of each filling the whole device in turn.
#pragma once

#include <cstdint>
#include <memory>

namespace gkv::engine {

class SmPartition {
 public:
  // Takes at least `first_sms` SMs of `device` for the first set (rounded up to the driver's
  // partition granularity) and the rest for the second. Throws when the build has no CUDA, the
  // driver has no green contexts, or first_sms leaves no SMs for the second set.
  SmPartition(int device, int first_sms);
  ~SmPartition();
  SmPartition(const SmPartition&) = delete;
  SmPartition& operator=(const SmPartition&) = delete;

  int sms(int set) const;              // SMs of set 0 or 1
  // Its cudaStream_t, as an integer (for torch.cuda.ExternalStream); valid while this lives.
  std::uintptr_t stream(int set) const;
  int device() const { return device_; }

 private:
  struct Contexts;  // the green contexts and their streams (CUDA builds)
  int device_;
  std::unique_ptr<Contexts> contexts_;
};

}  // namespace gkv::engine
