"""The generation engine (csrc/engine) end to end on tiny random transformers models and stories260K.

- FullKV greedy generation equals transformers' generate token for token (Llama, Qwen2, Qwen3;
  one prompt and a left-padded batch), and its log-probs equal transformers' scores.
- Every policy with a budget >= the total length equals FullKV.
- Teacher-forced chunks make the same eviction decisions (and log-probs) as generation.
- Sampling is reproducible by seed and respects top-k; EOS / stop tokens freeze rows.
- stories260K continues the reference prompt with the DATA.md text (skipped when absent).
- Bad arguments raise errors that name them.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gkv_ext
from gkv_ext import Tokenizer, generate, load_model, policies, teacher_forced

from conftest import requires_cuda, shared_dir

transformers = pytest.importorskip("transformers")
from hf_models import random_hf  # noqa: E402  (needs transformers)

INT32_MAX = 2**31 - 1
STORIES = shared_dir() / "models" / "stories260k"
requires_stories = pytest.mark.skipif(
    not (STORIES / "tinystories_260k_v1.bin").exists() or not (STORIES / "tok512.bin").exists(),
    reason=f"stories260K not found at {STORIES} (see ../shared/DATA.md)")

CONFIGS = {
    "llama": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
}
PROMPTS = [[5, 17, 33, 2 + 1, 60, 8, 41, 12, 90, 7, 3], [44, 9, 71], [11, 22, 33, 44, 55, 66, 77]]
ALL_POLICIES = ["gkv", "snapkv", "rkv", "h2o", "h2o-accumulate", "tova", "streamingllm"]


def make_policy(name, budget, window=4, divide_length=8):
    if name == "h2o-accumulate":
        return policies.H2O(budget, mode="accumulate", window=window, divide_length=divide_length)
    if name == "h2o":
        return policies.H2O(budget, divide_length=divide_length)
    if name == "streamingllm":
        return policies.StreamingLLM(budget, divide_length=divide_length)
    return policies.by_name(name, budget, window=window, divide_length=divide_length)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (transformers model, our model), random weights of a visible size."""
    out = {}
    for name, config in CONFIGS.items():
        hf = random_hf(*config)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path, safe_serialization=True)
        out[name] = (hf, load_model(path))
    return out


def hf_greedy(hf, prompts, n):
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
    logprobs = torch.stack(out.scores, 1).log_softmax(-1)
    tokens = out.sequences[:, P:]
    return tokens, logprobs.gather(2, tokens.unsqueeze(2)).squeeze(2)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [[0], [0, 1, 2]], ids=["one", "left-padded"])
def test_fullkv_greedy_equals_transformers(tiny, name, batch):
    hf, model = tiny[name]
    prompts = [PROMPTS[i] for i in batch]
    ref_tokens, ref_lp = hf_greedy(hf, prompts, 24)
    out = generate(model, prompts, max_new_tokens=24, eos_token_ids=[], pad_token_id=0)
    assert out.tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-4, rtol=1e-4)
    assert out.lengths.tolist() == [24] * len(prompts)
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert (out.death == INT32_MAX).all()


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_budget_above_total_length_equals_fullkv(tiny, policy):
    _, model = tiny["llama"]
    full = generate(model, PROMPTS, max_new_tokens=30, eos_token_ids=[])
    # budget >= prompt + new tokens: compression is tried every D = 8 forwards, never needed.
    out = generate(model, PROMPTS, policy=make_policy(policy, 64), max_new_tokens=30,
                   eos_token_ids=[])
    assert out.tokens.tolist() == full.tokens.tolist()
    torch.testing.assert_close(out.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    assert (out.death == INT32_MAX).all()


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_teacher_forced_equals_generation(tiny, policy):
    _, model = tiny["qwen2"]
    # The first prompt (11 tokens) exceeds budget 10: it is compressed at the prefill too.
    p = make_policy(policy, 10 if policy != "streamingllm" else 12)
    gen = generate(model, PROMPTS, policy=p, max_new_tokens=40, eos_token_ids=[])
    assert (gen.death < INT32_MAX).any()
    logprobs, death = teacher_forced(model, PROMPTS, gen.tokens, policy=p)
    assert torch.equal(death, gen.death)
    torch.testing.assert_close(logprobs, gen.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["gkv", "snapkv", "h2o-accumulate", "streamingllm"])
def test_death_log_replays_the_rollout_in_lifetime_attention(tiny, policy):
    """A training forward of prompt + generated tokens in which key j is visible to query i iff
    j <= i < death[j] (gkv_ext.ops.lifetime_attention inside transformers' own model) gives the
    rollout's log-probs: the eviction log is exactly what each query saw."""
    import copy
    hf, model = tiny["llama"]
    death_of_row = {}

    def lifetime(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        death = death_of_row["death"][:, module.layer_idx].contiguous()
        out, _ = gkv_ext.ops.lifetime_attention(query, key, value, death, scaling)
        return out.transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register("gkv_lifetime", lifetime)
    trainer = copy.deepcopy(hf)
    trainer.set_attn_implementation("gkv_lifetime")
    p = make_policy(policy, 10 if policy != "streamingllm" else 12)
    out = generate(model, PROMPTS, policy=p, max_new_tokens=40, eos_token_ids=[])
    assert (out.death < INT32_MAX).any()
    for b, prompt in enumerate(PROMPTS):
        n = len(prompt)
        seq = torch.tensor([prompt + out.tokens[b].tolist()])
        T = seq.shape[1]
        death_of_row["death"] = out.death[b:b + 1, :, :, :T]
        with torch.no_grad():
            logits = trainer(input_ids=seq).logits[0, n - 1:T - 1]
        lp = logits.log_softmax(-1).gather(1, seq[0, n:].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(lp, out.logprobs[b], atol=1e-4, rtol=1e-4)


def test_compression_changes_generation_but_stays_finite(tiny):
    _, model = tiny["qwen3"]
    full = generate(model, PROMPTS, max_new_tokens=40, eos_token_ids=[])
    out = generate(model, PROMPTS, policy=policies.GKV(8, window=4, divide_length=4),
                   max_new_tokens=40, eos_token_ids=[])
    assert torch.isfinite(out.logprobs).all()
    assert out.tokens.tolist() != full.tokens.tolist()
    # KV memory is flat in the generated length: budget + D slots, whatever max_new_tokens is.
    assert full.kv_slots == max(map(len, PROMPTS)) + 40
    assert out.kv_slots == 8 + 4
    longer = generate(model, PROMPTS, policy=policies.GKV(8, window=4, divide_length=4),
                      max_new_tokens=120, eos_token_ids=[])
    assert longer.kv_slots == 12 and longer.tokens[:, :40].tolist() == out.tokens.tolist()
    # Every evicted position of row b died at a position it had reached.
    L = model.config.num_layers
    for b, n in enumerate(out.prompt_lengths.tolist()):
        d = out.death[b]
        died = d[d < INT32_MAX]
        assert died.numel() > 0 and int(died.max()) <= n + 40 and int(died.min()) >= 1
        assert d.shape[0] == L


@pytest.mark.parametrize("policy", ["gkv", "h2o-accumulate"])
def test_bf16_model_generates_under_compression(tiny, tmp_path, policy):
    hf, _ = tiny["qwen3"]
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    p = make_policy(policy, 10)
    out = generate(model, PROMPTS, policy=p, max_new_tokens=30, eos_token_ids=[])
    assert torch.isfinite(out.logprobs).all() and (out.death < INT32_MAX).any()
    logprobs, death = teacher_forced(model, PROMPTS, out.tokens, policy=p)
    assert torch.isfinite(logprobs).all() and death.shape == out.death.shape


def test_load_model_takes_dtype_names(tiny, tmp_path):
    hf, _ = tiny["qwen3"]
    hf.save_pretrained(tmp_path, safe_serialization=True)
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                        ("float32", torch.float32)]:
        assert load_model(tmp_path, dtype=name).dtype == dtype
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        load_model(tmp_path, dtype="fp8")
    with pytest.raises(RuntimeError, match=r"unsupported model dtype Int \(float32, bfloat16"):
        load_model(tmp_path, dtype=torch.int32)


def test_load_model_names_a_cuda_device_that_is_not_there(tiny, tmp_path):
    """A CUDA device the machine lacks is named (it was a page of dispatcher backends)."""
    hf, _ = tiny["qwen3"]
    hf.save_pretrained(tmp_path, safe_serialization=True)
    gpus = torch.cuda.device_count()
    message = (rf"device cuda:{gpus}, but there are {gpus} CUDA devices" if gpus else
               rf"device cuda:{gpus}, but no CUDA device is available")
    with pytest.raises(RuntimeError, match=message):
        load_model(tmp_path, device=f"cuda:{gpus}")


def on_device(model, device, dtype=None):
    """The same weights as a new model on `device` (Model.from_tensors over its state_dict)."""
    tensors = {k: v.to(device) for k, v in model.state_dict().items()}
    out = gkv_ext.Model.from_tensors(model.config, tensors)
    if dtype is not None:
        out.to(dtype=dtype)
    return out


DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["gkv", "h2o-accumulate", "streamingllm"])
def test_stepping_the_model_through_a_cache_equals_generate(tiny, policy, device):
    """Model.forward(..., cache=) one forward at a time (the streaming API) makes the same tokens
    and evictions as the engine's own loop."""
    _, model = tiny["llama"]
    model = on_device(model, device)
    p = make_policy(policy, 10 if policy != "streamingllm" else 12)
    out = generate(model, PROMPTS, policy=p, max_new_tokens=25, eos_token_ids=[], pad_token_id=0)
    c = model.config
    P = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (P - len(r)) + r for r in PROMPTS], device=device)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in PROMPTS], device=device)
    cache = gkv_ext.CompressedKVCache(p, c.num_layers, len(PROMPTS), c.num_heads, c.num_kv_heads,
                                      c.head_dim, max_tokens=P + 25, device=device)
    logits = model(tokens, cache.begin_prefill(mask), cache=cache, last_only=True)
    steps = []
    for _ in range(25):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(nxt)
        logits = model(nxt, cache.begin_decode(1), cache=cache)
    assert torch.cat(steps, 1).tolist() == out.tokens.tolist()
    # The last forward (never run by generate) evicts nothing new at forward 25 (not a multiple
    # of D = 8), so the logs agree.
    assert torch.equal(cache.death(), out.death)


@requires_cuda
@pytest.mark.parametrize("policy", ["fullkv"] + ALL_POLICIES)
def test_cuda_generation_equals_cpu(tiny, policy):
    """fp32 on the GPU (the CUDA kernels) makes the CPU engine's tokens and eviction decisions."""
    for name in CONFIGS:
        _, model = tiny[name]
        p = policies.FullKV() if policy == "fullkv" else make_policy(policy, 10 if policy != "streamingllm" else 12)
        cpu = generate(model, PROMPTS, policy=p, max_new_tokens=40, eos_token_ids=[])
        gpu = generate(on_device(model, "cuda"), PROMPTS, policy=p, max_new_tokens=40, eos_token_ids=[])
        assert gpu.tokens.tolist() == cpu.tokens.tolist(), name
        assert torch.equal(gpu.death.cpu(), cpu.death), name
        torch.testing.assert_close(gpu.logprobs.cpu(), cpu.logprobs, atol=1e-4, rtol=1e-4)
        logprobs, death = teacher_forced(on_device(model, "cuda"), PROMPTS, gpu.tokens, policy=p)
        assert torch.equal(death, gpu.death), name
        torch.testing.assert_close(logprobs, gpu.logprobs, atol=1e-4, rtol=1e-4)


# The decoder's projections on ATen's linear (cuBLAS) and, switched, on gkv::decode_linear.
PROJECTIONS = pytest.mark.parametrize("decode_linear", [False, True],
                                      ids=["aten-linear", "decode-linear"])


@requires_cuda
@PROJECTIONS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["fullkv"] + ALL_POLICIES)
def test_cuda_graph_decode_equals_eager_bit_for_bit(tiny, policy, dtype, decode_linear):
    """Replaying the captured decode step gives exactly the eager steps' tokens, log-probs and
    evictions (the same kernels with the same arguments), with sampling, across compressions and,
    for FullKV, across a change of attention span (a new capture every 512 slots)."""
    _, model = tiny["qwen3"]
    model = on_device(model, "cuda", dtype)
    p = policies.FullKV() if policy == "fullkv" else make_policy(policy, 10 if policy != "streamingllm" else 12)
    kw = dict(policy=p, max_new_tokens=600 if policy == "fullkv" else 100, eos_token_ids=[],
              temperature=1.0, top_k=20, seed=7)
    with gkv_ext.switches(decode_linear=decode_linear):
        graph = generate(model, PROMPTS, cuda_graph=True, **kw)
        eager = generate(model, PROMPTS, cuda_graph=False, **kw)
    assert torch.equal(graph.tokens, eager.tokens)
    assert torch.equal(graph.logprobs, eager.logprobs)
    assert torch.equal(graph.death, eager.death)


def prefilled(model, policy, max_new_tokens):
    """A cache for PROMPTS on the model's device, prefilled: (cache, last logits [B,V])."""
    c, device = model.config, str(model.device)
    P = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (P - len(r)) + r for r in PROMPTS], device=device)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in PROMPTS], device=device)
    cache = gkv_ext.CompressedKVCache(policy, c.num_layers, len(PROMPTS), c.num_heads,
                                      c.num_kv_heads, c.head_dim, max_tokens=P + max_new_tokens,
                                      device=device)
    return cache, model(tokens, cache.begin_prefill(mask), cache=cache, last_only=True)[:, -1]


def test_decode_stepper_refuses_bad_ids_and_steps_on(tiny):
    """A token id outside the vocabulary is refused before the step begins: the cache is not
    left mid-forward (every later step used to fail), and the next good step equals a stepper
    that never saw the bad one."""
    _, model = tiny["llama"]
    p = make_policy("gkv", 10)
    ref_cache, _ = prefilled(model, p, 8)
    cache, _ = prefilled(model, p, 8)
    ref, stepper = gkv_ext.DecodeStepper(model, ref_cache), gkv_ext.DecodeStepper(model, cache)
    good = torch.tensor([3] * len(PROMPTS))
    for bad in (model.config.vocab_size, -1):
        with pytest.raises(RuntimeError, match=r"DecodeStepper::step: token ids must lie in \[0, "):
            stepper.step(good.clone().fill_(bad))
    for _ in range(3):
        assert torch.equal(stepper.step(good), ref.step(good))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_stepper_replays_every_step_after_the_first(tiny, device):
    """DecodeStepper equals stepping Model.forward through the cache; on CUDA every step but the
    first (a warm-up on the capture stream) is a graph replay, the compressing ones included
    (they compress after the replay), and every compression but the first (eager, a warm-up) is
    replayed from a second graph."""
    _, model = tiny["llama"]
    model = on_device(model, device)
    p = make_policy("gkv", 10)
    ref_cache, ref = prefilled(model, p, 40)
    step_cache, out = prefilled(model, p, 40)
    stepper = gkv_ext.DecodeStepper(model, step_cache)
    compressing = 0
    for _ in range(40):
        nxt = ref.argmax(-1)
        compressing += step_cache.decode_compresses(1)
        ref = model(nxt[:, None], ref_cache.begin_decode(1), cache=ref_cache)[:, -1]
        out = stepper.step(nxt)
        assert torch.equal(out, ref)
    assert torch.equal(step_cache.death(), ref_cache.death())
    assert compressing == 5
    assert stepper.replays == (40 - 1 if device == "cuda" else 0)
    assert stepper.compression_replays == (compressing - 1 if device == "cuda" else 0)
    with pytest.raises(RuntimeError, match=r"tokens must be \[B\] int64 with B = 3"):
        stepper.step(torch.zeros(2, dtype=torch.long, device=device))


@requires_cuda
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("policy", ["gkv", "h2o-accumulate", "streamingllm"])
def test_cuda_decode_steps_never_wait_for_the_gpu(tiny, policy, cuda_graph):
    """A decode step, compressing or not, replayed or eager, never syncs with the host (the
    engine's contract: syncs only where sampling or stopping needs them). torch's sync debug
    mode turns any wait into an error; the steps before it include the captures."""
    _, model = tiny["llama"]
    model = on_device(model, "cuda")
    cache, logits = prefilled(model, make_policy(policy, 10), 60)
    stepper = gkv_ext.DecodeStepper(model, cache, cuda_graph)
    for _ in range(20):  # two compressions (D = 8): both graphs captured
        logits = stepper.step(logits.argmax(-1))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(40):  # five more compressions
            logits = stepper.step(logits.argmax(-1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()
    assert stepper.replays == (60 - 1 if cuda_graph else 0)


@requires_cuda
def test_out_of_memory_while_capturing_leaves_the_device_usable(tiny):
    """An allocation that fails while a step is being captured ends the capture before the error
    propagates. A stream left capturing made every later cudaMalloc on the device fail, so a
    batch search that catches the error and tries a smaller batch could not go on."""
    _, model = tiny["llama"]
    model = on_device(model, "cuda")
    cache, logits = prefilled(model, policies.FullKV(), 4)  # FullKV: no step compresses
    stepper = gkv_ext.DecodeStepper(model, cache)
    logits = stepper.step(logits.argmax(-1))  # the warm-up, eager; the next step is captured
    torch.cuda.synchronize()
    # The capture allocates from a new private pool, so its first allocation needs a new segment;
    # with cached segments left, the allocator would free them to make room under the cap.
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(model.device).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**20) / total)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            stepper.step(logits.argmax(-1))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert stepper.replays == 0
    torch.cuda.empty_cache()
    assert torch.ones(2**24, device="cuda").sum().item() == 2**24  # a new cudaMalloc
    torch.cuda.synchronize()


@requires_cuda
@PROJECTIONS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_generation_stays_close_to_fp32(tiny, dtype, decode_linear):
    """bf16 / fp16 on the GPU: finite, mostly the fp32 greedy tokens, and flat KV memory."""
    _, model = tiny["qwen2"]
    p = make_policy("gkv", 10)
    ref = generate(model, PROMPTS, policy=p, max_new_tokens=30, eos_token_ids=[])
    with gkv_ext.switches(decode_linear=decode_linear):
        out = generate(on_device(model, "cuda", dtype), PROMPTS, policy=p, max_new_tokens=30,
                       eos_token_ids=[])
    assert torch.isfinite(out.logprobs).all()
    # Greedy paths may part after a near-tie; the first tokens agree.
    assert out.tokens[:, :3].tolist() == ref.tokens[:, :3].tolist()
    assert out.kv_slots == 10 + 8


def test_sampling_is_seeded_and_respects_top_k(tiny):
    _, model = tiny["llama"]
    kw = dict(max_new_tokens=20, temperature=1.0, eos_token_ids=[])
    a = generate(model, PROMPTS, seed=3, **kw)
    b = generate(model, PROMPTS, seed=3, **kw)
    c = generate(model, PROMPTS, seed=4, **kw)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != c.tokens.tolist()
    greedy = generate(model, PROMPTS, max_new_tokens=20, eos_token_ids=[])
    top1 = generate(model, PROMPTS, seed=5, top_k=1, **kw)
    assert top1.tokens.tolist() == greedy.tokens.tolist()
    tiny_p = generate(model, PROMPTS, seed=5, top_p=1e-6, **kw)
    assert tiny_p.tokens.tolist() == greedy.tokens.tolist()


def test_eos_and_stop_tokens_freeze_rows(tiny):
    _, model = tiny["llama"]
    free = generate(model, PROMPTS, max_new_tokens=12, eos_token_ids=[])
    stop = free.tokens[0, 3].item()  # row 0 stops at its 4th token (or earlier)
    out = generate(model, PROMPTS, max_new_tokens=12, eos_token_ids=[], stop_token_ids=[stop],
                   pad_token_id=96)
    for b in range(len(PROMPTS)):
        row = free.tokens[b].tolist()
        n = row.index(stop) + 1 if stop in row else 12
        assert out.lengths[b] == n
        assert out.tokens[b, :n].tolist() == row[:n]
        assert out.tokens[b, n:].tolist() == [96] * (out.tokens.shape[1] - n)
        assert (out.logprobs[b, n:] == 0).all()
    # All rows stopping at once ends generation early.
    early = generate(model, [PROMPTS[0]], max_new_tokens=12, eos_token_ids=[stop])
    assert early.tokens.shape[1] == early.lengths[0] <= 4
    assert early.sequences == [free.tokens[0, :early.lengths[0]].tolist()]


BAD_VALUES = [  # the C++ side's RuntimeError
    (dict(prompts=[[]]), r"prompts\[0\] is empty"),
    (dict(prompts=[[1, 500]]), r"prompts\[0\] holds token id 500"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2**31 - 11), r"max_new_tokens \(2147483637\) plus the padded prompt "
                                      r"length \(11\) must be at most 2\^31 - 1"),
    (dict(temperature=-1.0), r"temperature must be finite and >= 0 \(0: greedy\), got -1"),
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1, temperature=1.0), "top_k must be >= 0"),
    (dict(pad_token_id=97), "pad_token_id 97 is outside the vocabulary"),
    # The default pad id is the first EOS id: the error names what the caller gave.
    (dict(eos_token_ids=[10**9]), "eos_token_ids holds token id 1000000000, outside the vocab"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids holds token id -1, outside the vocabulary"),
]
BAD_TYPES = [  # Python's TypeError naming the argument, not the binding's list of signatures
    (dict(prompts=[[1, [2]]]), r"prompts\[0\]\[1\] must be an int, got list"),
    (dict(prompts=[1.0, 2.0]), r"prompts\[0\] must be an int, got float"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int, got float"),
    (dict(top_k="3"), "top_k must be an int, got str"),
    (dict(eos_token_ids="2"), r"eos_token_ids must be a list of token ids \(ints\), got str"),
    (dict(stop_token_ids=[3, None]), r"stop_token_ids\[1\] must be an int, got NoneType"),
    (dict(pad_token_id=0.0), "pad_token_id must be an int, got float"),
]


@pytest.mark.parametrize("kwargs, error, match",
                         [(k, RuntimeError, m) for k, m in BAD_VALUES] +
                         [(k, TypeError, m) for k, m in BAD_TYPES])
def test_bad_generate_arguments_raise(tiny, kwargs, error, match):
    _, model = tiny["llama"]
    args = dict(prompts=PROMPTS, max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(model, **args)


def test_token_ids_may_be_numpy_or_tensor_integers(tiny):
    _, model = tiny["llama"]
    ref = generate(model, PROMPTS, max_new_tokens=4).tokens
    mixed = [np.array(PROMPTS[0]), torch.tensor(PROMPTS[1])] + PROMPTS[2:]
    assert torch.equal(generate(model, mixed, max_new_tokens=4).tokens, ref)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_outside_64_bits_is_refused_by_name(tiny, seed):
    _, model = tiny["llama"]
    with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*64\), got {seed}$"):
        generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, seed=seed)


def test_policy_of_another_type_is_refused_by_name(tiny):
    _, model = tiny["llama"]
    tokens = torch.zeros(len(PROMPTS), 2, dtype=torch.long)
    for call in (lambda: generate(model, PROMPTS, policy="gkv", max_new_tokens=2),
                 lambda: teacher_forced(model, PROMPTS, tokens, policy="gkv")):
        with pytest.raises(TypeError, match="policy must be a gkv_ext.policies policy .* got str"):
            call()


def test_teacher_forced_takes_token_lists_as_a_tensor(tiny):
    _, model = tiny["llama"]
    policy = make_policy("gkv", 10)
    tokens = torch.randint(0, 50, (len(PROMPTS), 14), generator=torch.Generator().manual_seed(3))
    as_tensor = teacher_forced(model, PROMPTS, tokens, policy=policy)
    as_lists = teacher_forced(model, PROMPTS, tokens.tolist(), policy=policy)
    assert all(torch.equal(a, b) for a, b in zip(as_tensor, as_lists))


def test_bad_teacher_forced_arguments_raise(tiny):
    _, model = tiny["llama"]
    with pytest.raises(RuntimeError, match=r"tokens must be \[B,T\] int64 with B = 3"):
        teacher_forced(model, PROMPTS, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="token ids must lie in"):
        teacher_forced(model, PROMPTS, torch.full((3, 4), 97))
    with pytest.raises(RuntimeError, match="pad_token_id 97 is outside the vocabulary"):
        teacher_forced(model, PROMPTS, torch.zeros(3, 4, dtype=torch.long), pad_token_id=97)


@requires_stories
def test_stories260k_greedy_continuation():
    model = load_model(STORIES / "tinystories_260k_v1.bin")
    tok = Tokenizer.load(str(STORIES / "tok512.bin"))
    prompt = tok.encode("Once upon a time, there was a little", bos=True)
    out = generate(model, prompt, max_new_tokens=16)
    assert tok.decode(out.sequences[0]).startswith("girl named Lily. She loved to play outside")
    # A budget above the total length changes nothing; G-KV at a small budget still runs.
    same = generate(model, prompt, policy=policies.GKV(64, divide_length=16), max_new_tokens=16)
    assert same.tokens.tolist() == out.tokens.tolist()
    small = generate(model, prompt, policy=policies.GKV(24, window=8, divide_length=8),
                     max_new_tokens=48)
    assert (small.death < INT32_MAX).any() and torch.isfinite(small.logprobs).all()


@requires_stories
def test_cli_generates_text(capsys):
    from gkv_ext.__main__ import main
    assert main(["generate", "--model", str(STORIES / "tinystories_260k_v1.bin"), "--prompt",
                 "Once upon a time, there was a little", "--policy", "gkv", "--budget", "64",
                 "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("girl named Lily.")
    # 10 prompt tokens + 8 fit below budget 64: the cache holds them all, and no more.
    assert re.fullmatch(r"8 tokens in [\d.]+ s \([\d.]+ tokens/s\); KV cache of 18 slots per "
                        r"layer and KV head, for 18 tokens\n", captured.err), captured.err
    assert main(["generate", "--model", str(STORIES / "tinystories_260k_v1.bin"), "--prompt",
                 "Once", "--policy", "h2o-accumulate", "--budget", "4", "--window", "8"]) == 2
    assert "budget (4) must be >= window (8)" in capsys.readouterr().err


def test_cli_missing_model_says_so(capsys):
    from gkv_ext.__main__ import main
    assert main(["generate", "--model", "/nonexistent/model", "--prompt", "Once"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: /nonexistent/model does not exist (a model directory or a llama2.ts .bin file)"]


QWEN3_TOKENIZER = shared_dir() / "tokenizers" / "qwen3"


@pytest.mark.skipif(not (QWEN3_TOKENIZER / "tokenizer.json").exists(),
                    reason=f"the Qwen3 tokenizer is not at {QWEN3_TOKENIZER}")
def test_cli_uses_the_checkpoint_tokenizer(tmp_path, capsys):
    import shutil
    from gkv_ext.__main__ import main
    config = transformers.Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      vocab_size=151680, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for f in QWEN3_TOKENIZER.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    model = load_model(tmp_path)
    prompt = "The answer is"
    ref = generate(model, tok(prompt)["input_ids"], policy=policies.GKV(16, window=4),
                   max_new_tokens=5, eos_token_ids=[])
    assert main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--policy", "gkv",
                 "--budget", "16", "--window", "4", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    n = ref.lengths[0]
    assert printed == tok.decode(ref.tokens[0, :n].tolist(), skip_special_tokens=True)


STREAMED_TEXTS = {  # what each tokenizer can spell, with characters of several bytes or tokens
    "bundled": (Path(gkv_ext.__file__).parent / "data" / "bundled" / "tokenizer",
                "a=3 b=a+4 b? 7 " * 12),
    "stories260k": (STORIES / "tinystories_260k_v1.bin",
                    "Once upon a time, Lily said: \"naïve café — 你好!\"\nThe end. " * 6),
    "qwen3": (QWEN3_TOKENIZER, "The answer is 42 — 你好，世界! ∑ x² 🙂\n\n" * 6),
}


@pytest.mark.parametrize("name", list(STREAMED_TEXTS))
def test_cli_stream_prints_the_text_decoding_a_few_ids_a_step(name, capsys):
    """The generate CLI's stream prints, token by token, exactly the text decoded at the end,
    and never decodes more than a few ids at a step (it used to decode the whole row)."""
    from gkv_ext import tasks
    from gkv_ext.__main__ import _TextStream
    path, text = STREAMED_TEXTS[name]
    if not path.exists():
        pytest.skip(f"{path} is not there")
    tok = tasks.load_tokenizer(path)
    ids = tok.encode(text, special=False)
    longest = 0

    class CountingTokenizer:
        def decode(self, some):
            nonlocal longest
            longest = max(longest, len(some))
            return tok.decode(some)

    stream = _TextStream(CountingTokenizer())
    for step, token in enumerate(ids):
        stream(step, [token])
    streamed = capsys.readouterr().out
    stream.finish(tok.decode(ids))
    assert streamed + capsys.readouterr().out == tok.decode(ids) + "\n"
    assert len(ids) > 60 and longest <= 8, (len(ids), longest)


def test_text_prompts_go_through_the_tokenizer():
    """Text prompts (alone or beside token ids) are encoded by tokenizer=, give the tokens of
    their ids, and come back decoded in texts; without a tokenizer a text is refused by name."""
    from gkv_ext import tasks
    bundled = Path(gkv_ext.__file__).parent / "data" / "bundled"
    tok = tasks.load_tokenizer(bundled / "tokenizer")
    model = load_model(bundled)
    texts = ["a=3 b=a+4 b?", "x=1 y=x+x y?"]
    kw = dict(policy=policies.GKV(16, window=4, divide_length=8), max_new_tokens=10,
              eos_token_ids=[])
    ids = [tok.encode(t) for t in texts]
    ref = generate(model, ids, **kw)
    assert ref.texts is None
    out = generate(model, [texts[0], ids[1]], tokenizer=tok, **kw)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.death, ref.death)
    assert out.texts == [tok.decode(s) for s in ref.sequences]
    one = generate(model, texts[1], tokenizer=tok, **kw)
    assert one.tokens.tolist() == generate(model, ids[1], **kw).tokens.tolist()
    logprobs, death = teacher_forced(model, texts, ref.tokens, policy=kw["policy"], tokenizer=tok)
    assert torch.equal(death, ref.death)
    with pytest.raises(ValueError, match="a text prompt needs tokenizer="):
        generate(model, texts, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_generation_without_the_eviction_log(tiny, device):
    """eviction_log=False: the same tokens and log-probs (compressions, and on CUDA their graph
    replays, included), no log returned (by generate or teacher_forced), and a cache made so
    refuses death() by name."""
    model = on_device(tiny["llama"][1], device)
    kw = dict(policy=make_policy("gkv", 10), max_new_tokens=40, eos_token_ids=[])
    with_log = generate(model, PROMPTS, **kw)
    without = generate(model, PROMPTS, eviction_log=False, **kw)
    assert torch.equal(without.tokens, with_log.tokens)
    assert torch.equal(without.logprobs, with_log.logprobs)
    assert without.death is None and (with_log.death < INT32_MAX).any()
    forced, death = teacher_forced(model, PROMPTS, with_log.tokens, policy=kw["policy"],
                                   eviction_log=False)
    assert death is None
    assert torch.equal(forced, teacher_forced(model, PROMPTS, with_log.tokens,
                                              policy=kw["policy"])[0])
    c = model.config
    cache = gkv_ext.CompressedKVCache(kw["policy"], c.num_layers, 1, c.num_heads, c.num_kv_heads,
                                      c.head_dim, max_tokens=64, device=device, eviction_log=False)
    assert not cache.keeps_eviction_log
    with pytest.raises(RuntimeError, match="this cache keeps no eviction log"):
        cache.death()


@pytest.mark.parametrize("device", DEVICES)
def test_on_token_streams_every_step_and_can_stop(tiny, device, capsys):
    """on_token sees each step's tokens in order (pad in finished rows), the same as the result;
    returning False ends the generation after that step (on CUDA, out of graph replays too); its
    exception reaches the caller. progress=True counts the steps on a tqdm bar beside it."""
    model = on_device(tiny["qwen2"][1], device)
    kw = dict(policy=make_policy("gkv", 10), max_new_tokens=20, eos_token_ids=[5], pad_token_id=0)
    seen = []
    out = generate(model, PROMPTS, on_token=lambda step, tokens: seen.append((step, tokens)), **kw)
    assert [s for s, _ in seen] == list(range(out.tokens.shape[1]))
    assert torch.equal(torch.tensor([t for _, t in seen]).T, out.tokens.cpu())
    assert torch.equal(out.tokens, generate(model, PROMPTS, **kw).tokens)
    stopped = generate(model, PROMPTS, on_token=lambda step, tokens: step < 3, **kw)
    assert torch.equal(stopped.tokens, out.tokens[:, :4])
    assert stopped.lengths.tolist() == [min(4, n) for n in out.lengths.tolist()]
    capsys.readouterr()
    with_bar = generate(model, PROMPTS, on_token=lambda step, tokens: step < 3, progress=True, **kw)
    assert torch.equal(with_bar.tokens, stopped.tokens)
    assert re.search(r"gkv_ext\.generate: +20%\|.*\| 4/20 ", capsys.readouterr().err)

    def fail(step, tokens):
        raise KeyError("from the callback")
    with pytest.raises(KeyError, match="from the callback"):
        generate(model, PROMPTS, on_token=fail, **kw)


def test_decode_linear_switch_routes_the_decode_steps_projections(tiny):
    """The decode_linear switch (on by default) sends the decoder's projections of at most 16
    rows, a decode step's, through gkv::decode_linear (the profiler sees the op) and leaves the
    prefill's on ATen's linear, with the same result (the op's CPU kernel is ATen's linear);
    switched off, none goes through it."""
    _, model = tiny["llama"]

    def run(prompts):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = generate(model, prompts, policy=make_policy("gkv", 10), max_new_tokens=12,
                           eos_token_ids=[])
        return out, sum(e.name == "gkv::decode_linear" for e in prof.events())

    # q/k/v (joint), o, gate/up (joint) and down in each layer.
    per_pass = 4 * model.config.num_layers
    assert gkv_ext.switch_on("decode_linear")
    switched, calls = run(PROMPTS)  # the prefill's 3 x 11 rows stay on ATen's linear
    assert calls == per_pass * 11
    with gkv_ext.switches(decode_linear=False):
        plain, calls = run(PROMPTS)
    assert calls == 0 and gkv_ext.switch_on("decode_linear")
    assert torch.equal(switched.tokens, plain.tokens)
    assert torch.equal(switched.logprobs, plain.logprobs)
    assert torch.equal(switched.death, plain.death)
    _, calls = run(PROMPTS[:1] * 16)  # 16 rows at the decode steps, 176 at the prefill
    assert calls == per_pass * 11
    _, calls = run(PROMPTS[1:2] * 5)  # 15 rows at the prefill too
    assert calls == per_pass * 12
    _, calls = run(PROMPTS[1:2] * 17)
    assert calls == 0


def test_switches_start_from_the_environment_and_reject_unknown_names():
    names = ["chained_launch", "decode_linear", "tuned_linear"]
    code = f"import gkv_ext; print(*(gkv_ext.switch_on(n) for n in {names}))"
    env = dict(os.environ, GKV_CHAINED_LAUNCH="0", GKV_DECODE_LINEAR="0", GKV_TUNED_LINEAR="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False", "True"]  # tuned_linear is the one off by default
    assert [gkv_ext.switch_on(n) for n in names] == [True, True, False]
    unknown = r"unknown switch 'fast' \(chained_launch, decode_linear or tuned_linear\)"
    with pytest.raises(ValueError, match=unknown):
        with gkv_ext.switches(decode_linear=False, fast=True):
            pass
    assert gkv_ext.switch_on("decode_linear")  # nothing was set


def test_package_exports():
    assert gkv_ext.generate is generate and gkv_ext.load_model is load_model
