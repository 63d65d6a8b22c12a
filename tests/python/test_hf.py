"""gkv_ext.hf: compressed-cache generation on transformers' own Llama / Qwen2 / Qwen3 models.

- FullKV equals plain transformers generate token for token (one prompt, a left-padded batch).
- Every policy's greedy output and eviction log equal the native engine's (gkv_ext.generate on
  gkv_ext.load_model of the same weights, fp32), on tiny random models and on stories260K.
- model.generate(past_key_values=CompressedCache(...)) equals gkv_ext.hf.generate.
- A left-padded batch equals each row alone (FullKV and the policies without score history).
- KV memory is bounded: after a long generation the cache holds budget + D slots per layer and
  transformers keeps no tensor of its own.
- Sampling is seeded and respects top-k / top-p; EOS freezes rows; a streamer gets what
  transformers' generate streams.
- Unsupported architectures and bad arguments raise errors naming them.
- CUDA (skipped here): a bf16 run, agreement with the CPU path in fp32, flat peak memory.
"""
import gc

import pytest
import torch

import gkv_ext
from gkv_ext import policies

from conftest import requires_cuda

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("gkv_ext.hf")
from hf_models import HAVE_STORIES, STORIES, STORIES_TOK, random_hf, stories_hf  # noqa: E402

INT32_MAX = 2**31 - 1
requires_stories = pytest.mark.skipif(
    not HAVE_STORIES, reason=f"stories260K not found at {STORIES} (see ../shared/DATA.md)")

CONFIGS = {
    "llama": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                  attention_bias=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
}
PROMPTS = [[5, 17, 33, 3, 60, 8, 41, 12, 90, 7, 3], [44, 9, 71], [11, 22, 33, 44, 55, 66, 77]]
ALL_POLICIES = ["gkv", "snapkv", "rkv", "h2o", "h2o-accumulate", "tova", "streamingllm"]
# Policies whose scores carry no history across compressions. With history (gkv, h2o) a
# left-padded row is also compressed at the forwards where the batch's padded length exceeds the
# budget (the reference schedule: one N for the batch, section 1.5), which updates its history,
# so it may differ from the row alone by design.
HISTORYLESS = ["snapkv", "rkv", "h2o-accumulate", "tova", "streamingllm"]


def make_policy(name, budget=10, window=4, divide_length=8):
    """Budget 10 < the first prompt's 11 tokens: the prefill is compressed too."""
    if name == "fullkv":
        return None
    if name == "h2o-accumulate":
        return policies.H2O(budget, mode="accumulate", window=window, divide_length=divide_length)
    if name == "h2o":
        return policies.H2O(budget, divide_length=divide_length)
    if name == "streamingllm":
        return policies.StreamingLLM(budget + 2, divide_length=divide_length)
    return policies.by_name(name, budget, window=window, divide_length=divide_length)


def left_padded(prompts, pad=0):
    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (transformers model, our native model of the same weights)."""
    out = {}
    for name, (cls_name, extra) in CONFIGS.items():
        model = random_hf(cls_name, extra)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, gkv_ext.load_model(path))
    return out


def plain_generate(model, ids, mask, n, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["one", "left-padded"])
def test_fullkv_equals_plain_transformers_generate(tiny, name, rows):
    model, _ = tiny[name]
    ids, mask = left_padded([PROMPTS[i] for i in rows])
    ref = plain_generate(model, ids, mask, 24)
    assert model.config._attn_implementation == "sdpa"
    out = hf.generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
    assert model.config._attn_implementation == "sdpa"  # restored
    assert out.sequences.tolist() == ref.tolist()
    assert out.lengths.tolist() == [24] * len(rows) and out.eviction_log is None


@pytest.mark.parametrize("policy", ALL_POLICIES + ["fullkv"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_policy_greedy_equals_native_engine(tiny, name, policy):
    model, native = tiny[name]
    ids, mask = left_padded(PROMPTS)
    p = make_policy(policy)
    out = hf.generate(model, ids, mask, policy=p, max_new_tokens=40, eos_token_id=[],
                      return_eviction_log=True)
    ref = gkv_ext.generate(native, PROMPTS, policy=p, max_new_tokens=40, eos_token_ids=[])
    assert out.new_tokens.tolist() == ref.tokens.tolist()
    assert torch.equal(out.eviction_log, ref.death)
    assert (ref.death < INT32_MAX).any() == (policy != "fullkv")


@pytest.mark.parametrize("policy", ["gkv", "streamingllm", "fullkv"])
def test_model_generate_with_compressed_cache_equals_hf_generate(tiny, policy):
    model, _ = tiny["qwen2"]
    ids, mask = left_padded(PROMPTS)
    ours = hf.generate(model, ids, mask, policy=make_policy(policy), max_new_tokens=30,
                       eos_token_id=[], return_eviction_log=True)
    cache = hf.CompressedCache(model, make_policy(policy), max_tokens=ids.shape[1] + 30)
    unlogged = hf.CompressedCache(model, make_policy(policy), max_tokens=ids.shape[1] + 30,
                                  eviction_log=False)
    try:
        assert model.config._attn_implementation == hf.ATTENTION
        out = plain_generate(model, ids, mask, 30, past_key_values=cache,
                             return_dict_in_generate=True)
        out_unlogged = plain_generate(model, ids, mask, 30, past_key_values=unlogged)
    finally:
        model.set_attn_implementation("sdpa")
    assert out.past_key_values is cache
    assert out.sequences.tolist() == ours.sequences.tolist() == out_unlogged.tolist()
    assert torch.equal(cache.eviction_log(), ours.eviction_log)
    with pytest.raises(RuntimeError, match="this cache keeps no eviction log"):
        unlogged.eviction_log()
    if policy == "fullkv":
        assert out.sequences.tolist() == plain_generate(model, ids, mask, 30).tolist()


@pytest.mark.parametrize("policy", ["fullkv"] + HISTORYLESS)
def test_left_padded_batch_equals_each_row_alone(tiny, policy):
    model, _ = tiny["llama"]
    batch = hf.generate(model, *left_padded(PROMPTS), policy=make_policy(policy),
                        max_new_tokens=40, eos_token_id=[])
    for b, prompt in enumerate(PROMPTS):
        alone = hf.generate(model, *left_padded([prompt]), policy=make_policy(policy),
                            max_new_tokens=40, eos_token_id=[])
        assert alone.new_tokens[0].tolist() == batch.new_tokens[b].tolist(), f"row {b}"


def test_kv_memory_is_bounded_whatever_the_length(tiny):
    """After 300 new tokens the only KV tensors are the native buffers of budget + D slots; the
    transformers layers hold none (no hidden full-length copy)."""
    model, _ = tiny["llama"]
    ids, mask = left_padded(PROMPTS)
    c = model.config
    budget, D, d = 16, 8, c.hidden_size // c.num_attention_heads
    slots = {}
    for n in (40, 300):
        cache = hf.CompressedCache(model, policies.GKV(budget, window=4, divide_length=D),
                                   max_tokens=ids.shape[1] + n)
        try:
            out = plain_generate(model, ids, mask, n, past_key_values=cache,
                                 return_dict_in_generate=True)
        finally:
            model.set_attn_implementation("sdpa")
        assert out.sequences.shape[1] == ids.shape[1] + n
        assert all(layer.keys is None and layer.values is None for layer in cache.layers)
        tensors = cache.kv_tensors()
        assert len(tensors) == 2 * c.num_hidden_layers
        for t in tensors:
            assert t.shape == (len(PROMPTS), c.num_key_value_heads, budget + D, d)
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert cache.native.length <= budget + D
        slots[n] = sum(t.untyped_storage().nbytes() for t in tensors)
    assert slots[40] == slots[300]


def test_sampling_is_seeded_and_respects_top_k_and_top_p(tiny):
    model, _ = tiny["qwen3"]
    ids, mask = left_padded(PROMPTS)
    kw = dict(policy=make_policy("gkv"), max_new_tokens=20, eos_token_id=[], do_sample=True)

    def sample(seed, **extra):
        g = torch.Generator().manual_seed(seed)
        return hf.generate(model, ids, mask, generator=g, **kw, **extra).new_tokens.tolist()

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    greedy = hf.generate(model, ids, mask, policy=make_policy("gkv"), max_new_tokens=20,
                         eos_token_id=[]).new_tokens.tolist()
    assert sample(5, top_k=1) == greedy
    assert sample(5, top_p=1e-6) == greedy
    assert sample(5, temperature=1e-4) == greedy


def test_eos_freezes_rows_and_ends_generation(tiny):
    model, _ = tiny["llama"]
    ids, mask = left_padded(PROMPTS)
    free = hf.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    stop = free.new_tokens[0, 3].item()
    out = hf.generate(model, ids, mask, max_new_tokens=12, eos_token_id=stop, pad_token_id=96)
    for b in range(len(PROMPTS)):
        row, n = out.new_tokens[b].tolist(), out.lengths[b].item()
        assert row[:n] == free.new_tokens[b, :n].tolist()
        if stop in free.new_tokens[b].tolist():
            assert row[n - 1] == stop and free.new_tokens[b].tolist().index(stop) == n - 1
            assert all(t == 96 for t in row[n:])
        else:
            assert n == 12
    # Every row stops at once: generation ends early, the rest is padding.
    first = free.new_tokens[:, 0].tolist()
    done = hf.generate(model, ids, mask, max_new_tokens=200, eos_token_id=first, pad_token_id=96,
                       progress=True)
    assert done.lengths.tolist() == [1] * len(PROMPTS)
    assert (done.new_tokens[:, 1:] == 96).all()


class Recorder(transformers.generation.BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def test_streamer_gets_what_transformers_generate_streams(tiny):
    model, _ = tiny["qwen2"]
    ids, mask = left_padded(PROMPTS)
    theirs, ours = Recorder(), Recorder()
    plain_generate(model, ids, mask, 9, streamer=theirs)
    out = hf.generate(model, ids, mask, max_new_tokens=9, eos_token_id=[], streamer=ours)
    assert ours.puts == theirs.puts and ours.ended == theirs.ended == 1
    assert [list(row) for row in zip(*ours.puts[1:])] == out.new_tokens.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_generates_under_compression(dtype):
    model = random_hf(*CONFIGS["qwen3"], dtype=dtype)
    ids, mask = left_padded(PROMPTS)
    cache = hf.CompressedCache(model, make_policy("gkv"), max_tokens=ids.shape[1] + 30)
    try:
        out = plain_generate(model, ids, mask, 30, past_key_values=cache)
    finally:
        model.set_attn_implementation("sdpa")
    assert out.shape == (3, ids.shape[1] + 30)
    assert all(t.dtype == dtype for t in cache.kv_tensors())
    assert (cache.eviction_log() < INT32_MAX).any()


# --- stories260K --------------------------------------------------------------------------------

@requires_stories
def test_stories260k_through_transformers_matches_the_native_engine(tmp_path):
    model, _ = stories_hf(tmp_path / "stories-hf")
    native = gkv_ext.load_model(STORIES / "tinystories_260k_v1.bin")
    tok = gkv_ext.Tokenizer.load(str(STORIES_TOK))
    prompts = [tok.encode("Once upon a time, there was a little"),
               tok.encode("Tom and his dog went to the park. They")]
    ids, mask = left_padded(prompts)
    full = hf.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    text = tok.decode(full.new_tokens[0].tolist())
    assert text.startswith("girl named Lily. She loved"), text
    for name in ALL_POLICIES:
        p = make_policy(name, budget=24, divide_length=16)
        out = hf.generate(model, ids, mask, policy=p, max_new_tokens=100, eos_token_id=[],
                          return_eviction_log=True)
        ref = gkv_ext.generate(native, prompts, policy=p, max_new_tokens=100, eos_token_ids=[])
        assert out.new_tokens.tolist() == ref.tokens.tolist(), name
        assert torch.equal(out.eviction_log, ref.death), name
        assert (ref.death < INT32_MAX).any(), name


# --- errors --------------------------------------------------------------------------------------

def test_unsupported_architectures_raise():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                vocab_size=50))
    with pytest.raises(ValueError, match="model_type llama, qwen2, qwen3.*'gpt2'"):
        hf.generate(gpt2, torch.tensor([[1, 2]]), max_new_tokens=2)
    sliding = random_hf("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                            use_sliding_window=True, sliding_window=4,
                                            max_window_layers=0))
    with pytest.raises(ValueError, match="sliding-window"):
        hf.CompressedCache(sliding, make_policy("gkv"))


BAD_ARGUMENTS = [
    (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids must be an integer tensor"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), "input_ids must be an integer tensor"),
    (dict(input_ids=torch.tensor([[1, 2, 10**6]])), r"input_ids must be in \[0, \d+\) .*got 1000000"),
    (dict(input_ids=torch.tensor([[1, -2, 3]])), r"input_ids must be in \[0, \d+\) .*got -2"),
    (dict(attention_mask=torch.ones(1, 5)), r"attention_mask must have the shape .*\(1, 3\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "padding_side='left'"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(policy="gkv"), "policy must be a gkv_ext.policies Policy"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=-1), "top_k must be >= 0"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise(tiny, kwargs, match):
    model, _ = tiny["llama"]
    args = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        hf.generate(model, **args)
    assert model.config._attn_implementation == "sdpa"


def test_gkv_attention_without_a_compressed_cache_raises(tiny):
    model, _ = tiny["llama"]
    hf.CompressedCache(model, max_tokens=8)  # switches the model to the "gkv" attention
    try:
        with pytest.raises(RuntimeError, match="needs past_key_values=gkv_ext.hf.CompressedCache"):
            plain_generate(model, torch.tensor([[1, 2, 3]]), None, 2)
    finally:
        model.set_attn_implementation("sdpa")


def test_a_compressed_cache_reused_for_a_new_prompt_raises(tiny):
    """A second model.generate on a cache that holds a generation: transformers feeds the
    prompt's tokens past the cache's length, which were attended after the old tokens. A
    continuation (the whole earlier sequence as the prompt) stays allowed."""
    model, _ = tiny["qwen2"]
    ids, mask = left_padded(PROMPTS)
    try:
        cache = hf.CompressedCache(model, make_policy("gkv"), max_tokens=ids.shape[1] + 40)
        first = plain_generate(model, ids, mask, 3, past_key_values=cache)
        with pytest.raises(RuntimeError, match="holds 13 tokens per row .* the attention mask "
                                               "covers 11; a new prompt needs a new CompressedCache"):
            plain_generate(model, ids, mask, 5, past_key_values=cache)
        # A prompt shorter than what the cache holds: transformers slices it to no tokens at all.
        short_ids, short_mask = left_padded([PROMPTS[1]])
        with pytest.raises(RuntimeError, match="holds 13 tokens per row .* covers 3; a new prompt"):
            plain_generate(model, short_ids.expand(3, -1), short_mask.expand(3, -1), 5,
                           past_key_values=cache)
        cache = hf.CompressedCache(model, make_policy("gkv"), max_tokens=ids.shape[1] + 40)
        first = plain_generate(model, ids, mask, 3, past_key_values=cache)
        more = torch.ones_like(first[:, :1])
        plain_generate(model, first, torch.cat([mask, more.expand(-1, 3)], 1), 5,
                       past_key_values=cache)
    finally:
        model.set_attn_implementation("sdpa")


def test_compressed_cache_checks_positions_and_padding(tiny):
    """Under model(...) / model.generate the cache takes transformers' position_ids: they must be
    the original positions, and the padding must be on the left."""
    model, _ = tiny["llama"]
    ids, mask = left_padded(PROMPTS)
    P = ids.shape[1]
    try:
        with pytest.raises(ValueError, match="position_ids must be the count of real tokens"):
            model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(P)[None],
                  past_key_values=hf.CompressedCache(model, max_tokens=P + 1))
        with pytest.raises(ValueError, match="padding_side='left'"):
            model(input_ids=ids, attention_mask=mask.flip(1),
                  past_key_values=hf.CompressedCache(model, max_tokens=P + 1))
    finally:
        model.set_attn_implementation("sdpa")


def test_cache_overflow_and_beam_search_raise(tiny):
    model, _ = tiny["llama"]
    ids, mask = left_padded(PROMPTS)
    try:
        with pytest.raises(RuntimeError, match="overflow"):
            plain_generate(model, ids, mask, 10,
                           past_key_values=hf.CompressedCache(model, max_tokens=ids.shape[1] + 4))
        with pytest.raises(RuntimeError, match="beam search"):
            plain_generate(model, ids, mask, 4, num_beams=2, past_key_values=hf.CompressedCache(
                model, make_policy("gkv"), max_tokens=ids.shape[1] + 4))
    finally:
        model.set_attn_implementation("sdpa")


# --- CUDA (run on the GPU machine) ---------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("policy", ["gkv", "fullkv"])
def test_cuda_fp32_equals_the_cpu_path(tiny, policy):
    model, native = tiny["llama"]
    ids, mask = left_padded(PROMPTS)
    cpu = hf.generate(model, ids, mask, policy=make_policy(policy), max_new_tokens=40,
                      eos_token_id=[], return_eviction_log=True)
    gpu_model = random_hf(*CONFIGS["llama"]).cuda()
    gpu = hf.generate(gpu_model, ids.cuda(), mask.cuda(), policy=make_policy(policy),
                      max_new_tokens=40, eos_token_id=[], return_eviction_log=True)
    assert gpu.sequences.is_cuda
    assert gpu.new_tokens.tolist() == cpu.new_tokens.tolist()
    assert torch.equal(gpu.eviction_log.cpu(), cpu.eviction_log)
    native.to("cuda", None)
    ref = gkv_ext.generate(native, PROMPTS, policy=make_policy(policy), max_new_tokens=40,
                           eos_token_ids=[])
    native.to("cpu", None)
    assert gpu.new_tokens.tolist() == ref.tokens.tolist()


@requires_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_bf16_generates_under_compression(name):
    model = random_hf(*CONFIGS[name], dtype=torch.bfloat16).cuda()
    ids, mask = left_padded(PROMPTS)
    out = hf.generate(model, ids.cuda(), mask.cuda(), policy=make_policy("gkv"),
                      max_new_tokens=60, eos_token_id=[], return_eviction_log=True)
    assert out.sequences.shape == (3, ids.shape[1] + 60)
    assert (out.eviction_log < INT32_MAX).any()
    sampled = hf.generate(model, ids.cuda(), mask.cuda(), policy=make_policy("gkv"),
                          max_new_tokens=60, eos_token_id=[], do_sample=True, top_p=0.9,
                          generator=torch.Generator("cuda").manual_seed(0))
    assert ((sampled.new_tokens >= 0) & (sampled.new_tokens < 97)).all()


@requires_cuda
def test_cuda_peak_memory_is_flat_in_the_generated_length():
    model = random_hf(*CONFIGS["llama"], dtype=torch.bfloat16).cuda()
    ids, mask = left_padded(PROMPTS)
    peaks = {}
    for n in (100, 1000):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hf.generate(model, ids.cuda(), mask.cuda(), policy=policies.GKV(32, divide_length=16),
                    max_new_tokens=n, eos_token_id=[])
        peaks[n] = torch.cuda.max_memory_allocated() - base
    # The output sequences and the eviction log grow with n (8 and 4 bytes per token and row /
    # layer head); everything else must not.
    grow = (1000 - 100) * len(PROMPTS) * (8 * 2 + 4 * model.config.num_hidden_layers *
                                          model.config.num_key_value_heads)
    assert peaks[1000] - peaks[100] <= grow + 64 * 1024, peaks


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["fullkv"] + ALL_POLICIES)
def test_cuda_graph_decode_equals_eager(policy, dtype):
    """Replaying the captured transformers forward gives exactly the eager steps' tokens and
    evictions, with sampling, across compressions and, for FullKV, across a change of attention
    span (a new capture every 512 slots); every step but the warm-up and the compressing ones
    met before the first capture is a replay."""
    model = random_hf(*CONFIGS["qwen3"], dtype=dtype).cuda()
    ids, mask = left_padded(PROMPTS)
    n = 600 if policy == "fullkv" else 100
    p = make_policy(policy)
    runs = {}
    for cuda_graph in (True, False):
        runs[cuda_graph] = hf.generate(
            model, ids.cuda(), mask.cuda(), policy=p, max_new_tokens=n, eos_token_id=[],
            do_sample=True, top_k=20, generator=torch.Generator("cuda").manual_seed(7),
            return_eviction_log=True, cuda_graph=cuda_graph)
    graph, eager = runs[True], runs[False]
    assert torch.equal(graph.sequences, eager.sequences)
    assert torch.equal(graph.eviction_log, eager.eviction_log)
    compressing = 0 if p is None else -(-n // p.divide_length)
    assert eager.graph_replays == 0
    assert graph.graph_replays >= (n - 1) - compressing - 1


@requires_cuda
def test_cuda_out_of_memory_while_capturing_is_not_blamed_on_the_graph():
    """An allocation that fails while the decode step is being captured propagates as the
    out-of-memory error it is (a smaller batch fits; cuda_graph=False would not help), and the
    device stays usable. A streamer's put runs just before each decode step: at the step that is
    captured (the second; the first is the warm-up) it caps this process's memory at what is
    reserved, so the capture's new private pool cannot get a segment."""
    model = random_hf(*CONFIGS["llama"]).cuda()
    ids, mask = left_padded(PROMPTS)

    class CapMemoryAtTheCapture:
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 3:  # the prompt, the warm-up step's token, the captured step's token
                torch.cuda.empty_cache()
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(
                    (torch.cuda.memory_reserved() + 2**20) / total)

        def end(self):
            pass

    try:
        with pytest.raises(torch.OutOfMemoryError) as error:
            hf.generate(model, ids.cuda(), mask.cuda(), policy=policies.FullKV(),
                        max_new_tokens=8, eos_token_id=[], streamer=CapMemoryAtTheCapture())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert any(entry.name == "_capture" for entry in error.traceback)
    # The traceback holds the graph whose capture failed: destroying it must not abort the
    # process (torch 2.11 did, from the default generator's registration; see _warm_up).
    del error
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.ones(2**24, device="cuda").sum().item() == 2**24  # a new cudaMalloc
    torch.cuda.synchronize()
