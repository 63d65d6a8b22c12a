// Every schema of the gkv operator library, and nothing else. Backends register their kernels in
// their own files (csrc/ops/*.cpp: CPU, Meta, Autograd, Autocast; csrc/cuda/*.cu: CUDA).
// Symbols: B batch, Hq query heads, Hkv KV heads, G = Hq / Hkv, C cache slots, N keys, W window
// queries, T tokens, K kept slots, d head_dim, D the normalised size of rms_norm. A slot whose pos
// (or death row) is < 0 is empty or padding: it is never attended to and never kept. Section
// numbers refer to ../shared/reference/gkv-method.md.
#include <torch/library.h>

TORCH_LIBRARY(gkv, m) {
  // One query token per sequence against slots [0, length) of the cache, GQA (query head h*G+g
  // reads KV head h), empty slots masked. When score_acc is given, adds into it, per KV head and
  // slot, the max over the G query heads of their softmax probability (score emission, H2O).
  // When live_length is given, only slots [0, min(length, live_length[0])) are read; the rest
  // count as empty. It is read from the op's device when the op runs, so a CUDA graph captured
  // with a fixed length attends over what the cache holds at each replay.
  // q [B,Hq,d], k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score_acc [B,Hkv,C] fp32,
  // live_length [1] int64.
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int length, "
      "float scale, Tensor(a!)? score_acc=None, Tensor? live_length=None) -> Tensor");

  // The G-KV local score S (section 2.1): the W window queries are those of the last W slots
  // (query i sees slots <= N-W+i); softmax over visible slots; max over the group; mean over the W
  // queries. Window slots are not candidates. q_win [B,Hq,W,d], k [B,Hkv,N,d], pos [B,Hkv,N]
  // int32 -> S [B,Hkv,N-W] fp32.
  m.def("window_scores(Tensor q_win, Tensor k, Tensor pos, float scale) -> Tensor");

  // The key-redundancy score R (section 2.2): cosine similarity of unit keys, diagonal zeroed,
  // each key's most recent near-copy (similarity > threshold) exempted, row sums, softmax over
  // valid slots with temperature = number of valid slots. Empty slots get 0.
  // k [B,Hkv,N,d], pos [B,Hkv,N] int32 -> R [B,Hkv,N] fp32.
  m.def("redundancy_scores(Tensor k, Tensor pos, float threshold=0.5) -> Tensor");
  // The same with each slot's exemption carried between calls: also returns m* [B,Hkv,N] int32,
  // the slot of each key's most recent near-copy (-1: none, and at empty slots). carried
  // [B,Hkv,M] int32 (M <= N): for the slots [0, M), their exemptions among those slots alone, as
  // an earlier call returned them with the slots kept in order and renumbered, -2 where the slot
  // named was dropped. c_ij never changes, so only the rows past M and the slots marked -2 are
  // scanned again (on CUDA); the result equals redundancy_scores' when carried is such a state.
  m.def(
      "redundancy_scores_carry(Tensor k, Tensor pos, Tensor carried, float threshold=0.5) -> "
      "(Tensor, Tensor)");

  // Per-head selection (section 2.3 step 7): the `keep` best candidates in ascending slot order
  // (ties: the later slot wins; -inf or NaN candidates only when nothing else is left), followed
  // by the window slots M..M+window-1. score [B,Hkv,M] fp32 -> idx [B,Hkv,keep+window] int64.
  m.def("select_keep(Tensor score, int keep, int window) -> Tensor");

  // In-place compaction, per head: slot t takes slot idx[..., t] for t < K. Slots >= K are left
  // as they were. k_cache/v_cache [B,Hkv,C,d], pos [B,Hkv,C] int32, score [B,Hkv,C] fp32,
  // idx [B,Hkv,K] int64 in [0, C), any order.
  m.def(
      "compact_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos, Tensor(d!) score, "
      "Tensor idx) -> ()");

  // One decoded token's K, V and position written into slot `slot` of the cache, and optionally
  // its query into slot `ring_slot` of the window's query ring, in one launch; the slots are read
  // from device memory (a replayed CUDA graph advances them in place). On CUDA a slot out of range
  // writes nothing: checking it would read it back to the host. k_cache/v_cache [B,Hkv,C,d], pos
  // [B,Hkv,C] int32, k/v [B,Hkv,d], new_pos [B,Hkv] int32, slot int64 with one element; q_ring
  // [B,Hq,W,d], q [B,Hq,d], ring_slot int64 with one element (all three or none).
  m.def(
      "write_slot_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos, Tensor k, Tensor v, "
      "Tensor new_pos, Tensor slot, Tensor(d!)? q_ring=None, Tensor? q=None, "
      "Tensor? ring_slot=None) -> ()");

  // Differentiable out-of-place gather along the token axis (backward = scatter-add).
  // x [B,H,N,d], idx [B,H,K] int64 -> [B,H,K,d].
  m.def("gather_tokens(Tensor x, Tensor idx) -> Tensor");

  // Causal attention in which key j is visible to query i iff j <= i < death[b,h,j] (training
  // under a compressed cache, DESIGN.md "death times"). A row that sees no key gives 0 and
  // lse = -inf. q [B,Hq,T,d], k/v [B,Hkv,T,d], death [B,Hkv,T] int32
  // -> out [B,Hq,T,d], lse [B,Hq,T] fp32 (natural log).
  m.def(
      "lifetime_attention(Tensor q, Tensor k, Tensor v, Tensor death, float scale) "
      "-> (Tensor, Tensor)");

  // Gradients of lifetime_attention with respect to q, k and v, given the forward's out and lse.
  m.def(
      "lifetime_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor death, "
      "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");

  // RMSNorm of the decoder (transformers' Llama/Qwen2 RMSNorm): per row, the mean of squares in
  // fp32, x * rsqrt(mean + eps) in fp32, cast to x's dtype, then times weight in x's dtype.
  // x [..., D], weight [D] (dtype of x) -> [..., D] (dtype of x).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");

  // The decoder's residual add and the next RMSNorm in one pass: sum = x + residual in x's dtype
  // (rounded as ATen's add), then rms_norm(sum, weight, eps). x, residual [..., D], weight [D] (all
  // of one dtype) -> (sum, normed), both [..., D].
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");

  // SwiGLU's gating: silu(x[..., :F]) * x[..., F:] in x's dtype (each op rounded as ATen rounds
  // it), the joint gate/up projection's output split in halves. x [..., 2F] -> [..., F].
  m.def("silu_mul(Tensor x) -> Tensor");

  // Rotary position embedding, rotate-half convention: x * cos + rotate_half(x) * sin with
  // rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]), in x's dtype. cos/sin broadcast over B, H
  // and T; they get no gradient. x [B,H,T,d] (any strides), cos/sin [B|1,H|1,T|1,d] (dtype of x)
  // -> [B,H,T,d] contiguous.
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");

  // A linear layer for the few rows of a decode step: x W^T + bias, accumulated in fp32 and
  // rounded once to x's dtype. On CUDA, 16-bit x with 1..64 rows streams the weight through our
  // kernel; other cases go to ATen's linear. x [..., K], weight [N, K], bias [N] (dtype of x)
  // -> [..., N].
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}
