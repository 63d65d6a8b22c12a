"""The native generation engine from Python: ``load_model`` and ``generate`` (csrc/engine)."""
from dataclasses import dataclass
from os import PathLike
from typing import Callable, List, Optional, Sequence, Union

import torch

from . import _C
from ._checks import check_seed, integer, model_dtype, token_ids
from .policies import FullKV, Policy

__all__ = ["load_model", "generate", "teacher_forced", "Generation"]


def load_model(path: Union[str, PathLike], device: Optional[str] = None,
               dtype: Union[None, str, torch.dtype] = None) -> _C.Model:
    """A transformers checkpoint directory (config.json + safetensors) or a llama2.ts .bin file
    (stories260K), optionally moved to ``device`` / cast to ``dtype`` (a torch.dtype, or
    "float32", "bfloat16" or "float16")."""
    dtype = model_dtype(dtype)
    model = _C.Model.load(str(path))
    if device is not None or dtype is not None:
        model.to(device, dtype)
    return model


@dataclass
class Generation:
    tokens: torch.Tensor          # [B,T] int64, pad after a row's stop token
    logprobs: torch.Tensor        # [B,T] fp32 log-prob of each token under the raw logits
    lengths: torch.Tensor         # [B] int64 tokens generated per row, stop token included
    prompt_lengths: torch.Tensor  # [B] int64
    death: Optional[torch.Tensor]  # [B,L,Hkv,P+max_new_tokens] int32 eviction log (None
                                   # when generate had eviction_log=False)
    kv_slots: int                 # slots per layer and KV head the cache allocated, once
    texts: Optional[List[str]] = None  # each row's sequence decoded, when generate had a tokenizer

    @property
    def sequences(self) -> List[List[int]]:
        """Each row's generated tokens, up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


Prompts = Union[str, Sequence[int], Sequence[Union[str, Sequence[int]]]]


def _prompt_lists(prompts: Prompts, tokenizer=None) -> List[List[int]]:
    """One prompt or a list of them, each a text (encoded by ``tokenizer``) or token ids."""
    if isinstance(prompts, torch.Tensor):
        raise TypeError("prompts must be texts or token id lists (one, or a list of them); "
                        "left padding is done by generate")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if prompts and not isinstance(prompts[0], str) and not hasattr(prompts[0], "__iter__"):
        return [token_ids(prompts, "prompts")]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("a text prompt needs tokenizer= (an object with encode(text), "
                                 "e.g. gkv_ext.tasks.load_tokenizer(model_dir))")
            p = tokenizer.encode(p)
        out.append(token_ids(p, f"prompts[{i}]"))
    return out


def _policy_or_fullkv(policy: Optional[Policy]) -> Policy:
    if policy is None:
        return FullKV()
    if not isinstance(policy, Policy):
        raise TypeError("policy must be a gkv_ext.policies policy (e.g. policies.GKV(budget=1024) "
                        f"or policies.by_name(name, budget)), got {type(policy).__name__}")
    return policy


def generate(model: _C.Model, prompts: Prompts, policy: Optional[Policy] = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, eos_token_ids: Optional[Sequence[int]] = None,
             stop_token_ids: Sequence[int] = (), pad_token_id: Optional[int] = None,
             cuda_graph: bool = True, tokenizer=None,
             on_token: Optional[Callable[[int, List[int]], Optional[bool]]] = None,
             progress: bool = False, eviction_log: bool = True) -> Generation:
    """Batched generation with a compressed KV cache.

    Args:
        prompts: one prompt or a list of them (left-padded into one batch), each a list of token
            ids or a text, which ``tokenizer`` encodes.
        policy: a ``gkv_ext.policies`` policy; FullKV when None.
        temperature: 0 for greedy; otherwise sampling with ``top_p`` / ``top_k`` and ``seed``.
        eos_token_ids: end a row; default the model config's. ``stop_token_ids`` end it too.
        pad_token_id: fills finished rows and left padding; default the first EOS id, else 0.
        cuda_graph: on CUDA, replay a captured decode step (same results; False: all eager).
        tokenizer: encodes text prompts (``encode(text) -> ids``) and, when given, decodes each
            row's sequence into ``Generation.texts`` (``decode(ids) -> str``).
        on_token: called after every step as ``on_token(step, tokens)`` with one token per row
            (pad in finished rows), for streaming; returning False ends the generation there.
            It costs a host sync per step.
        progress: a tqdm bar over the steps (through on_token: a host sync per step too).
        eviction_log: False keeps no eviction log (``death`` is None): then the memory of
            generation is flat in ``max_new_tokens`` under a budget, not only its KV cache.
    """
    check_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, desc="gkv_ext.generate", unit="tok")

    def after_step(step, tokens):
        if bar is not None:
            bar.update(1)
        return None if on_token is None else on_token(step, tokens.tolist())
    try:
        r = _C.generate(model, _prompt_lists(prompts, tokenizer), _policy_or_fullkv(policy),
                        integer(max_new_tokens, "max_new_tokens"), temperature, top_p,
                        integer(top_k, "top_k"), seed,
                        None if eos_token_ids is None else token_ids(eos_token_ids,
                                                                     "eos_token_ids"),
                        token_ids(stop_token_ids, "stop_token_ids"),
                        None if pad_token_id is None else integer(pad_token_id, "pad_token_id"),
                        cuda_graph,
                        after_step if on_token is not None or progress else None,
                        eviction_log)
    finally:
        if bar is not None:
            bar.close()
    out = Generation(r.tokens, r.logprobs, r.lengths, r.prompt_lengths, r.death, r.kv_slots)
    if tokenizer is not None:
        out.texts = [tokenizer.decode(seq) for seq in out.sequences]
    return out


def teacher_forced(model: _C.Model, prompts: Prompts,
                   tokens: Union[torch.Tensor, Sequence[Sequence[int]]],
                   policy: Optional[Policy] = None, pad_token_id: Optional[int] = None,
                   tokenizer=None, eviction_log: bool = True):
    """Runs ``tokens`` [B,T] (a tensor or B lists of T ids) after the prompts (as in generate;
    ``tokenizer`` encodes text ones) as if generated, in chunks ending at the compression steps;
    returns (logprobs [B,T], death [B,L,Hkv,P+T], or None with ``eviction_log=False``)."""
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens, dtype=torch.long)
    r = _C.teacher_forced(model, _prompt_lists(prompts, tokenizer), tokens,
                          _policy_or_fullkv(policy), pad_token_id, eviction_log)
    return r.logprobs, r.death
