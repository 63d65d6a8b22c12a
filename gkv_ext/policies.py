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

plus ``sinks`` first real tokens always kept. Arguments left as None take the reference defaults,
which live in one place (csrc/cache/policy.h): window 16, divide_length 128, alpha 0.8, lam 0.5
(G-KV) or 0.1 (R-KV), 4 sinks. Any combination is a valid new policy::

    p = GKV(budget=256)
    p.history = "mean"          # or build one from scratch: Policy(); p.budget = ...
"""
from typing import Optional

from ._C import Policy
from ._checks import integer, real

__all__ = ["Policy", "FullKV", "StreamingLLM", "H2O", "SnapKV", "RKV", "TOVA", "GKV", "by_name"]


_REALS = ("alpha", "lam")  # the float arguments; history is a str; the rest are ints


def _typed(name, value):
    """``value`` as the binding takes it, or a TypeError naming the argument (the binding's own
    lists the signatures it accepts)."""
    if name == "history":
        if not isinstance(value, str):
            raise TypeError(f"history must be a str (e.g. 'max'), got {type(value).__name__}")
        return value
    return real(value, name) if name in _REALS else integer(value, name)


def _make(ctor, budget, divide_length, **kwargs) -> Policy:
    """ctor(budget, **the given kwargs); the C++ defaults fill the rest."""
    policy = ctor(integer(budget, "budget"),
                  **{k: _typed(k, v) for k, v in kwargs.items() if v is not None})
    if divide_length is not None:
        policy.divide_length = integer(divide_length, "divide_length")
    policy.validate()
    return policy


def FullKV() -> Policy:
    """No eviction: the cache holds every token."""
    return Policy.full_kv()


def StreamingLLM(budget: int, sinks: Optional[int] = None,
                 divide_length: Optional[int] = None) -> Policy:
    """The first ``sinks`` real tokens and the most recent ``budget - sinks``."""
    return _make(Policy.streaming_llm, budget, divide_length, sinks=sinks)


def H2O(budget: int, mode: str = "sampled", alpha: Optional[float] = None,
        window: Optional[int] = None, divide_length: Optional[int] = None) -> Policy:
    """H2O. ``mode='sampled'``: the reference recipe, F = alpha F_prev + S/max S with a window of
    one query, sampled every D steps. ``mode='accumulate'``: true H2O, every query's attention
    summed from the prefill on, the last ``window`` tokens kept as recent."""
    if mode == "sampled":
        if window is not None:
            raise ValueError("H2O mode 'sampled' has a window of 1; window is for 'accumulate'")
        return _make(Policy.h2o_sampled, budget, divide_length, alpha=alpha)
    if mode == "accumulate":
        if alpha is not None:
            raise ValueError("H2O mode 'accumulate' has no decay; alpha is for 'sampled'")
        return _make(Policy.h2o_accumulate, budget, divide_length, window=window)
    raise ValueError(f"H2O mode must be 'sampled' or 'accumulate', got {mode!r}")


def SnapKV(budget: int, window: Optional[int] = None,
           divide_length: Optional[int] = None) -> Policy:
    """maxpool5(S), applied at decode time."""
    return _make(Policy.snapkv, budget, divide_length, window=window)


def RKV(budget: int, window: Optional[int] = None, lam: Optional[float] = None,
        divide_length: Optional[int] = None) -> Policy:
    """lam * maxpool5(S) - (1 - lam) * R, no normalisation."""
    return _make(Policy.rkv, budget, divide_length, window=window, lam=lam)


def TOVA(budget: int, window: Optional[int] = None,
         divide_length: Optional[int] = None) -> Policy:
    """The attention of the last query only."""
    return _make(Policy.tova, budget, divide_length, window=window)


def GKV(budget: int, window: Optional[int] = None, alpha: Optional[float] = None,
        lam: Optional[float] = None, history: Optional[str] = None,
        divide_length: Optional[int] = None) -> Policy:
    """G-KV: lam * F - (1 - lam) * R/max R with F = max(alpha F_prev, S/max S) (history 'max';
    also 'mean' and 'sum')."""
    return _make(Policy.gkv, budget, divide_length, window=window, alpha=alpha, lam=lam,
                 history=history)


def _h2o_accumulate(budget: int, **kwargs) -> Policy:
    return H2O(budget, mode="accumulate", **kwargs)


_BY_NAME = {"fullkv": FullKV, "streamingllm": StreamingLLM, "h2o": H2O,
            "h2o-accumulate": _h2o_accumulate, "snapkv": SnapKV, "rkv": RKV, "tova": TOVA,
            "gkv": GKV}
NAMES = tuple(_BY_NAME)


def canonical_name(name: str) -> str:
    """``name`` as NAMES spells it (case, '-' and '_' ignored); unknown names raise ValueError."""
    key = name.lower().replace("-", "").replace("_", "")
    for known in NAMES:
        if key == known.replace("-", ""):
            return known
    raise ValueError(f"unknown policy {name!r}; one of {', '.join(NAMES)}")


def by_name(name: str, budget: Optional[int] = None, **kwargs) -> Policy:
    """The policy called ``name``, one of NAMES (case, '-' and '_' ignored)."""
    key = canonical_name(name)
    if key == "fullkv":
        return FullKV()
    if budget is None:
        raise ValueError(f"policy {name!r} needs a budget")
    return _BY_NAME[key](budget, **kwargs)
