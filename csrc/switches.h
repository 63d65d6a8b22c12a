// Process-wide switches between two implementations of the same result, for A/B timing and
// debugging. Each is read where it acts (a kernel launch, a projection), so a benchmark can flip
// one between two runs in one process and time them in turn; a CUDA graph keeps what was on when
// it was captured. The environment gives the initial value:
//   chained_launch  GKV_CHAINED_LAUNCH=0 turns it off: every kernel of ours launched plainly
//                   instead of chained (kernels/common.cuh).
//   decode_linear   GKV_DECODE_LINEAR=0 turns it off: the decoder's projections of at most 16
//                   rows (a decode step's) through gkv::decode_linear instead of ATen's linear
//                   (model/decoder.cpp).
//   tuned_linear    GKV_TUNED_LINEAR=1 turns it on: the decoder's CUDA projections of one token
//                   in each of 17 to 1024 rows through the cuBLASLt algorithm timed fastest for
//                   their shape (ops/tuned_linear.h) instead of ATen's linear. Off by default: a
//                   pick by timing may differ between processes, and so may the last bits.
// No torch headers: the CUDA kernels' common header includes this.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace gkv {

enum class Switch { chained_launch, decode_linear, tuned_linear };

namespace detail {
inline bool env_equals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

inline std::atomic<bool>& switch_state(Switch s) {
  static std::atomic<bool> chained_launch{!env_equals("GKV_CHAINED_LAUNCH", "0")};
  static std::atomic<bool> decode_linear{!env_equals("GKV_DECODE_LINEAR", "0")};
  static std::atomic<bool> tuned_linear{env_equals("GKV_TUNED_LINEAR", "1")};
  switch (s) {
    case Switch::chained_launch: return chained_launch;
    case Switch::decode_linear: return decode_linear;
    case Switch::tuned_linear: return tuned_linear;
  }
  return tuned_linear;  // unreachable: every enumerator is a case
}
}  // namespace detail

inline bool switch_on(Switch s) { return detail::switch_state(s).load(std::memory_order_relaxed); }

inline void set_switch(Switch s, bool on) {
  detail::switch_state(s).store(on, std::memory_order_relaxed);
}

}  // namespace gkv
