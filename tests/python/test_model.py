"""The LibTorch decoder (csrc/model) against transformers 5.17, its checkpoint I/O and stories260K.

- Logits equal LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM on the same random weights
  (tiny configs, saved by transformers with save_pretrained and loaded by us), over a grid that
  covers MHA and GQA, tied and untied embeddings, biases, Qwen3's q/k norm and llama3 RoPE scaling,
  in fp32 and bf16, and on a left-padded batch.
- q/k/v and gate/up run as one GEMM each over joint tensors the named weights are views of;
  in-place edits reach them, and a forward that needs weight gradients runs the per-weight GEMMs.
- Our save() round-trips and loads in transformers; sharded checkpoints both ways.
- Every corruption of a safetensors file, and every bad config, raises its own error.
- stories260K (../shared/models/stories260k, skipped when absent) continues the reference prompt
  with the reference text, and the same weights converted by save() give the same tokens in
  transformers.
"""
import json
import struct

import pytest
import torch

import gkv_ext  # noqa: F401  (loads the extension)
from gkv_ext._C import Model, ModelConfig, Tokenizer

from conftest import requires_cuda, shared_dir

transformers = pytest.importorskip("transformers")
from hf_models import SMALL, random_hf  # noqa: E402  (needs transformers)

STORIES = shared_dir() / "models" / "stories260k"
STORIES_BIN = STORIES / "tinystories_260k_v1.bin"
STORIES_TOK = STORIES / "tok512.bin"
requires_stories = pytest.mark.skipif(
    not STORIES_BIN.exists() or not STORIES_TOK.exists(),
    reason=f"stories260K not found at {STORIES} (see ../shared/DATA.md)")

PROMPT = "Once upon a time, there was a little"
CONTINUATION = "girl named Lily. She loved to play outside in the park."

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name -> (transformers config class name, extra config keys)
CONFIGS = {
    "llama-mha-untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-tied": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2,
                                           tie_word_embeddings=True)),
    "llama3-rope-bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, attention_bias=True,
                                             rope_parameters=LLAMA3_ROPE)),
    "qwen2-gqa": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=2)),
    "qwen2-tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=4,
                                       tie_word_embeddings=True)),
    "qwen3-gqa": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    "qwen3-tied-bias": ("Qwen3Config", dict(num_attention_heads=8, num_key_value_heads=4,
                                            head_dim=8, attention_bias=True,
                                            tie_word_embeddings=True)),
}
# Largest |ours - transformers| allowed, as a fraction of max |logit| (about 5 here).
# fp32: the same ops in the same order (observed difference 0), so 1e-4 is pure headroom.
# bf16 / fp16: rounding differences between attention kernels carried through two layers; we see
# up to 0.028 (bf16) and 0.0025 (fp16), about 7 and 5 units of the dtype's epsilon (2^-8, 2^-11),
# and transformers' own sdpa and eager paths differ from each other by 0.019 (bf16).
TOLERANCES = {torch.float32: 1e-4 / 5, torch.bfloat16: 10 * 2**-8, torch.float16: 10 * 2**-11}


def make_hf(name, tmp_path, dtype=torch.float32):
    """A transformers model with random weights of a visible size, saved into tmp_path/name."""
    model = random_hf(*CONFIGS[name], dtype=dtype)
    path = tmp_path / name
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def hf_logits(model, tokens, mask=None, positions=None):
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits


def assert_close(ours, ref, dtype=torch.float32):
    assert ours.shape == ref.shape
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOLERANCES[dtype] * scale, f"max error {err} for max |logit| {scale} ({dtype})"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Model.load(str(path))
    assert model.config.model_type == hf.config.model_type
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    assert_close(model.forward(tokens), hf_logits(hf, tokens))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa", "qwen3-gqa"])
def test_left_padded_batch_matches_transformers_and_unpadded_rows(name, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Model.load(str(path))
    pads = [0, 5, 16]
    tokens = torch.randint(0, SMALL["vocab_size"], (3, 19), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        tokens[b, :p] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # count of real tokens before each token
    ours = model.forward(tokens, attention_mask=mask)
    assert torch.isfinite(ours).all()
    ref = hf_logits(hf, tokens, mask, positions)
    for b, p in enumerate(pads):
        assert_close(ours[b, p:], ref[b, p:])
        assert_close(ours[b, p:], model.forward(tokens[b:b + 1, p:])[0])


@pytest.mark.parametrize("name", ["llama3-rope-bias", "qwen3-gqa"])
def test_explicit_positions_match_transformers_position_ids(name, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Model.load(path)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(6))
    positions = torch.stack([torch.arange(7) + 50, torch.arange(7) + 131])  # later in a sequence
    assert_close(model.forward(tokens, positions), hf_logits(hf, tokens, positions=positions))


def test_llama3_rope_scaling_changes_the_frequencies(tmp_path):
    _, path = make_hf("llama3-rope-bias", tmp_path)
    scaled = Model.load(str(path))
    assert scaled.config.rope_scaling.factor == 8.0
    assert scaled.config.rope_scaling.original_max_position_embeddings == 16
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (path / "config.json").write_text(json.dumps(config))
    plain = Model.load(str(path))
    tokens = torch.arange(40).remainder(SMALL["vocab_size"]).unsqueeze(0)
    assert not torch.allclose(scaled.forward(tokens), plain.forward(tokens), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa", "qwen3-tied-bias"])
def test_low_precision_logits_match_transformers(name, dtype, tmp_path):
    hf, path = make_hf(name, tmp_path, dtype)
    model = Model.load(path)
    assert model.dtype == dtype and model.config.dtype == dtype
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(3))
    assert_close(model.forward(tokens), hf_logits(hf, tokens), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_logits_match_transformers_on_cuda(name, dtype, tmp_path):
    """The decoder on the GPU against transformers on the GPU, left-padded batch included."""
    hf, path = make_hf(name, tmp_path, dtype)
    hf = hf.to("cuda")
    model = Model.load(path).to("cuda")
    assert model.device.type == "cuda"
    tokens = torch.randint(0, SMALL["vocab_size"], (3, 29), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    tokens, mask = tokens.cuda(), mask.cuda()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    ours = model.forward(tokens, attention_mask=mask)
    ref = hf_logits(hf, tokens, mask, positions)
    real = mask.bool()
    if dtype == torch.float32:
        assert_close(ours[real], ref[real], dtype)
        return
    # Low precision: both sides round differently, so each is measured against the fp32 result
    # of the same weights; ours may not be worse than transformers' own rounding error (the
    # llama3-rope config's bf16 error is 0.045 of max |logit| in transformers, 0.029 in ours).
    truth = hf_logits(make_hf(name, tmp_path / "fp32")[0].to("cuda"), tokens, mask, positions)[real]
    err_ours = (ours[real].float() - truth).abs().max().item()
    err_hf = (ref[real].float() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert err_ours <= max(TOLERANCES[dtype] * scale, 1.25 * err_hf), (err_ours, err_hf, scale)


def test_to_casts_and_keeps_tied_weights(tmp_path):
    hf, path = make_hf("qwen2-tied", tmp_path)
    model = Model.load(path).to("cpu", dtype=torch.float16)
    assert model.dtype == torch.float16 and model.config.dtype == torch.float16
    assert all(t.dtype == torch.float16 for t in model.state_dict().values())
    assert "lm_head.weight" not in model.state_dict()
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(4))
    model.to(dtype=torch.float32)
    assert_close(model.forward(tokens), hf_logits(hf, tokens), torch.float16)  # one fp16 round trip
    with pytest.raises(RuntimeError, match="unsupported model dtype"):
        model.to(dtype=torch.int32)


def linear_calls(model, tokens):
    """(logits, number of aten::linear calls) of one forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = model.forward(tokens)
    return logits, sum(e.count for e in prof.key_averages() if e.key == "aten::linear")


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama3-rope-bias"])
def test_joint_projections_share_the_named_weights(name, tmp_path):
    """q/k/v and gate/up run as one GEMM each, over joint tensors whose row blocks the named
    weights are: an in-place change of a named weight reaches that GEMM, and a forward whose
    weights need gradients runs the per-weight GEMMs instead, with the same logits."""
    hf, path = make_hf(name, tmp_path)
    model = Model.load(path)
    layers = hf.config.num_hidden_layers
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        joint, calls = linear_calls(model, tokens)
    assert calls == 4 * layers + 1  # qkv, o, gate/up, down per layer; lm_head

    named = model.state_dict()
    for t in named.values():
        t.requires_grad_(True)
    separate, calls = linear_calls(model, tokens)
    assert calls == 7 * layers + 1 and separate.requires_grad
    torch.testing.assert_close(separate.detach(), joint, rtol=1e-5, atol=1e-5)
    separate.sum().backward()
    assert named["model.layers.0.self_attn.k_proj.weight"].grad.abs().sum() > 0
    for t in named.values():
        t.requires_grad_(False)

    with torch.no_grad():
        edits = ["self_attn.k_proj.weight", "mlp.up_proj.weight"]
        edits += ["self_attn.v_proj.bias"] if hf.config.attention_bias else []
        for edit in edits:
            named[f"model.layers.1.{edit}"].mul_(-2)
            hf.get_parameter(f"model.layers.1.{edit}").mul_(-2)
        changed, calls = linear_calls(model, tokens)
    assert calls == 4 * layers + 1
    assert (changed - joint).abs().max() > 1e-3
    assert_close(changed, hf_logits(hf, tokens))
    # A move to where the model already is copies nothing: the named views stay the weights.
    model.to("cpu", dtype=torch.float32)
    assert all(t.data_ptr() == named[n].data_ptr() for n, t in model.state_dict().items())
    with torch.no_grad():
        assert linear_calls(model, tokens)[1] == 4 * layers + 1


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3-tied-bias"])
def test_inference_forward_runs_the_fused_elementwise_ops(name, tmp_path):
    """Without gradients each residual add runs fused with the norm after it, SiLU with the gate
    product, and q and k take one RoPE pass (two with Qwen3's per-head norms between)."""
    hf, path = make_hf(name, tmp_path)
    model = Model.load(path)
    layers = hf.config.num_hidden_layers
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = model.forward(tokens)
    calls = {e.key: e.count for e in prof.key_averages()}
    qk_norm = hf.config.model_type == "qwen3"
    assert calls.get("gkv::add_rms_norm") == 2 * layers
    assert calls.get("gkv::silu_mul") == layers
    assert calls.get("gkv::apply_rope") == (2 if qk_norm else 1) * layers
    assert calls.get("gkv::rms_norm") == 1 + (2 * layers if qk_norm else 0)  # the first norm
    assert_close(logits, hf_logits(hf, tokens))


@pytest.mark.parametrize("max_shard_bytes", [0, 40_000])
@pytest.mark.parametrize("name", ["llama3-rope-bias", "qwen2-gqa", "qwen3-tied-bias"])
def test_save_load_round_trip_and_transformers_loads_it(name, max_shard_bytes, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Model.load(str(path))
    out = tmp_path / "saved"
    model.save(str(out), max_shard_bytes=max_shard_bytes)
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes > 0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    again = Model.load(str(out))
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(hf)
    assert_close(hf_logits(loaded, tokens), hf_logits(hf, tokens))
    # Saving over an existing checkpoint replaces it.
    model.save(str(out))
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()


# Watches a path until a stop file appears, then prints how often it found the path missing.
WATCH_PATH = """
import os, sys
path, stop = sys.argv[1], sys.argv[2]
print("watching", flush=True)
missing = 0
while not os.path.exists(stop):
    missing += not os.path.isdir(path)
print(missing, flush=True)
"""


def test_saving_over_a_checkpoint_never_leaves_its_name_missing(tmp_path):
    """Saving over a checkpoint exchanges the new directory with the old in one step (renameat2's
    RENAME_EXCHANGE): another process watching the name never finds it missing, over 40 saves.
    (Moving the old one aside, then the new one in, leaves a gap a watcher finds.)"""
    import subprocess
    import sys
    _, path = make_hf("llama-mha-untied", tmp_path)
    model = Model.load(str(path))
    out, stop = tmp_path / "saved", tmp_path / "stop"
    model.save(str(out))
    watcher = subprocess.Popen([sys.executable, "-c", WATCH_PATH, str(out), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline() == "watching\n"
        for _ in range(40):
            model.save(str(out))
    finally:
        stop.touch()
        missing = int(watcher.communicate(timeout=60)[0])
    assert missing == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-mha-untied", "saved", "stop"]
    assert Model.load(str(out)).state_dict().keys() == model.state_dict().keys()


def longest_stall_of_other_threads(call):
    """Runs call() in a thread while this one counts; returns the longest stretch of call()'s run
    in which this thread could not run, and the length of call()'s run, in seconds."""
    import threading
    import time
    window = {}

    def run():
        window["start"] = time.perf_counter()
        call()
        window["end"] = time.perf_counter()

    ticks = []
    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    start, end = window["start"], window["end"]
    inside = [start] + [t for t in ticks if start < t < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:])), end - start


def test_save_and_load_let_other_python_threads_run(tmp_path):
    """Model.save and Model.load release the GIL while they write and read the files: a checkpoint
    saved from a background thread does not stall the Python threads beside it. Held, the counting
    thread would stop for the whole call."""
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8,
                                      vocab_size=32000)  # 46M parameters: 184 MB in fp32
    path = tmp_path / "big"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = Model.load(str(path))
    out = tmp_path / "saved"
    for call in (lambda: model.save(str(out)), lambda: Model.load(str(out))):
        stall, duration = longest_stall_of_other_threads(call)
        assert duration > 0.02, "too fast to tell: make the model larger"
        assert stall < 0.5 * duration, f"stalled {stall:.3f} s of a {duration:.3f} s call"


def test_bf16_checkpoint_saves_in_bf16(tmp_path):
    from safetensors.torch import load_file
    _, path = make_hf("qwen3-gqa", tmp_path)
    model = Model.load(path).to(dtype=torch.bfloat16)
    out = tmp_path / "bf16"
    model.save(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    stored = load_file(out / "model.safetensors")
    ours = model.state_dict()
    assert stored.keys() == ours.keys()
    assert all(stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], ours[k]) for k in ours)
    assert Model.load(out).dtype == torch.bfloat16


# --- corrupt safetensors files ------------------------------------------------------------------

def read_safetensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path, fn):
    header, data = read_safetensors(path)
    fn(header)
    write_safetensors(path, header, data)


def truncate(path, size):
    raw = path.read_bytes()
    path.write_bytes(raw[:size(len(raw))])


NORM0 = "model.layers.0.input_layernorm.weight"
NORM1 = "model.layers.1.input_layernorm.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


def set_offsets(name, offsets):
    return lambda h: h[name].update(data_offsets=offsets)


def move_last_tensor_on(path, gap):
    """The last tensor's bytes moved `gap` bytes further, leaving a hole of zeros before them."""
    header, data = read_safetensors(path)
    entry = max((e for n, e in header.items() if n != "__metadata__"),
                key=lambda e: e["data_offsets"][0])
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin + gap, end + gap]
    write_safetensors(path, header, data[:begin] + bytes(gap) + data[begin:])


CORRUPTIONS = {
    "shorter than the length field": (lambda p: truncate(p, lambda n: 5), "shorter than the 8-byte"),
    "truncated header": (lambda p: truncate(p, lambda n: 100), r"header length \d+ exceeds"),
    "truncated data": (lambda p: truncate(p, lambda n: n - 100),
                       r"outside the data section .*truncated"),
    "bad JSON": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"x" + p.read_bytes()[9:]),
                 "header is not valid JSON"),
    "unknown dtype": (lambda p: edit_header(p, lambda h: h[NORM0].update(dtype="F7")),
                      f"tensor '{NORM0}': unknown dtype 'F7'"),
    "span out of range": (lambda p: edit_header(p, set_offsets(NORM0, [10**9, 10**9 + 256])),
                          f"tensor '{NORM0}': data_offsets .* outside the data section"),
    "overlapping spans": (lambda p: edit_header(
        p, lambda h: h[NORM1].update(data_offsets=h[NORM0]["data_offsets"])),
        "overlapping data_offsets"),
    "span does not match shape": (lambda p: edit_header(p, lambda h: h[NORM0].update(shape=[63])),
                                  r"byte span 256 does not match shape x dtype size = 252"),
    "hole between spans": (lambda p: move_last_tensor_on(p, 4),
                           r"bytes \[\d+, \d+\) of the data section belong to no tensor"),
    "bytes appended": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 3),
                       "the data section has 3 bytes after the last tensor's"),
    "missing tensor": (lambda p: edit_header(p, lambda h: h.update(renamed=h.pop(UP0))),
                       f"missing tensor '{UP0}'"),
    "wrong shape": (lambda p: edit_header(p, lambda h: h[NORM0].update(shape=[32, 2])),
                    rf"tensor '{NORM0}' has shape \[32, 2\], expected \[64\]"),
    "header not an object": (lambda p: write_safetensors(p, [1, 2], b""), "not a JSON object"),
    "bad data_offsets": (lambda p: edit_header(p, set_offsets(NORM0, [4])),
                         "'data_offsets' must be a list of two integers"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_safetensors_raise_clear_errors(corruption, tmp_path):
    _, path = make_hf("llama-mha-untied", tmp_path)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(path / "model.safetensors")
    with pytest.raises(RuntimeError, match=message):
        Model.load(str(path))


# Values a corrupt header may hold where a tensor entry expects a dtype, a shape, an offset.
ODD_JSON_VALUES = [None, True, -1, 0, 1, 3, 2**31, 2**32 + 1, 2**62, 2**64 - 1, 2**64, 1.5, -0.0,
                   "F32", "BF16", "x", [], [1], [0, 2**63], [5, 3], [-1, 4], {"a": 1}]


def corrupt_randomly(rng, raw):
    """raw with one random corruption: cut short, bytes of the length field or header
    overwritten, or one field of one header entry set to an odd value or dropped."""
    header_len = struct.unpack("<Q", raw[:8])[0]
    kind = rng.randrange(4)
    if kind == 0:
        return raw[:rng.randrange(len(raw))]
    if kind == 1:
        out = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(8 + header_len)] = rng.randrange(256)
        return bytes(out)
    header, data = json.loads(raw[8:8 + header_len]), raw[8 + header_len:]
    entry = header[rng.choice(sorted(n for n in header if n != "__metadata__"))]
    field = rng.choice(["dtype", "shape", "data_offsets"])
    if kind == 2:
        entry[field] = rng.choice(ODD_JSON_VALUES)
    elif field != "dtype" and entry[field]:
        entry[field][rng.randrange(len(entry[field]))] = rng.choice(ODD_JSON_VALUES)
    else:
        del entry[field]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def load_or_clear_error(path):
    """Loads path; a failure must be a RuntimeError of one line. Returns whether it loaded."""
    try:
        Model.load(str(path))
        return True
    except RuntimeError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(str(e))
        return False


def test_random_corruptions_of_a_checkpoint_are_clear_errors(tmp_path):
    """300 random corruptions of a real checkpoint file: each one loads or raises one clear
    error, and none crashes the process (a read past the file or a bad allocation would)."""
    import random
    _, path = make_hf("llama-mha-untied", tmp_path)
    file = path / "model.safetensors"
    raw, rng = file.read_bytes(), random.Random(0)
    loaded = 0
    for _ in range(300):
        file.write_bytes(corrupt_randomly(rng, raw))
        loaded += load_or_clear_error(path)
    assert loaded < 30  # nearly every corruption is caught, not loaded as garbage


@requires_stories
def test_random_corruptions_of_a_llama2ts_file_are_clear_errors(tmp_path):
    """The same for the llama2.ts reader: cut short, header fields set to odd sizes, bytes of
    the vocabulary overwritten."""
    import random
    raw, rng = STORIES_BIN.read_bytes(), random.Random(0)
    bad = tmp_path / "bad.bin"
    loaded = 0
    for _ in range(200):
        out = bytearray(raw)
        kind = rng.randrange(3)
        if kind == 0:
            out = out[:rng.randrange(len(out))]
        elif kind == 1:  # one of the seven int32 sizes after the 10-byte magic
            value = rng.choice([-1, 0, 1, 7, 2**31 - 1, rng.randrange(-2**31, 2**31)])
            at = 10 + 4 * rng.randrange(7)
            out[at:at + 4] = struct.pack("<i", value)
        else:
            for _ in range(rng.randint(1, 8)):
                out[256 + rng.randrange(4096)] = rng.randrange(256)
        bad.write_bytes(bytes(out))
        loaded += load_or_clear_error(bad)
    assert loaded < 100


def test_sharded_index_errors(tmp_path):
    _, path = make_hf("qwen2-gqa", tmp_path)
    out = tmp_path / "sharded"
    Model.load(str(path)).save(str(out), max_shard_bytes=40_000)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(RuntimeError, match="invalid shard file name '../elsewhere.safetensors'"):
        Model.load(str(out))
    shard = sorted(out.glob("model-*.safetensors"))[0]
    index["weight_map"]["model.norm.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(RuntimeError, match=f"'model.norm.weight' is not in its shard {shard.name}"):
        Model.load(str(out))
    index_path.write_text("{")
    with pytest.raises(RuntimeError, match="index.json: invalid JSON"):
        Model.load(str(out))
    index_path.unlink()
    with pytest.raises(RuntimeError, match="no model.safetensors or model.safetensors.index.json"):
        Model.load(str(out))


# --- bad configs --------------------------------------------------------------------------------

GOOD_CONFIG = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "vocab_size": 97, "rms_norm_eps": 1e-6,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
BAD_CONFIGS = {
    "missing key": ({"hidden_size": None}, "key 'hidden_size' is missing"),
    "ill-typed key": ({"num_hidden_layers": "2"}, r"key 'num_hidden_layers' must be an integer, got \"2\""),
    "ill-typed float": ({"rms_norm_eps": "small"}, "key 'rms_norm_eps' must be a number"),
    "unsupported model_type": ({"model_type": "gpt2"}, "key 'model_type' is 'gpt2'; supported"),
    "unsupported rope type": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
                              "key 'rope_parameters.rope_type' is 'yarn'"),
    "llama3 rope without factor": ({"rope_parameters": {**LLAMA3_ROPE, "factor": None}},
                                   "key 'rope_parameters.factor' is missing"),
    "sliding window": ({"use_sliding_window": True}, "key 'use_sliding_window' must be false"),
    "heads not a multiple": ({"num_key_value_heads": 3}, "must be a multiple of 'num_key_value_heads'"),
    "odd head_dim": ({"head_dim": 7}, "key 'head_dim' must be even"),
    "non-positive size": ({"vocab_size": 0}, "key 'vocab_size' must be positive"),
    "unknown dtype": ({"dtype": "float8"}, "unsupported dtype 'float8'"),
    "bad eos": ({"eos_token_id": [1, "x"]}, "key 'eos_token_id' must be an integer or a list"),
    "activation": ({"hidden_act": "gelu"}, "key 'hidden_act' must be 'silu'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_raise_clear_errors(case):
    change, message = BAD_CONFIGS[case]
    config = {**GOOD_CONFIG, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(RuntimeError, match=message):
        ModelConfig.from_json(json.dumps(config))


def test_random_config_values_are_clear_errors(tmp_path):
    """300 random edits of a real checkpoint's config.json (one or two keys set to odd values):
    each loads or raises one clear error. A layer count past the checkpoint's fails at its first
    missing layer and allocates nothing for the rest: a resize to 2**31 layers up front was not
    refused under memory overcommit (the GPU machine) but killed the process."""
    import random
    _, path = make_hf("qwen2-gqa", tmp_path)
    config_path = path / "config.json"
    config, rng = json.loads(config_path.read_text()), random.Random(0)
    odd = ODD_JSON_VALUES + [2**40, 2**62, 7, 16, "float16", {"rope_type": "llama3"}]
    failed = 0
    for _ in range(300):
        edited = dict(config)
        for _ in range(rng.randint(1, 2)):
            edited[rng.choice(sorted(edited))] = rng.choice(odd)
        config_path.write_text(json.dumps(edited))
        failed += not load_or_clear_error(path)
    assert failed > 150
    present = config["num_hidden_layers"]
    for layers in (2**31, 2**40, 2**62):
        config_path.write_text(json.dumps({**config, "num_hidden_layers": layers}))
        with pytest.raises(RuntimeError, match=rf"missing tensor 'model\.layers\.{present}\."):
            Model.load(str(path))


def test_config_parsing_and_legacy_rope_keys():
    c = ModelConfig.from_json(json.dumps(GOOD_CONFIG))
    assert (c.model_type, c.num_kv_heads, c.head_dim, c.rope_theta, c.qk_norm) == ("qwen3", 2, 16, 1e6, True)
    assert c.rope_scaling is None and c.dtype == torch.float32 and c.eos_token_ids == []
    legacy = {**GOOD_CONFIG, "model_type": "llama", "rope_theta": 5e5, "torch_dtype": "bfloat16",
              "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
              "eos_token_id": [7, 8], "bos_token_id": 1}
    del legacy["rope_parameters"]
    c = ModelConfig.from_json(json.dumps(legacy))
    assert (c.rope_theta, c.rope_scaling.factor, c.dtype, c.eos_token_ids, c.bos_token_id) == (
        5e5, 8.0, torch.bfloat16, [7, 8], 1)
    with pytest.raises(RuntimeError, match="invalid JSON"):
        ModelConfig.from_json("{")


def test_missing_config_file(tmp_path):
    _, path = make_hf("qwen2-gqa", tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(RuntimeError, match="cannot open config file"):
        Model.load(str(path))


def test_forward_argument_errors(tmp_path):
    _, path = make_hf("qwen2-gqa", tmp_path)
    model = Model.load(str(path))
    with pytest.raises(RuntimeError, match=r"tokens must be \[B,T\] int64"):
        model.forward(torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="positions must be int64 with the shape of tokens"):
        model.forward(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"token ids must lie in \[0, 97\)"):
        model.forward(torch.full((1, 3), 97))


# --- stories260K --------------------------------------------------------------------------------

def greedy(step, tokens, n):
    """n greedy tokens by repeated full forward passes; step(tokens [1,T]) -> logits [1,T,V]."""
    for _ in range(n):
        nxt = step(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens


@requires_stories
def test_stories_tokenizer():
    tok = Tokenizer.load(str(STORIES_TOK))
    assert tok.vocab_size == 512
    from_bin = Tokenizer.load(str(STORIES_BIN))
    ids = tok.encode(PROMPT)
    assert ids[0] == Tokenizer.bos_id and ids == from_bin.encode(PROMPT)
    assert tok.piece(ids[1]).startswith(" ")  # the dummy-prefix space merged into the first word
    assert tok.decode(ids) == PROMPT
    assert tok.encode(PROMPT, bos=False, eos=True)[-1] == Tokenizer.eos_id
    odd = "Zoë saw 🐱 {x}"  # characters outside the vocabulary: byte fallback
    encoded = tok.encode(odd)
    assert any(3 <= i < 259 for i in encoded)
    assert tok.decode(encoded) == odd
    assert tok.encode("") == [Tokenizer.bos_id]
    with pytest.raises(RuntimeError, match=r"token id 512 is outside \[0, 512\)"):
        tok.decode([512])


@requires_stories
def test_stories260k_greedy_continuation_and_transformers_agree(tmp_path):
    model = Model.load(str(STORIES_BIN))
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        64, 5, 8, 4, 8, 512)
    assert c.tie_word_embeddings
    tok = Tokenizer.load(str(STORIES_TOK))
    prompt = torch.tensor([tok.encode(PROMPT)])
    ours = greedy(model.forward, prompt, 24)
    text = tok.decode(ours[0, prompt.shape[1]:].tolist())
    assert text.startswith(CONTINUATION), text
    assert tok.decode(ours[0].tolist()).startswith(PROMPT + " " + CONTINUATION)

    # The same weights as a transformers checkpoint (our save() is the converter).
    out = tmp_path / "stories260k-hf"
    model.save(str(out))
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    theirs = greedy(lambda t: hf_logits(hf, t), prompt, 24)
    assert torch.equal(ours, theirs)
    assert_close(model.forward(ours), hf_logits(hf, ours))


@requires_stories
def test_truncated_stories_file(tmp_path):
    raw = STORIES_BIN.read_bytes()
    for size, message in [(200, "truncated"), (len(raw) - 4, "tensor section is"),
                          (3000, "truncated: piece")]:
        bad = tmp_path / "bad.bin"
        bad.write_bytes(raw[:size])
        with pytest.raises(RuntimeError, match=message):
            Model.load(str(bad))
    notmodel = tmp_path / "x.bin"
    notmodel.write_bytes(b"\x02" + raw[1:])
    with pytest.raises(RuntimeError, match="not a llama2.ts model file"):
        Model.load(str(notmodel))
    # Sizes whose product passes 2^64 (hidden 2^30, ffn and layers 2^31 - 1) are refused as such.
    huge = tmp_path / "huge.bin"
    huge.write_bytes(raw[:10] + struct.pack("<2i", 2**30, 2**31 - 1) + raw[18:26]
                     + struct.pack("<i", 2**31 - 1) + raw[30:])
    with pytest.raises(RuntimeError, match=r"tensor section is \d+ bytes, the header implies "
                                           r"more than 2\^64"):
        Model.load(str(huge))
    # A byte of a piece that is not UTF-8 is escaped in the message (it used to fail in decoding).
    at = raw.index(b"<0x00>")
    notutf8 = tmp_path / "y.bin"
    notutf8.write_bytes(raw[:at] + b"\xe5" + raw[at + 1:])
    with pytest.raises(RuntimeError, match=r"piece 3 is '\\xE50x00>', expected the byte piece <0x00>"):
        Model.load(str(notutf8))
