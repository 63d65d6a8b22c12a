"""The compressed KV cache (csrc/cache) driven directly with random queries, keys and values.

Every eviction decision of G-KV (max / mean / sum history), SnapKV, R-KV, H2O (both modes),
TOVA and StreamingLLM is checked against a dense re-computation of the policy's formula written
below in plain PyTorch, over several compressions (prefill compression and history included):
kept position sets per KV head are compared as sets, allowing swaps only between candidates whose
reference scores tie. Also: kept keys are the right keys, the eviction log agrees with the kept
sets, the buffers are never reallocated, and bad arguments raise clear errors.
"""
import math

import numpy as np
import pytest
import torch

import gkv_ext
from gkv_ext import CompressedKVCache, Policy, policies
from conftest import requires_cuda

INT32_MAX = 2**31 - 1
TIE = 1e-5  # reference and cache scores agree to ~1e-6 in fp32; closer candidates may swap

# (B, Hq, Hkv, d); prompt pads per row; prompt length; decode steps; budget, window, D
SHAPE = (2, 4, 2, 16)
PADS = [0, 5]


def make_policies():
    out = {
        "gkv-max": policies.GKV(24, window=4, divide_length=8),
        "gkv-mean": policies.GKV(24, window=4, history="mean", divide_length=8),
        "gkv-sum": policies.GKV(24, window=4, history="sum", divide_length=8),
        "snapkv": policies.SnapKV(24, window=4, divide_length=8),
        "rkv": policies.RKV(24, window=4, divide_length=8),
        "h2o-sampled": policies.H2O(24, mode="sampled", divide_length=8),
        "h2o-accumulate": policies.H2O(24, mode="accumulate", window=4, divide_length=8),
        "tova": policies.TOVA(24, window=4, divide_length=8),
        "streamingllm": policies.StreamingLLM(24, sinks=4, divide_length=8),
    }
    custom = policies.GKV(24, window=4, divide_length=8)  # a new policy from the same parts
    custom.pool_kernel = 5
    custom.sinks = 2
    custom.history = "mean"
    out["custom"] = custom
    mixed = policies.H2O(24, mode="accumulate", window=4, divide_length=8)
    mixed.normalize = True  # accumulated attention / its max, mixed with redundancy
    mixed.lam = 0.5
    out["custom-accumulate"] = mixed
    return out


POLICIES = make_policies()


class Reference:
    """The policy's formula, dense, per (row, KV head), over time indices t (pads: t < pads[b])."""

    def __init__(self, policy, pads, Hq, Hkv):
        self.p, self.pads, self.G = policy, pads, Hq // Hkv
        self.Hkv = Hkv
        self.kept = None    # kept[b][h]: ascending time indices
        self.hist = None    # hist[b][h]: {t: F} of the slots that carry history
        self.acc = None     # acc[b][h]: {t: accumulated attention}

    def probs(self, b, h, q, K, tq, keys):
        """Softmax of query q [G,d] (at time tq) over the visible keys (times `keys`) -> [G,len]."""
        vis = torch.tensor([t <= tq and (t >= self.pads[b] or t == tq) for t in keys])
        s = q @ K[b, h, keys].T / math.sqrt(q.shape[-1])
        s = s.masked_fill(~vis, float("-inf"))
        return torch.softmax(s, -1)

    def score(self, b, h, Q, K, keys):
        """(score [C], F [C]) of the candidates keys[:C] at a compression step."""
        p, w, N = self.p, self.p.window, len(keys)
        C = N - w
        real = torch.tensor([t >= self.pads[b] for t in keys])
        group = slice(h * self.G, (h + 1) * self.G)
        if p.observation in ("window", "last"):
            qs = keys[-w:] if p.observation == "window" else keys[-1:]
            S = torch.zeros(N)
            for tq in qs:
                pr = self.probs(b, h, Q[b, group, tq], K, tq, keys)
                if tq < self.pads[b]:  # a pad query sees nothing real: no contribution
                    pr = torch.zeros_like(pr)
                S += pr.max(0).values
            S = (S / len(qs))[:C]
        elif p.observation == "accumulate":
            S = torch.tensor([self.acc[b][h][t] for t in keys[:C]])
        else:
            S = torch.tensor([float(t - self.pads[b]) for t in keys[:C]])
        if p.normalize and S.max() > 0:
            S = S / S.max()
        F = S.clone()
        for i, t in enumerate(keys[:C]):
            if t in self.hist[b][h]:
                prev, a = self.hist[b][h][t], p.alpha
                F[i] = {"max": max(a * prev, S[i]), "mean": a * prev + (1 - a) * S[i],
                        "sum": a * prev + S[i], "none": S[i]}[p.history]
        P = F
        if p.pool_kernel:
            k = p.pool_kernel
            P = torch.nn.functional.max_pool1d(F.view(1, 1, -1), k, 1, k // 2).view(-1)
        score = P
        if p.lam < 1:
            R = self.redundancy(b, h, K, keys, real)[:C]
            if p.normalize and R.max() > 0:
                R = R / R.max()
            score = p.lam * P - (1 - p.lam) * R
        pos = torch.tensor([t - self.pads[b] for t in keys[:C]])
        score = torch.where((pos >= 0) & (pos < p.sinks), float("inf"), score)
        score = torch.where(real[:C], score, float("-inf"))
        return score, F

    def redundancy(self, b, h, K, keys, real):
        idx = [t for t, r in zip(keys, real) if r]
        k = K[b, h, idx]
        kh = k / (k.norm(dim=-1, keepdim=True) + 1e-6)
        c = kh @ kh.T
        c.fill_diagonal_(0)
        n = len(idx)
        raw = c.sum(1)
        for j in range(n):  # the most recent near-copy of key j is not penalised for it
            rows = [i for i in range(n) if c[i, j] > self.p.threshold]
            if rows:
                raw[max(rows)] -= c[max(rows), j]
        R = torch.zeros(len(keys))
        R[real] = torch.softmax(raw / n, 0)
        return R

    def forward(self, Q, K, times, compress, cache_kept):
        """Advances over the new `times`; checks the cache's kept sets after a compression."""
        p = self.p
        B = len(self.pads)
        if self.kept is None:
            self.kept = [[[] for _ in range(self.Hkv)] for _ in range(B)]
            self.hist = [[{} for _ in range(self.Hkv)] for _ in range(B)]
            self.acc = [[{} for _ in range(self.Hkv)] for _ in range(B)]
        for b in range(B):
            for h in range(self.Hkv):
                keys = self.kept[b][h] + list(times)
                if p.observation == "accumulate":
                    acc = self.acc[b][h]
                    for t in times:
                        acc[t] = 0.0
                    for tq in times:
                        if tq < self.pads[b]:
                            continue
                        pr = self.probs(b, h, Q[b, h * self.G:(h + 1) * self.G, tq], K, tq, keys)
                        for t, v in zip(keys, pr.max(0).values.tolist()):
                            acc[t] += v
                if compress and p.budget is not None and len(keys) > p.budget:
                    score, F = self.score(b, h, Q, K, keys)
                    C = len(keys) - p.window
                    ours = cache_kept(b, h)  # the cache's kept time indices
                    ours_cand = [t for t in ours if t in keys[:C]]
                    check_selection(score, keys[:C], ours_cand, p.budget - p.window)
                    assert ours[len(ours_cand):] == keys[C:], "the window is always kept"
                    Fd = dict(zip(keys[:C], F.tolist()))
                    self.hist[b][h] = {t: Fd[t] for t in ours_cand} if p.history != "none" else {}
                    keys = ours
                self.kept[b][h] = keys


def check_selection(score, cands, ours, keep):
    """ours (time indices) must be a best-`keep` subset of cands under score, up to ties."""
    assert len(ours) == keep
    assert ours == sorted(ours)
    s = dict(zip(cands, score.tolist()))
    kept = set(ours)
    dropped = [s[t] for t in cands if t not in kept]
    if not dropped or not kept:
        return
    worst_kept = min(s[t] for t in kept)
    best_dropped = max(dropped)
    assert worst_kept >= best_dropped - TIE * max(1.0, abs(best_dropped)), (
        f"kept a candidate scoring {worst_kept} over one scoring {best_dropped}")


def run_cache(policy, layers=2, prompt=20, steps=45, seed=0, pads=PADS, check=True, chunked=False,
              shape=SHAPE, device="cpu"):
    """Drives a CompressedKVCache with random tensors, one token per decode forward or (chunked) in chunks
    that end at the compression steps; returns (cache, death oracle). On CUDA the cache runs the
    CUDA kernels and is checked against the same fp32 formula."""
    B, Hq, Hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    T = prompt + steps
    Q = torch.randn(layers, B, Hq, T, d, generator=g)
    K = torch.randn(layers, B, Hkv, T, d, generator=g)
    # A few near-copies so the redundancy term has something to find.
    K[:, :, :, 7::9] = K[:, :, :, 3:4] + 0.1 * K[:, :, :, 7::9]
    V = torch.randn(layers, B, Hkv, T, d, generator=g)
    cache = CompressedKVCache(policy, layers, B, Hq, Hkv, d, max_tokens=T, device=device)
    refs = [Reference(policy, pads, Hq, Hkv) for _ in range(layers)]
    ptrs = [(cache.keys(l).data_ptr(), cache.values(l).data_ptr(), cache.positions(l).data_ptr(),
             cache.scores(l).data_ptr()) for l in range(layers)]
    oracle = torch.full((B, layers, Hkv, T), INT32_MAX, dtype=torch.int32)

    mask = torch.ones(B, prompt, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    mask = mask.to(device)
    t0 = 0
    D = policy.divide_length
    f = 0  # index of the next forward
    while f <= steps:
        if f == 0:
            n = prompt
            positions = cache.begin_prefill(mask)
            assert positions.tolist() == ((mask.cumsum(1) - 1).clamp_min(0)).tolist()
        else:
            n = min(((f - 1) // D + 1) * D - f + 1, steps + 1 - f) if chunked else 1
            positions = cache.begin_decode(n)
            assert positions[:, 0].tolist() == [t0 - p for p in pads]
        times = list(range(t0, t0 + n))
        compress = f == 0 or (f + n - 1) % D == 0
        f += 1 if f == 0 else n
        for l in range(layers):
            sl = slice(t0, t0 + n)
            out = cache.attend(l, *(x[l, :, :, sl].to(device) for x in (Q, K, V)))
            assert torch.isfinite(out).all()
        cache.end_forward()
        for l in range(layers):
            pos = cache.positions(l)[:, :, :cache.length].cpu()
            keys, values = cache.keys(l).cpu(), cache.values(l).cpu()

            def cache_kept(b, h, pos=pos, keys=keys):
                # Pads all read -1: find which pad each is by its key.
                out = []
                for i, q in enumerate(pos[b, h].tolist()):
                    if q >= 0:
                        out.append(q + pads[b])
                    else:
                        key = keys[b, h, i]
                        out.append(next(t for t in range(pads[b]) if torch.equal(K[l, b, h, t], key)))
                return out

            before = [[list(r) for r in row] for row in refs[l].kept] if refs[l].kept else None
            if check:
                refs[l].forward(Q[l], K[l], times, compress, cache_kept)
            else:
                refs[l].kept = [[cache_kept(b, h) for h in range(Hkv)] for b in range(B)]
            for b in range(B):
                for h in range(Hkv):
                    kept = refs[l].kept[b][h]
                    assert cache_kept(b, h) == kept
                    assert torch.equal(keys[b, h, :len(kept)], K[l, b, h, kept])
                    assert torch.equal(values[b, h, :len(kept)], V[l, b, h, kept])
                    seen = (before[b][h] if before else []) + times
                    for t in set(seen) - set(kept):
                        if t >= pads[b] and oracle[b, l, h, t - pads[b]] == INT32_MAX:
                            oracle[b, l, h, t - pads[b]] = t0 + n - pads[b]
        t0 += n
    for l in range(layers):
        assert ptrs[l] == (cache.keys(l).data_ptr(), cache.values(l).data_ptr(),
                           cache.positions(l).data_ptr(), cache.scores(l).data_ptr())
    return cache, oracle


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", list(POLICIES))
def test_decisions_equal_dense_formula(name, device):
    policy = POLICIES[name]
    cache, oracle = run_cache(policy, device=device)
    # 20 prompt + 45 steps with D = 8: compressions at forwards 8, 16, ..., 40 (the first one
    # where the cache exceeds 24); memory never grows past budget + D.
    assert cache.capacity == policy.budget + policy.divide_length
    assert cache.length <= cache.capacity
    assert torch.equal(cache.death().cpu(), oracle)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["gkv-max", "rkv", "h2o-accumulate"])
@pytest.mark.parametrize("shape, pads", [((1, 7, 1, 8), [0]), ((3, 8, 4, 8), [0, 19, 3])],
                         ids=["G7", "B3-G2-long-pad"])
def test_other_shapes_and_padding(name, shape, pads, device):
    """GQA group 7 with one KV head; a row whose prompt is a single real token after 19 pads."""
    cache, oracle = run_cache(POLICIES[name], layers=1, shape=shape, pads=pads, device=device)
    assert torch.equal(cache.death().cpu(), oracle)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["gkv-max", "rkv", "h2o-sampled", "h2o-accumulate", "tova"])
def test_chunked_decode_makes_the_same_decisions(name, device):
    """Chunks ending at the compression steps (teacher forcing) against the same formula, and
    the same eviction log as one token per forward."""
    policy = POLICIES[name]
    _, by_token = run_cache(policy, layers=1, device=device)
    cache, oracle = run_cache(policy, layers=1, chunked=True, device=device)
    assert torch.equal(cache.death().cpu(), oracle)
    assert torch.equal(oracle, by_token)


@pytest.mark.parametrize("name", ["gkv-max", "snapkv", "rkv", "h2o-accumulate", "tova"])
def test_prompt_longer_than_budget_is_compressed_at_prefill(name):
    policy = POLICIES[name]
    cache, oracle = run_cache(policy, layers=1, prompt=40, steps=10)
    assert torch.equal(cache.death(), oracle)
    # The prompt exceeds the capacity: the cache never held it whole.
    assert cache.capacity == 32 and cache.length <= 32
    assert (oracle[:, :, :, :40] < INT32_MAX).any()


def test_fullkv_keeps_everything_and_never_compresses():
    cache, oracle = run_cache(policies.FullKV(), layers=1, steps=30, check=False)
    assert cache.capacity == 50 and cache.length == 50
    assert (cache.death() == INT32_MAX).all()


def test_buffers_are_poisoned_past_the_live_length():
    policy = POLICIES["gkv-max"]
    cache, _ = run_cache(policy, layers=1, prompt=20, steps=3, check=False)
    assert cache.length == 23
    assert torch.isnan(cache.keys(0)[:, :, cache.length:]).all()
    assert (cache.positions(0)[:, :, cache.length:] == -1).all()


def test_policy_defaults():
    g = policies.GKV(2048)
    assert (g.budget, g.window, g.divide_length, g.alpha, g.lam, g.history, g.normalize,
            g.pool_kernel) == (2048, 16, 128, 0.8, 0.5, "max", True, 0)
    r = policies.RKV(512)
    assert (r.lam, r.pool_kernel, r.normalize, r.history) == (0.1, 5, False, "none")
    s = policies.SnapKV(512)
    assert (s.pool_kernel, s.lam, s.observation) == (5, 1.0, "window")
    h = policies.H2O(512)
    assert (h.window, h.history, h.alpha, h.normalize) == (1, "sum", 0.8, True)
    assert policies.H2O(512, mode="accumulate").observation == "accumulate"
    assert policies.TOVA(512).observation == "last"
    sl = policies.StreamingLLM(512)
    assert (sl.sinks, sl.window, sl.observation) == (4, 508, "none")
    assert policies.FullKV().budget is None
    assert "gkv" in repr(g)
    assert repr(policies.by_name("G-KV", 2048)) == repr(g)
    assert policies.by_name("rkv", 512, window=8, divide_length=64).window == 8
    # NumPy scalars, as from a sweep's np.arange / np.linspace, are ints and reals like any other.
    assert repr(policies.GKV(np.int64(2048), alpha=np.float32(0.5))) == \
        repr(policies.GKV(2048, alpha=0.5))


@pytest.mark.parametrize("build, match", [
    (lambda: policies.GKV(8, window=16), "budget .* must be >= window"),
    (lambda: policies.GKV(64, lam=2.0), "lambda must be in"),
    (lambda: policies.GKV(64, history="median"), "history must be one of"),
    (lambda: policies.GKV(64, divide_length=0), "divide_length must be >= 1"),
    (lambda: policies.StreamingLLM(4, sinks=4), r"budget \(4\) must be > sinks \(4\)"),
    (lambda: policies.StreamingLLM(4), r"budget \(4\) must be > sinks \(4\)"),  # default sinks
    (lambda: policies.StreamingLLM(64, sinks=-1), r"sinks must be >= 0, got -1"),
    (lambda: policies.H2O(64, mode="decay"), "H2O mode"),
    (lambda: policies.by_name("magic", 64), "unknown policy"),
    (lambda: policies.by_name("gkv"), "needs a budget"),
    (lambda: policies.H2O(64, window=8), "window is for 'accumulate'"),
    (lambda: policies.H2O(64, mode="accumulate", alpha=0.5), "alpha is for 'sampled'"),
    # Wrong types are named too, not answered with the binding's list of signatures.
    (lambda: policies.GKV(2.5), "budget must be an int, got float"),
    (lambda: policies.GKV(64, alpha="0.8"), "alpha must be a real number, got str"),
    (lambda: policies.GKV(64, history=1), "history must be a str"),
    (lambda: policies.StreamingLLM(64, sinks=1.0), "sinks must be an int, got float"),
    (lambda: policies.by_name("rkv", 64, divide_length="8"), "divide_length must be an int"),
])
def test_bad_policies_raise(build, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        build()


def test_bad_policy_fields_raise():
    p = policies.SnapKV(64)
    p.pool_kernel = 4
    with pytest.raises(RuntimeError, match="pool_kernel must be 0 or a positive odd size"):
        p.validate()
    p = policies.H2O(64, mode="accumulate")
    p.history = "max"
    with pytest.raises(RuntimeError, match="carries its own history"):
        CompressedKVCache(p, 1, 1, 2, 1, 8, max_tokens=10)
    with pytest.raises(RuntimeError, match="observation must be one of"):
        p.observation = "future"


def test_a_cpu_cache_past_the_machines_memory_is_refused_by_name():
    """Refused before allocating: under memory overcommit the allocation would succeed and
    filling it would get the process killed (the GPU machine has vm.overcommit_memory = 1)."""
    import os
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    slots = 2 * host // 1024  # FullKV, 2 layers x d = 64 fp32: over 1 KiB of K and V per slot
    with pytest.raises(RuntimeError, match=rf"max_tokens = {slots}\), more than this machine's"):
        CompressedKVCache(policies.FullKV(), 2, 1, 1, 1, 64, max_tokens=slots, eviction_log=False)
    # G-KV holds budget + divide_length slots whatever max_tokens is; its eviction log does not.
    tokens = 2 * host // 8  # 4 bytes per token and layer, 2 layers
    with pytest.raises(RuntimeError, match="with the eviction log\\), more than this machine's"):
        CompressedKVCache(policies.GKV(64), 2, 1, 1, 1, 64, max_tokens=tokens)
    cache = CompressedKVCache(policies.GKV(64), 2, 1, 1, 1, 64, max_tokens=tokens,
                              eviction_log=False)
    assert cache.capacity == 64 + 128


def test_slots_past_the_live_length_stay_empty_after_compressions():
    """A one-token forward attends over decode_span slots, not the live length: every slot past
    the live length must read pos -1 (masked), after compactions too."""
    policy = POLICIES["gkv-max"]
    cache, _ = run_cache(policy, layers=2, steps=45, check=False)
    assert cache.length < cache.capacity
    for layer in range(2):
        assert (cache.positions(layer)[:, :, cache.length:] == -1).all()
    assert cache.decode_span() == cache.capacity


def test_decode_schedule_queries():
    """decode_compresses says which forwards compress; FullKV's span grows in steps of 512."""
    policy = policies.GKV(budget=6, window=2, divide_length=4)
    cache = CompressedKVCache(policy, 1, 1, 2, 1, 8, max_tokens=64)
    cache.begin_prefill(torch.ones(1, 3, dtype=torch.long))
    cache.attend(0, torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    cache.end_forward()
    compressing = []
    for _ in range(12):
        f, n = cache.forwards, cache.length
        compressing.append(cache.decode_compresses(1))
        assert compressing[-1] == (f % 4 == 0 and n + 1 > 6)
        cache.begin_decode(1)
        cache.attend(0, torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        cache.end_forward()
        assert cache.length <= 6 if compressing[-1] else cache.length == n + 1
    assert compressing == [False, False, False, True, False, False, False, True, False, False,
                           False, True]
    full = CompressedKVCache(policies.FullKV(), 1, 1, 2, 1, 8, max_tokens=2000)
    full.begin_prefill(torch.ones(1, 511, dtype=torch.long))
    full.attend(0, torch.randn(1, 2, 511, 8), torch.randn(1, 1, 511, 8), torch.randn(1, 1, 511, 8))
    full.end_forward()
    assert full.decode_span() == 512  # the next token is slot 511
    full.begin_decode(1)
    full.attend(0, torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    full.end_forward()
    assert full.length == 512 and full.decode_span() == 1024
    assert not full.decode_compresses(1)


def test_bad_cache_calls_raise():
    cache = CompressedKVCache(POLICIES["gkv-max"], 2, 2, 4, 2, 16, max_tokens=64)
    with pytest.raises(RuntimeError, match="call begin_prefill or begin_decode first"):
        cache.attend(0, torch.zeros(2, 4, 1, 16), torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    with pytest.raises(RuntimeError, match="holds no prefill; call begin_prefill first"):
        cache.begin_decode(1)
    with pytest.raises(RuntimeError, match="needs at least one real token"):
        cache.begin_prefill(torch.tensor([[1, 1], [0, 0]]))
    cache = CompressedKVCache(POLICIES["gkv-max"], 2, 2, 4, 2, 16, max_tokens=64)
    cache.begin_prefill(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"q must be \[B,Hq,T,d\]"):
        cache.attend(0, torch.zeros(2, 4, 4, 16), torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16))
    with pytest.raises(RuntimeError, match="layer must be in"):
        cache.attend(2, torch.zeros(2, 4, 5, 16), torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16))
    with pytest.raises(RuntimeError, match="must be Float"):
        cache.attend(0, torch.zeros(2, 4, 5, 16, dtype=torch.float64), torch.zeros(2, 2, 5, 16),
                     torch.zeros(2, 2, 5, 16))
    cache.attend(0, torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))
    with pytest.raises(RuntimeError, match="layer 1 did not attend"):
        cache.end_forward()
    with pytest.raises(RuntimeError, match="a forward of 5 tokens is in progress"):
        cache.begin_decode(1)
    cache.attend(1, torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))
    cache.end_forward()
    with pytest.raises(RuntimeError, match="cross a compression step"):
        cache.begin_decode(9)  # forwards 1..9 with D = 8


def test_package_exports():
    assert gkv_ext.Policy is Policy and gkv_ext.CompressedKVCache is CompressedKVCache


def carried_exemptions_hold(cache, policy, layer=0):
    """The exemptions the cache carries to its next compression (where not -2: evicted) are
    those of its first carried_length slots among themselves."""
    M = cache.carried_length
    assert M == policy.budget
    carried = cache.exemptions(layer)[:, :, :M].cpu()
    keys, pos = cache.keys(layer)[:, :, :M].cpu(), cache.positions(layer)[:, :, :M].cpu()
    none = torch.empty(*pos.shape[:2], 0, dtype=torch.int32)
    _, alone = gkv_ext.ops.redundancy_scores_carry(keys, pos, none, policy.threshold)
    known = carried != -2
    assert torch.equal(carried[known], alone[known])
    assert (carried >= 0).any()  # the near-copies were found


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["gkv-max", "rkv", "custom-accumulate"])
def test_carried_exemptions_are_those_among_kept_slots(name, device):
    cache, _ = run_cache(POLICIES[name], layers=1, device=device)
    carried_exemptions_hold(cache, POLICIES[name])


def test_no_exemptions_without_a_redundancy_term():
    cache, _ = run_cache(POLICIES["snapkv"], layers=1)
    assert cache.exemptions(0) is None and cache.carried_length == 0


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gkv-max", "rkv"])
def test_cuda_low_precision_carry_makes_the_cpu_decisions(name, dtype):
    """bf16 / fp16 keys with d = 16 take the tensor-core redundancy pass, which carries the
    exemptions between compressions: same eviction log and exemptions as the CPU cache (which
    scans every row), over a prefill compression and many later ones."""
    policy = POLICIES[name]
    B, Hq, Hkv, d = 2, 4, 2, 16
    prompt, steps = 40, 90
    g = torch.Generator().manual_seed(11)
    Q, K, V = (torch.randn(B, h, prompt + steps, d, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    K[:, :, 7::9] = (K[:, :, 3:4].float() + 0.1 * K[:, :, 7::9].float()).to(dtype)
    caches = [CompressedKVCache(policy, 1, B, Hq, Hkv, d, max_tokens=prompt + steps, dtype=dtype,
                                device=dev) for dev in ("cpu", "cuda")]
    for cache in caches:
        dev = cache.keys(0).device
        mask = torch.ones(B, prompt, dtype=torch.long, device=dev)
        mask[1, :5] = 0
        cache.begin_prefill(mask)
        cache.attend(0, *(x[:, :, :prompt].to(dev) for x in (Q, K, V)))
        cache.end_forward()
        for t in range(prompt, prompt + steps):
            cache.begin_decode(1)
            cache.attend(0, *(x[:, :, t:t + 1].to(dev) for x in (Q, K, V)))
            cache.end_forward()
    cpu, cuda = caches
    assert torch.equal(cuda.death().cpu(), cpu.death())
    M = cpu.carried_length
    assert torch.equal(cuda.exemptions(0)[:, :, :M].cpu(), cpu.exemptions(0)[:, :, :M])
    carried_exemptions_hold(cuda, policy)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name", ["gkv-max", "tova"])
@pytest.mark.parametrize("prompt", [1, 22, 23])
@pytest.mark.parametrize("chunked", [False, True])
def test_query_ring_at_any_prompt_length(name, prompt, chunked, device):
    """The query ring is shifted by the prompt length so that compressions find the window in
    order (no roll); other prompt lengths than the rest of this file's, a one-token prompt too."""
    pads = [0, 0] if prompt == 1 else PADS
    cache, oracle = run_cache(POLICIES[name], layers=1, prompt=prompt, pads=pads, chunked=chunked,
                              device=device)
    assert torch.equal(cache.death().cpu(), oracle)
