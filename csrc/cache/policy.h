// Eviction policies as data: a Policy is a budget, a schedule and the parts of one score formula
// (reference gkv-method.md section 2.3). Every method (FullKV, StreamingLLM, H2O, SnapKV, R-KV,
// TOVA, G-KV) is a named constructor filling the same fields; a new policy is a new combination of
// them, with no change to the cache.
//
// The score of a candidate key j (a key before the last `window` slots), per KV head:
//   S   observation: Observation::window  mean over the last W queries of the max over the query
//                                          group of the softmax probability (gkv::window_scores)
//                    Observation::last    the same for the last query only (TOVA)
//                    Observation::accumulate  the sum of that probability over every query since
//                                          the key arrived (true H2O; decode_attention's emission)
//                    Observation::none    recency: the key's position (StreamingLLM)
//   S^  = S / max_j S when normalize, else S
//   F   history: none F = S^; max F = max(alpha F_prev, S^); mean F = alpha F_prev + (1-alpha) S^;
//       sum F = alpha F_prev + S^. Keys without history (new, or kept only as window) use F = S^.
//   P   = maxpool_{pool_kernel}(F) along slots when pool_kernel > 0, else F
//   R   redundancy (gkv::redundancy_scores, threshold), / max_j R when normalize
//   score = lambda P - (1 - lambda) R   (R is not computed when lambda == 1)
// then the first `sinks` real tokens get +inf and pads -inf. F is what the cache stores as the
// kept keys' global score.
//
// Symbols: B batch, Hq / Hkv query / KV heads, N cache slots scored, C = N - window candidates,
// W observed queries, d head_dim.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace gkv::cache {

enum class Observation { window, last, accumulate, none };
enum class History { none, max, mean, sum };

// The reference's defaults (gkv-method.md sections 2.4-2.5), written once: the struct, the named
// constructors and the Python bindings all read them from here.
inline constexpr int64_t kWindow = 16;
inline constexpr int64_t kDivideLength = 128;
inline constexpr double kAlpha = 0.8;
inline constexpr int64_t kPoolKernel = 5;  // SnapKV / R-KV
inline constexpr double kGkvLambda = 0.5;
inline constexpr double kRkvLambda = 0.1;
inline constexpr int64_t kSinks = 4;       // StreamingLLM

struct Policy {
  std::string name = "custom";
  std::optional<int64_t> budget;      // kept slots per KV head after a compression; none: FullKV
  int64_t window = kWindow;           // w: the last w slots are always kept, never candidates
  int64_t divide_length = kDivideLength;  // D: compression is tried every D forwards
  Observation observation = Observation::window;
  bool normalize = false;
  History history = History::none;
  double alpha = kAlpha;
  int64_t pool_kernel = 0;  // 0 or an odd size
  double lambda = 1.0;      // 1: no redundancy term
  double threshold = 0.5;   // redundancy similarity threshold
  int64_t sinks = 0;        // the first `sinks` real tokens are always kept

  // Throws, naming the field, when the parts do not fit together.
  void validate() const;
  bool evicts() const { return budget.has_value(); }
  // Queries the cache must remember for the observation: w, 1 or 0.
  int64_t observed_queries() const;

  static Policy full_kv();
  // The first `sinks` real tokens + the most recent budget - sinks.
  static Policy streaming_llm(int64_t budget, int64_t sinks = kSinks);
  // The reference's H2O recipe: decayed sum of S^ sampled at compression steps, window 1.
  static Policy h2o_sampled(int64_t budget, double alpha = kAlpha);
  // True H2O: every query's attention accumulated from the prefill on; the last w kept as recent.
  static Policy h2o_accumulate(int64_t budget, int64_t window = kWindow);
  static Policy snapkv(int64_t budget, int64_t window = kWindow);
  static Policy rkv(int64_t budget, int64_t window = kWindow, double lambda = kRkvLambda);
  static Policy tova(int64_t budget, int64_t window = kWindow);
  static Policy gkv(int64_t budget, int64_t window = kWindow, double alpha = kAlpha,
                    double lambda = kGkvLambda, History history = History::max);
};

// What one compression decides for one layer.
struct Selection {
  at::Tensor idx;  // [B,Hkv,budget] int64: the kept slots, ascending (candidates, then the window)
  at::Tensor F;    // [B,Hkv,C] fp32: the global score of every candidate (stored for kept ones)
  // [B,Hkv,N] int32: each slot's redundancy exemption (gkv::redundancy_scores_carry), for the
  // next compression to carry; undefined without a redundancy term.
  at::Tensor exempt;
};

// Scores the N slots of one layer and selects per KV head (section 2.3). Requires N > budget.
//   k [B,Hkv,N,d] post-RoPE keys, pos [B,Hkv,N] int32 (-1: pad),
//   q_win [B,Hq,W,d] the queries of the last W slots, oldest first (Observation window / last),
//   acc [B,Hkv,N] fp32 accumulated attention (Observation::accumulate), else undefined,
//   history [B,Hkv,H] fp32 F_prev of slots [0, H) (H = 0 before the first compression),
//   carried [B,Hkv,M] int32 the exemptions of slots [0, M) carried from the last compression
//   (carry_exemptions), or undefined.
Selection select(const Policy& policy, const at::Tensor& k, const at::Tensor& pos,
                 const at::Tensor& q_win, const at::Tensor& acc, const at::Tensor& history,
                 const at::Tensor& carried = at::Tensor());

// The exemptions of the kept slots among the kept slots alone, renumbered to their slots after
// compaction (-2 where the slot named was evicted): sel.exempt [B,Hkv,N] and sel.idx
// [B,Hkv,K] -> [B,Hkv,K] int32, the next compression's `carried`.
at::Tensor carry_exemptions(const Selection& sel);

std::string to_string(Observation o);
std::string to_string(History h);
Observation observation_from_string(const std::string& s);
History history_from_string(const std::string& s);

}  // namespace gkv::cache
