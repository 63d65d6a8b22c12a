"""Typed wrappers of the gkv custom ops (``torch.ops.gkv.*``).

Symbols: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv (query head ``h*G + g`` reads KV
head ``h``), C cache slots, N keys, W window queries, T tokens, K kept slots, d head_dim, D the
size that ``rms_norm`` normalises, F the MLP's intermediate size.
A slot whose ``pos`` is < 0 is empty or padding: it is never attended to and never kept.
Every op runs on CPU and CUDA and has a Meta kernel (so it traces under torch.compile).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.gkv


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, length: int,
                     scale: float, score_acc: Optional[Tensor] = None,
                     live_length: Optional[Tensor] = None) -> Tensor:
    """One query token per sequence against cache slots ``[0, length)``.

    Args:
        q: ``[B, Hq, d]`` float32, bfloat16 or float16.
        k_cache, v_cache: ``[B, Hkv, C, d]``, dtype of ``q``.
        pos: ``[B, Hkv, C]`` int32, original position of each slot (< 0: empty, masked).
        length: number of live slots, ``0 <= length <= C``.
        scale: softmax scale, usually ``d ** -0.5``.
        score_acc: optional ``[B, Hkv, C]`` float32; when given, the op adds into it (in place),
            for each KV head and slot, the max over the G query heads of their softmax
            probability (the attention that H2O accumulates).
        live_length: optional ``[1]`` int64 on the device of ``q``: only slots
            ``[0, min(length, live_length[0]))`` are read, the others count as empty. It is read
            on the device when the op runs, so a CUDA graph captured with a fixed ``length``
            reads only the slots the cache holds at each replay.

    Returns:
        ``[B, Hq, d]`` in the dtype of ``q``; a row with no live slot is 0.
    """
    return _ops.decode_attention(q, k_cache, v_cache, pos, length, scale, score_acc, live_length)


def window_scores(q_win: Tensor, k: Tensor, pos: Tensor, scale: float) -> Tensor:
    """G-KV local score S of the candidate keys (reference section 2.1).

    The W window queries belong to the last W slots: query i sees slots ``j <= N - W + i`` with
    ``pos[j] >= 0``. S is the mean over the W queries of the max over the query group of the
    softmax probability. The window slots themselves are not candidates.

    Args:
        q_win: ``[B, Hq, W, d]``; k: ``[B, Hkv, N, d]`` (same dtype); pos: ``[B, Hkv, N]`` int32.

    Returns:
        S ``[B, Hkv, N - W]`` float32.
    """
    return _ops.window_scores(q_win, k, pos, scale)


def redundancy_scores(k: Tensor, pos: Tensor, threshold: float = 0.5) -> Tensor:
    """Key-redundancy score R of every slot (reference section 2.2).

    Cosine similarity between unit keys with the diagonal zeroed; for each key j its most recent
    near-copy (similarity > threshold) is exempted; row sums; softmax over the valid slots with
    temperature = number of valid slots. Empty slots get 0.

    Args:
        k: ``[B, Hkv, N, d]``; pos: ``[B, Hkv, N]`` int32.

    Returns:
        R ``[B, Hkv, N]`` float32.
    """
    return _ops.redundancy_scores(k, pos, threshold)


def redundancy_scores_carry(k: Tensor, pos: Tensor, carried: Tensor,
                            threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """``redundancy_scores`` with each key's exemption carried from one compression to the next.

    The similarity of two keys never changes, so a compressed cache can keep each slot's
    exemption m*(j) (the slot of its most recent near-copy) and have the next call scan only the
    slots added since, plus the slots whose m*(j) was evicted (on CUDA; the CPU oracle scans
    every row). The result equals ``redundancy_scores`` when ``carried`` is such a state.

    Args:
        k: ``[B, Hkv, N, d]``; pos: ``[B, Hkv, N]`` int32.
        carried: ``[B, Hkv, M]`` int32, M <= N: the exemptions of slots ``[0, M)`` among those
            slots alone, as an earlier call returned them for the slots kept (in order,
            renumbered), -2 where the slot named was evicted; ``M = 0`` for none.

    Returns:
        (R ``[B, Hkv, N]`` float32, m* ``[B, Hkv, N]`` int32: -1 for none and at empty slots).
    """
    return _ops.redundancy_scores_carry(k, pos, carried, threshold)


def select_keep(score: Tensor, keep: int, window: int) -> Tensor:
    """Per-head selection: the ``keep`` best of M candidates, in ascending slot order, then the
    window slots ``M .. M + window - 1``.

    Ties go to the later slot; -inf (or NaN) candidates are taken only when nothing else is left.

    Args:
        score: ``[B, Hkv, M]`` float32; ``0 <= keep <= M``; ``window >= 0``.

    Returns:
        idx ``[B, Hkv, keep + window]`` int64.
    """
    return _ops.select_keep(score, keep, window)


def compact_(k_cache: Tensor, v_cache: Tensor, pos: Tensor, score: Tensor, idx: Tensor) -> None:
    """In place, per head: slot t takes slot ``idx[..., t]`` for ``t < K``.

    Args:
        k_cache, v_cache: ``[B, Hkv, C, d]`` contiguous; pos: ``[B, Hkv, C]`` int32;
        score: ``[B, Hkv, C]`` float32; idx: ``[B, Hkv, K]`` int64 in ``[0, C)``, any order
        (ascending, as select_keep gives it, compacts in place; other orders go through a
        scratch copy). Slots ``>= K`` are left as they were.
    """
    _ops.compact_(k_cache, v_cache, pos, score, idx)


def write_slot_(k_cache: Tensor, v_cache: Tensor, pos: Tensor, k: Tensor, v: Tensor,
                new_pos: Tensor, slot: Tensor, q_ring: Optional[Tensor] = None,
                q: Optional[Tensor] = None, ring_slot: Optional[Tensor] = None) -> None:
    """In place: one decoded token's K, V and position written into cache slot ``slot``, and
    optionally its query into slot ``ring_slot`` of the window's query ring, in one launch.

    The slots are tensors read on the device, so a replayed CUDA graph can advance them in place.
    On CPU a slot out of range raises; on CUDA it writes nothing (checking it would read it back
    to the host).

    Args:
        k_cache, v_cache: ``[B, Hkv, C, d]`` contiguous; pos: ``[B, Hkv, C]`` int32 contiguous.
        k, v: ``[B, Hkv, d]``, dtype of the cache (any strides); new_pos: ``[B, Hkv]`` int32;
        slot: int64 with one element.
        q_ring: ``[B, Hq, W, d]`` contiguous, dtype of the cache; q: ``[B, Hq, d]``; ring_slot:
            int64 with one element. All three or none.
    """
    _ops.write_slot_(k_cache, v_cache, pos, k, v, new_pos, slot, q_ring, q, ring_slot)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Differentiable gather along the token axis: ``out[b, h, t] = x[b, h, idx[b, h, t]]``.

    Args:
        x: ``[B, H, N, d]``; idx: ``[B, H, K]`` int64 in ``[0, N)``.

    Returns:
        ``[B, H, K, d]``; the backward scatter-adds into ``x``'s gradient.
    """
    return _ops.gather_tokens(x, idx)


def lifetime_attention(q: Tensor, k: Tensor, v: Tensor, death: Tensor,
                       scale: float) -> Tuple[Tensor, Tensor]:
    """Causal attention under a compressed cache's eviction history.

    Key j is visible to query i iff ``j <= i < death[b, h, j]``, so a training forward sees
    exactly the context a compressed-cache rollout saw. Mask state is O(T), never T x T.
    Differentiable in q, k and v.

    Args:
        q: ``[B, Hq, T, d]``; k, v: ``[B, Hkv, T, d]``; death: ``[B, Hkv, T]`` int32 (the first
            query position that no longer sees key j; a large value if never evicted, <= j for
            padding).

    Returns:
        (out ``[B, Hq, T, d]``, lse ``[B, Hq, T]`` float32 natural-log sum of exp of the scaled
        logits). A row that sees no key gives out = 0 and lse = -inf.
    """
    return _ops.lifetime_attention(q, k, v, death, scale)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The decoder's RMSNorm (transformers' Llama/Qwen2 RMSNorm), fused into one op.

    Per row: the mean of squares in float32, ``x * rsqrt(mean + eps)`` in float32, cast to
    ``x``'s dtype, then multiplied by ``weight`` in ``x``'s dtype. Differentiable in ``x`` and
    ``weight``; under autocast, ``x`` and ``weight`` are first cast to their promoted dtype.

    Args:
        x: ``[..., D]`` float32, bfloat16 or float16 (any strides; read as contiguous).
        weight: ``[D]``, dtype of ``x``.
        eps: ``>= 0``.

    Returns:
        ``[..., D]`` contiguous, dtype of ``x``.
    """
    return _ops.rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """A residual add and the RMSNorm after it, in one pass (one kernel on CUDA).

    ``sum = x + residual`` in ``x``'s dtype, rounded as ATen's add rounds it, then
    ``rms_norm(sum, weight, eps)``. Differentiable in all three tensors; under autocast they are
    first cast to their promoted dtype.

    Args:
        x, residual: ``[..., D]``, one float dtype; weight: ``[D]``, same dtype; eps: ``>= 0``.

    Returns:
        ``(sum, normed)``, both ``[..., D]`` contiguous.
    """
    return _ops.add_rms_norm(x, residual, weight, eps)


def silu_mul(x: Tensor) -> Tensor:
    """SwiGLU's gating over the halves of a joint gate/up projection, in one pass.

    ``silu(x[..., :F]) * x[..., F:]`` in ``x``'s dtype, each op rounded as ATen rounds it.
    Differentiable.

    Args:
        x: ``[..., 2F]`` float32, bfloat16 or float16.

    Returns:
        ``[..., F]`` contiguous.
    """
    return _ops.silu_mul(x)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (rotate-half convention), fused into one op.

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``,
    rounded in ``x``'s dtype like the composite formula. Differentiable in ``x``; ``cos`` and
    ``sin`` (functions of the positions) get no gradient and must not require one.

    Args:
        x: ``[B, H, T, d]`` float32, bfloat16 or float16, d even, any strides (the CUDA kernel
            reads them in place).
        cos, sin: ``[B or 1, H or 1, T or 1, d]``, dtype of ``x`` (broadcast to ``x``).

    Returns:
        ``[B, H, T, d]`` contiguous, dtype of ``x``.
    """
    return _ops.apply_rope(x, cos, sin)


def decode_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """A linear layer for the few rows of a decode step: ``x @ weight.T + bias``.

    Accumulated in fp32 and rounded once to ``x``'s dtype. On CUDA, bfloat16/float16 ``x`` with 1
    to 64 rows (after flattening the leading dims), ``in_features`` a multiple of 8, 16-byte
    aligned rows and a contiguous weight runs our weight-streaming kernel; every other case runs
    ATen's ``linear`` (cuBLAS). Differentiable (through ATen's ``linear``).

    Args:
        x: ``[..., in_features]`` float32, bfloat16 or float16.
        weight: ``[out_features, in_features]``, dtype of ``x``.
        bias: ``[out_features]``, dtype of ``x``, or None.

    Returns:
        ``[..., out_features]`` contiguous, dtype of ``x``.
    """
    return _ops.decode_linear(x, weight, bias)
