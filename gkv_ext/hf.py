"""Compressed-cache generation for transformers models (Llama, Qwen2, Qwen3 families).

Supported: transformers >= 5.0 (tested with 5.17): it needs the 5.x ``Cache`` / ``CacheLayerMixin``
classes, ``AttentionInterface`` and ``AttentionMaskInterface``. Two ways in::

    out = gkv_ext.hf.generate(model, **inputs, policy=GKV(budget=2048), max_new_tokens=8192)
    out.sequences                  # [B, P + max_new_tokens], like model.generate's

    cache = gkv_ext.hf.CompressedCache(model, GKV(budget=2048), max_tokens=P + 8192)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=8192)

How, with public extension points only:
- ``CompressedCache`` is a transformers ``Cache`` whose layers store nothing: it owns one native
  ``gkv_ext.CompressedKVCache`` (csrc/cache/kv_cache.h), preallocated at budget + D slots.
- The attention function registered as ``"gkv"`` (``AttentionInterface``) receives each layer's
  post-RoPE (q, k, v) of the new tokens and hands them to the native cache, which appends, attends
  over the compressed cache, scores and compacts (eviction takes effect from the next forward).
  transformers calls ``cache.update(k, v, layer)`` right before the layer's attention; ``update``
  returns the new k, v unchanged and passes the cache on to that attention call (a thread-local
  hand-off), so no full-length copy exists anywhere.
- The mask function registered as ``"gkv"`` (``AttentionMaskInterface``) passes the 2-D padding
  mask through instead of building a [B,1,T,N] mask: the native cache knows the pads.
- Forward boundaries: ``gkv_ext.hf.generate`` begins each forward itself and passes the native
  positions as ``position_ids``. Under ``model.generate`` the first layer's attention begins it
  (the prefill from the padding mask) and transformers' own ``position_ids`` (cumsum of the mask)
  are used, which are the same original positions (checked at the prefill); the last layer's
  attention ends it.
- Positions: a token's RoPE position is the count of real tokens before it in its row, never a
  compacted slot index (reference/gkv-method.md section 1.4).
- Speed: on CUDA, ``gkv_ext.hf.generate`` replays the model's one-token forward from a CUDA graph
  (``_DecodeGraph``) at every step (a compression step compresses after its replay), so a step
  costs the GPU's work rather than transformers' host code.
"""
import threading
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch

from . import _C
from .policies import FullKV, Policy

try:
    import transformers
    from transformers import AttentionInterface, Cache
    from transformers.cache_utils import CacheLayerMixin
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # transformers is optional for the rest of gkv_ext
    raise ImportError(f"gkv_ext.hf needs transformers >= 5.0 (tested with 5.17): {e}") from e
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"gkv_ext.hf needs transformers >= 5.0 (tested with 5.17), found "
                      f"{transformers.__version__}")

__all__ = ["ATTENTION", "SUPPORTED_MODEL_TYPES", "CompressedCache", "HFGeneration", "generate"]

ATTENTION = "gkv"  # the attn_implementation name this module registers
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# gkv_ext.hf.generate checks for "every row finished" once per this many steps: a check is a
# device-to-host sync, which would otherwise stall every decode step on CUDA.
FINISHED_CHECK_EVERY = 16

# .cache, .layer, .key: set by CompressedCache.update, taken by the layer's _attention call
_handoff = threading.local()


@dataclass(frozen=True)
class _Spec:
    """The cache shape of a supported model."""
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_positions: int


def _spec(model) -> _Spec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"gkv_ext.hf supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
                         f"(transformers Llama / Qwen2 / Qwen3 *ForCausalLM); got {model_type!r} "
                         f"({type(model).__name__})")
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if getattr(config, "use_sliding_window", False) or set(layer_types) != {"full_attention"}:
        raise ValueError("gkv_ext.hf: sliding-window attention layers are not supported "
                         f"(config.layer_types = {sorted(set(layer_types))})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return _Spec(config.num_hidden_layers, config.num_attention_heads,
                 config.num_key_value_heads, head_dim, config.max_position_embeddings)


class _CompressedLayer(CacheLayerMixin):
    """One layer's view of a CompressedCache: sizes for transformers' mask and position code.
    It keeps no tensors (keys / values stay None): the native cache holds them."""
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "CompressedCache"):
        super().__init__()
        self.owner = owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("CompressedCache layers are updated through CompressedCache.update")

    def get_mask_sizes(self, query_length: int):
        return self.owner.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return self.owner.max_tokens

    def reset(self) -> None:
        raise RuntimeError("a CompressedCache cannot be reset; make a new one per generation")

    def reorder_cache(self, beam_idx) -> None:
        raise RuntimeError("CompressedCache does not support beam search (num_beams > 1)")


class CompressedCache(Cache):
    """A transformers Cache that keeps a policy's compressed KV cache of ``model``.

    Args:
        model: a Llama / Qwen2 / Qwen3 ``*ForCausalLM`` (any dtype, CPU or CUDA). Its attention
            implementation is switched to ``"gkv"`` (``model.set_attn_implementation("sdpa")``
            switches it back); the "gkv" attention only works with this cache.
        policy: a ``gkv_ext.policies`` policy; FullKV when None.
        max_tokens: the most tokens one row will hold, padding included (prompt + new tokens).
            It sizes the eviction log and FullKV's cache (compressing policies preallocate
            budget + divide_length slots whatever it is); default the model's
            max_position_embeddings.
        eviction_log: keep the eviction log ([B,L,Hkv,max_tokens] int32, see ``eviction_log``);
            False saves that memory.

    One cache serves one generation (one prefill, then decode forwards); the native cache is
    created at the prefill, when the batch size, dtype and device are known.
    """

    def __init__(self, model, policy: Optional[Policy] = None, max_tokens: Optional[int] = None,
                 eviction_log: bool = True):
        self.spec = _spec(model)
        if policy is None:
            policy = FullKV()
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a gkv_ext.policies Policy (e.g. GKV(budget=2048)), "
                            f"got {type(policy).__name__}")
        policy.validate()
        if max_tokens is None:
            max_tokens = self.spec.max_positions
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int (prompt + new tokens), "
                             f"got {max_tokens!r}")
        self.policy = policy
        self.max_tokens = max_tokens
        self.keeps_eviction_log = eviction_log
        self.native: Optional[_C.CompressedKVCache] = None
        self._seen = 0            # tokens per row (padding included) of the finished forwards
        self._tokens = 0          # T of the forward in progress, 0 when none is
        self._attended = 0        # layers attended in the forward in progress
        super().__init__(layers=[_CompressedLayer(self) for _ in range(self.spec.layers)])
        if model.config._attn_implementation != ATTENTION:
            model.set_attn_implementation(ATTENTION)
        if model not in _checked_models:
            model.register_forward_pre_hook(_check_new_tokens, with_kwargs=True)
            _checked_models.add(model)

    # --- transformers' Cache API -------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Passes this cache to the layer's attention call that follows; returns k, v as given
        (the "gkv" attention appends them to the native cache)."""
        _handoff.cache, _handoff.layer, _handoff.key = self, layer_idx, key_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens per row seen so far, padding included (not the compressed length)."""
        return self._seen

    def reorder_cache(self, beam_idx) -> None:
        raise RuntimeError("CompressedCache does not support beam search (num_beams > 1)")

    def crop(self, max_length: int) -> None:
        raise RuntimeError("CompressedCache cannot be cropped (assisted / speculative decoding "
                           "is not supported)")

    # --- forwards ----------------------------------------------------------------------------
    def begin_forward(self, tokens: int, attention_mask: Optional[torch.Tensor] = None,
                      like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Starts a forward of ``tokens`` new tokens per row; returns their positions [B,T] int64.
        The first forward is the prefill: ``attention_mask`` [B,P] (None: no padding; then
        ``like`` [B,...] gives the batch size) and ``like`` the dtype and device of the cache."""
        if self._tokens:
            raise RuntimeError("CompressedCache: a forward is already in progress")
        if self.native is None:
            if like is None:
                raise ValueError("CompressedCache.begin_forward: the prefill needs `like` "
                                 "(a tensor of the model's dtype and device)")
            if attention_mask is None:
                attention_mask = torch.ones(like.shape[0], tokens, dtype=torch.long,
                                            device=like.device)
            if attention_mask.dim() != 2 or attention_mask.shape[1] != tokens:
                raise ValueError(f"attention_mask must be [B,P] with P = {tokens} prompt tokens, "
                                 f"got {tuple(attention_mask.shape)}")
            if not bool(attention_mask[:, -1].all()):
                raise ValueError("attention_mask: every row's last token must be real; pad on "
                                 "the left (tokenizer padding_side='left')")
            s = self.spec
            self.native = _C.CompressedKVCache(
                self.policy, s.layers, attention_mask.shape[0], s.q_heads, s.kv_heads,
                s.head_dim, self.max_tokens, like.dtype, str(like.device),
                self.keeps_eviction_log)
            positions = self.native.begin_prefill(attention_mask)
        else:
            positions = self.native.begin_decode(tokens)
        self._tokens = tokens
        return positions

    def attend(self, layer: int, q, k, v, attention_mask=None, position_ids=None):
        """q [B,Hq,T,d], k/v [B,Hkv,T,d] post-RoPE -> out [B,T,Hq,d] (transformers' layout)."""
        if not self._tokens:  # under model.generate: this first layer begins the forward
            self.check_continues(q.shape[2], attention_mask)
            positions = self.begin_forward(q.shape[2], attention_mask if self.native is None
                                           else None, like=q)
            if self.native.forwards == 0 and position_ids is not None:
                self._check_positions(positions, position_ids, attention_mask)
        out = self.native.attend(layer, q, k, v)
        self._attended += 1
        if self._attended == self.spec.layers:
            self.native.end_forward()
            self._seen += self._tokens
            self._tokens = self._attended = 0
        return out.transpose(1, 2)

    def check_continues(self, tokens: int, attention_mask=None) -> None:
        """Raises unless a forward of ``tokens`` new tokens per row under ``attention_mask`` (2-D,
        or transformers' 4-D: its last dim spans every token of the generation) continues what
        this cache holds. The model's forward pre-hook calls it before transformers embeds an
        input it may have sliced to nothing; the first layer's attention calls it again."""
        if self.native is not None and attention_mask is not None and \
                attention_mask.shape[-1] != self._seen + tokens:
            # A mask that does not span the earlier tokens too belongs to a new prompt, whose
            # tokens would be attended after the earlier generation's.
            raise RuntimeError(
                f"CompressedCache: this cache holds {self._seen} tokens per row of an earlier "
                f"generation, but the attention mask covers {attention_mask.shape[-1]}; a new "
                "prompt needs a new CompressedCache (a continuation passes the whole earlier "
                "sequence as its prompt)")
        if tokens < 1:
            raise RuntimeError("CompressedCache: a forward needs at least one new token per row, "
                               "got 0")

    def account_replayed_decode(self, replay) -> None:
        """A one-token forward whose device work is ``replay()`` (a CUDA graph's replay): the
        native cache checks that it fits, calls it, keeps the books and, on a compression step,
        compresses after it."""
        self.native.account_replayed_decode(replay)
        self._seen += 1

    @staticmethod
    def _check_positions(ours, theirs, attention_mask):
        """transformers' position_ids must be the original positions of the real tokens."""
        real = torch.ones_like(ours, dtype=torch.bool) if attention_mask is None \
            else attention_mask.to(ours.device).bool()
        if not torch.equal(ours[real], theirs.to(ours.device).expand_as(ours)[real]):
            raise ValueError("position_ids must be the count of real tokens before each token "
                             "(transformers' default from attention_mask); got others")

    # --- results -----------------------------------------------------------------------------
    def eviction_log(self) -> torch.Tensor:
        """[B,L,Hkv,max_tokens] int32: death[b,l,h,p] = the first query position that no longer
        sees the key at position p of row b (INT32_MAX: never evicted)."""
        if self.native is None:
            raise RuntimeError("CompressedCache: no prefill yet")
        return self.native.death()

    def kv_tensors(self):
        """Every tensor of KV memory this cache holds (the native per-layer buffers)."""
        if self.native is None:
            return []
        return [t for i in range(self.spec.layers)
                for t in (self.native.keys(i), self.native.values(i))]


# Models whose forward checks a CompressedCache's new tokens (one hook per model, however many
# caches it serves).
_checked_models = weakref.WeakSet()


def _check_new_tokens(model, args, kwargs):
    """Forward pre-hook: transformers' generate slices a prompt to the tokens past the cache's
    length, which for a reused cache and a shorter prompt leaves none; this names that mistake
    before the embedding or a projection fails on the empty input."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache):
        return
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is not None:
        cache.check_continues(inputs.shape[1], kwargs.get("attention_mask"))


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "gkv" attention: this layer's new (q, k, v) go to the CompressedCache."""
    cache = getattr(_handoff, "cache", None)
    layer = getattr(module, "layer_idx", None)
    # The hand-off must be from this very layer's update (not one left by a failed forward).
    if cache is None or _handoff.layer != layer or _handoff.key is not key:
        raise RuntimeError("the 'gkv' attention needs past_key_values=gkv_ext.hf.CompressedCache"
                           "(model, policy) (use gkv_ext.hf.generate, or call "
                           "model.set_attn_implementation('sdpa') to go back)")
    _handoff.cache = _handoff.key = None
    if module.training and dropout:
        raise RuntimeError("the 'gkv' attention is for inference (model.eval())")
    if scaling is not None and abs(scaling * query.shape[-1] ** 0.5 - 1.0) > 1e-6:
        raise ValueError(f"the 'gkv' attention uses scaling 1/sqrt(head_dim); got {scaling}")
    return cache.attend(layer, query, key, value, attention_mask, kwargs.get("position_ids")), None


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """The "gkv" mask: the 2-D padding mask itself; the native cache masks pads and the future."""
    return attention_mask


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, _padding_mask)


@dataclass
class HFGeneration:
    sequences: torch.Tensor                # [B, P + max_new_tokens] int64, pad after a row's stop
    prompt_length: int                     # P, padding included
    lengths: torch.Tensor                  # [B] int64 new tokens per row, stop token included
    eviction_log: Optional[torch.Tensor]   # [B,L,Hkv,P+max_new_tokens] int32 when asked for
    graph_replays: int = 0                 # decode steps replayed from a CUDA graph

    @property
    def new_tokens(self) -> torch.Tensor:  # [B, max_new_tokens]
        return self.sequences[:, self.prompt_length:]


class _attention_set_to:
    """Switches the model's attention implementation for a block and restores it after."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        return self

    def __exit__(self, *exc):
        if self.previous != self.name:
            self.model.set_attn_implementation(self.previous)


def _eos_ids(model, eos_token_id) -> list:
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _sampler(do_sample, temperature, top_k, top_p):
    if not do_sample:
        return None
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _check_inputs(input_ids, attention_mask, max_new_tokens, vocab_size):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor [B,P] with P >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    # Pads are embedded too. On CUDA an id past the table is a device-side assert that ends the
    # process's CUDA context, so it is named here.
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must be in [0, {vocab_size}) (the model's embedding rows), "
                         f"got {low if low < 0 else high}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             policy: Optional[Policy] = None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             eos_token_id: Union[int, Iterable[int], None] = None,
             pad_token_id: Optional[int] = None, return_eviction_log: bool = False,
             progress: bool = False, streamer=None, cuda_graph: bool = True) -> HFGeneration:
    """Generates from a transformers Llama / Qwen2 / Qwen3 model with a compressed KV cache.

    Args:
        input_ids, attention_mask: a left-padded batch [B,P], e.g. ``**tokenizer(...,
            padding_side="left", return_tensors="pt")``.
        policy: a ``gkv_ext.policies`` policy; FullKV when None.
        do_sample: greedy when False; else sampling at ``temperature`` with ``top_k`` (0: off)
            and ``top_p`` (transformers' logits warpers), drawn with ``generator``.
        eos_token_id: ends a row; default the model's generation_config.eos_token_id.
        pad_token_id: fills finished rows; default generation_config's, else the first EOS, else 0.
        return_eviction_log: also return the eviction log (``CompressedCache.eviction_log``).
        progress: a tqdm bar over the decode steps.
        streamer: a transformers streamer (e.g. ``TextStreamer``): ``put`` gets the prompt, then
            each step's tokens [B] (device tensors: the streamer decides when to sync), and
            ``end`` is called once generation stops.
        cuda_graph: on CUDA, replay the decode forward from a CUDA graph (``_DecodeGraph``; the
            same results; a step that compresses replays it, then compresses); False: every step
            eager.
    """
    _check_inputs(input_ids, attention_mask, max_new_tokens,
                  model.get_input_embeddings().num_embeddings)
    warpers = _sampler(do_sample, temperature, top_k, top_p)
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    device = model.device
    input_ids = input_ids.to(device)
    B, P = input_ids.shape
    with _attention_set_to(model, ATTENTION):
        cache = CompressedCache(model, policy, max_tokens=P + max_new_tokens,
                                eviction_log=return_eviction_log)
        like = torch.empty(B, 0, dtype=model.dtype, device=device)
        positions = cache.begin_forward(
            P, None if attention_mask is None else attention_mask.to(device), like=like)
        logits = model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        new = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
        if streamer is not None:
            streamer.put(input_ids)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        decode = _DecodeGraph(model, cache) if cuda_graph and device.type == "cuda" else None
        steps = range(max_new_tokens)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="gkv_ext.hf.generate", unit="tok")
        for step in steps:
            token = _next_token(logits, warpers, input_ids, generator)
            token = torch.where(finished, pad_token_id, token)
            new[:, step] = token
            if streamer is not None:
                streamer.put(token)
            finished |= torch.isin(token, eos_ids)
            last = step + 1 == max_new_tokens
            if last or (eos and (step + 1) % FINISHED_CHECK_EVERY == 0 and bool(finished.all())):
                break
            logits = decode.step(token) if decode else _decode_logits(model, cache, token)
    if streamer is not None:
        streamer.end()
    stopped = torch.isin(new, eos_ids)
    first_stop = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, max_new_tokens)
    return HFGeneration(torch.cat([input_ids, new], 1), P, first_stop.long(),
                        cache.eviction_log() if return_eviction_log else None,
                        decode.replays if decode else 0)


def _decode_logits(model, cache, token):
    """One one-token forward through the cache: token [B] -> logits [B,V] of the next token."""
    positions = cache.begin_forward(1)
    return model(input_ids=token[:, None], position_ids=positions, past_key_values=cache,
                 use_cache=True).logits[:, -1]


class _DecodeGraph:
    """generate's one-token decode forward, replayed from a CUDA graph where it can be: the
    Python twin of the engine's DecodeStepper (csrc/engine/decode_step.h). transformers' forward
    is bound by its host code (~20 ms a step on an H200 for a 28-layer model, whatever the
    batch); a replay launches all its kernels at once.

    A step is replayed when it attends over the span the graph was captured with
    (``decode_span``: fixed under a budget; FullKV's grows every 512 slots and is captured
    again); a compression step replays it too, then compresses, but is never the step captured. Capture is valid because the native cache's one-token forward keeps its
    per-step state in device buffers updated in place, and the "gkv" attention and mask do not
    read the tensors transformers derives from the step count (cache_position); the cache's host
    bookkeeping of a replay is ``account_replayed_decode``."""

    def __init__(self, model, cache: CompressedCache):
        self.model, self.cache = model, cache
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.span = -1
        self.warmed = False
        self.generator_anchor: Optional[torch.cuda.CUDAGraph] = None  # see _warm_up
        self.replays = 0
        self.token = self.logits = None  # the graph's input [B] and output [B,V]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token [B] -> logits [B,V], valid until the next step."""
        native = self.cache.native
        span = native.decode_span()
        if self.graph is not None and span == self.span:
            self.token.copy_(token)
            self.cache.account_replayed_decode(self.graph.replay)
            self.replays += 1
            return self.logits
        if native.decode_compresses(1):  # a compression cannot be captured (host-sized work)
            return _decode_logits(self.model, self.cache, token)
        if not self.warmed:
            return self._warm_up(token)
        self._capture(token, span)
        self.graph.replay()
        self.replays += 1
        return self.logits

    def _warm_up(self, token):
        """The first eligible step runs eagerly on a side stream, so that state the ops make
        lazily per stream (cuBLAS workspaces) exists before anything is captured."""
        with torch.cuda.device(token.device):  # streams are made on the current device
            side, current = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                logits = _decode_logits(self.model, self.cache, token)
            current.wait_stream(side)
        logits.record_stream(current)
        # torch 2.11's capture_begin adds the device's default generator to the graph before the
        # generator's first registration allocates its seed and offset (torch.cuda.graph empties
        # the allocator's cache just before); an out-of-memory error in between leaves a graph
        # whose destructor aborts the process, long after the error was handled. This graph is
        # never captured: it keeps the generator registered, so no capture's registration
        # allocates. Made here, where the eager step has just left small blocks in the cache.
        self.generator_anchor = torch.cuda.CUDAGraph()
        self.generator_anchor.register_generator_state(
            torch.cuda.default_generators[token.device.index])
        self.warmed = True
        return logits

    def _capture(self, token, span):
        """Records this step (the cache's host state advances; the device work is left to the
        replay that follows)."""
        self.graph = None  # torch.cuda.graph synchronizes first, so the old graph is done
        self.token = token.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(token.device), torch.cuda.graph(graph):
                self.logits = _decode_logits(self.model, self.cache, self.token)
        except torch.OutOfMemoryError:
            raise  # the batch, not the capture, is the problem
        except RuntimeError as e:  # e.g. a forward hook that copies weights from the CPU
            raise RuntimeError(f"gkv_ext.hf.generate: this model's decode forward cannot be "
                               f"captured as a CUDA graph ({e}); pass cuda_graph=False") from e
        self.graph, self.span = graph, span


def _next_token(logits, warpers, input_ids, generator):
    """logits [B,V] -> token ids [B]."""
    if warpers is None:
        return logits.argmax(-1)
    probs = warpers(input_ids, logits.float()).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
