"""Eviction policies: thin constructors of the C++ ``Policy`` (csrc/cache/policy.h).

A policy is data: a budget, a window ``w`` of recent tokens always kept, the compression interval
``divide_length`` (D), and the parts of one score formula::

    S      observation: 'window' (mean over the last w queries of the max over the query group
           of the softmax probability), 'last' (the last query only), 'accumulate' (every
           query's attention summed since the key arrived), 'none' (recency)
    S^     S / max S when normalize
    F      history: 'none' S^; 'max' max(alpha F_prev, S^); 'mean' alpha F_prev + (1-alpha) S^;
           'sum' alpha F_prev + S^
    P      maxpool(F, pool_kernel) when pool_kernel > 0
    score  lam * P - (1 - lam) * R (R: key redundancy, normalised like S; skipped when lam == 1)

plus ``sinks`` first real tokens always kept. Any combination is a valid new policy::

    p = GKV(budget=256)
    p.history = "mean"          # or build one from scratch: Policy(); p.budget = ...
"""
from ._C import Policy

__all__ = ["Policy", "FullKV", "StreamingLLM", "H2O", "SnapKV", "RKV", "TOVA", "GKV", "by_name"]


def _with(policy: Policy, divide_length: int) -> Policy:
    policy.divide_length = divide_length
    policy.validate()
    return policy


def FullKV() -> Policy:
    """No eviction: the cache holds every token."""
    return Policy.full_kv()


def StreamingLLM(budget: int, sinks: int = 4, divide_length: int = 128) -> Policy:
    """The first ``sinks`` real tokens and the most recent ``budget - sinks``."""
    return _with(Policy.streaming_llm(budget, sinks), divide_length)


def H2O(budget: int, mode: str = "sampled", alpha: float = 0.8, window: int = 16,
        divide_length: int = 128) -> Policy:
    """H2O. ``mode='sampled'``: the reference recipe, F = alpha F_prev + S/max S with a window of
    one query, sampled every D steps. ``mode='accumulate'``: true H2O, every query's attention
    summed from the prefill on, the last ``window`` tokens kept as recent."""
    if mode == "sampled":
        return _with(Policy.h2o_sampled(budget, alpha), divide_length)
    if mode == "accumulate":
        return _with(Policy.h2o_accumulate(budget, window), divide_length)
    raise ValueError(f"H2O mode must be 'sampled' or 'accumulate', got {mode!r}")


def SnapKV(budget: int, window: int = 16, divide_length: int = 128) -> Policy:
    """maxpool5(S), applied at decode time."""
    return _with(Policy.snapkv(budget, window), divide_length)


def RKV(budget: int, window: int = 16, lam: float = 0.1, divide_length: int = 128) -> Policy:
    """lam * maxpool5(S) - (1 - lam) * R, no normalisation."""
    return _with(Policy.rkv(budget, window, lam), divide_length)


def TOVA(budget: int, window: int = 16, divide_length: int = 128) -> Policy:
    """The attention of the last query only."""
    return _with(Policy.tova(budget, window), divide_length)


def GKV(budget: int, window: int = 16, alpha: float = 0.8, lam: float = 0.5,
        history: str = "max", divide_length: int = 128) -> Policy:
    """G-KV: lam * F - (1 - lam) * R/max R with F = max(alpha F_prev, S/max S) (history 'max';
    also 'mean' and 'sum')."""
    return _with(Policy.gkv(budget, window, alpha, lam, history), divide_length)


_BY_NAME = {"fullkv": FullKV, "streamingllm": StreamingLLM, "h2o": H2O, "snapkv": SnapKV,
            "rkv": RKV, "tova": TOVA, "gkv": GKV}


def by_name(name: str, budget=None, **kwargs) -> Policy:
    """The policy called ``name`` (fullkv, streamingllm, h2o, snapkv, rkv, tova, gkv)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _BY_NAME:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(_BY_NAME)}")
    if key == "fullkv":
        return FullKV()
    if budget is None:
        raise ValueError(f"policy {name!r} needs a budget")
    return _BY_NAME[key](budget, **kwargs)
