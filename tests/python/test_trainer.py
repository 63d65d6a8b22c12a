"""gkv-train end to end: the built binary on tiny random transformers checkpoints made here.

- --help lists every key; unknown keys, bad values and bad types fail with one line naming the key.
- sft lowers its loss; its checkpoints load in transformers; a run killed (SIGKILL) mid-way and
  resumed ends with the same weights, optimizer and metrics as an uninterrupted run.
- sft under teacher-forced compression, distill (KL to another model falls, the student under a
  compressed cache), rl (GRPO reward rises on a task scored by gkv::tasks::reward via vocab.json).
- Evaluation logs compressed-cache and FullKV accuracy.
- Two ranks over Gloo on loopback end with the same weights as one rank on the same global batch.

The binary is $GKV_TRAIN, else build/gkv-train (scripts/test.sh builds it), else build-*/gkv-train.
Runs use one thread (OMP_NUM_THREADS=1): results are then bitwise reproducible on CPU.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import shared_dir

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[2]


def find_binary():
    if os.environ.get("GKV_TRAIN"):
        return Path(os.environ["GKV_TRAIN"])
    for candidate in [ROOT / "build" / "gkv-train", *sorted(ROOT.glob("build-*/gkv-train"))]:
        if candidate.exists():
            return candidate
    return None


BINARY = find_binary()
pytestmark = pytest.mark.skipif(
    BINARY is None or not BINARY.exists(),
    reason="gkv-train is not built (scripts/test.sh builds it with CMake; or set GKV_TRAIN)")

VOCAB = 32
BOS, EOS, SEP = 1, 2, 3
DIGITS = range(4, 12)  # the tokens of the tasks


def make_model(path, seed):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=BOS,
        eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama, a second one (another teacher), and the data of the tasks."""
    d = tmp_path_factory.mktemp("trainer")
    make_model(d / "model", seed=0)
    make_model(d / "other", seed=1)
    rng = random.Random(0)
    copy = []
    for _ in range(64):
        x = [rng.choice(DIGITS) for _ in range(6)]
        copy.append({"prompt": [BOS] + x + [SEP], "response": x + [EOS]})
    write_jsonl(d / "copy.jsonl", copy)
    # Long sequences for the compressed cache (budget 8 < 12 + 20 tokens).
    long = []
    for _ in range(16):
        x = [rng.choice(DIGITS) for _ in range(10)]
        long.append({"prompt": [BOS] + x + [SEP], "response": (x * 2) + [EOS]})
    write_jsonl(d / "long.jsonl", long)
    # rl: "say the prompt's token". Token t decodes to "Answer: t<t>\n", so gkv::tasks::reward
    # ("exact") reads the last token's answer.
    (d / "vocab.json").write_text(json.dumps(
        {"tokens": [f"Answer: t{t}\n".encode().hex() for t in range(VOCAB)]}))
    say = [{"prompt": [BOS, t, SEP], "answer": f"t{t}", "answer_kind": "exact"} for t in DIGITS]
    write_jsonl(d / "say.jsonl", say)
    return d


def run(recipe, *overrides, check=True, env=None, **kwargs):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run([str(BINARY), recipe, *overrides], capture_output=True, text=True,
                         env=full_env, timeout=300, **kwargs)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def series(out_dir, key):
    return [m[key] for m in metrics(out_dir) if key in m]


def weights(checkpoint):
    return safetensors_torch.load_file(str(Path(checkpoint) / "model.safetensors"))


def mean(xs):
    return sum(xs) / len(xs)


def sft_args(work, out, *extra):
    return [f"model={work / 'model'}", f"data={work / 'copy.jsonl'}", f"out_dir={out}", "lr=1e-2",
            "batch_size=8", "micro_batch_size=4", "seed=3", *extra]


def test_help_lists_every_key_with_its_default(work, tmp_path):
    out = run("--help")
    run("sft", *sft_args(work, tmp_path / "o", "steps=1"))
    saved = json.loads((tmp_path / "o" / "step-00000001" / "train_config.json").read_text())
    for key, value in saved.items():
        if key not in ("model", "data", "out_dir", "steps", "lr", "batch_size", "micro_batch_size", "seed"):
            assert f"  {key} ({json.dumps(value)})" in out.stdout.replace(".0)", ")") or \
                f"  {key} ({json.dumps(value)})" in out.stdout, key
    assert len([line for line in out.stdout.splitlines() if line.startswith("  ")]) == len(saved)


@pytest.mark.parametrize("override, message", [
    ("no_such_key=1", "config key 'no_such_key': unknown key"),
    ("lr=-1", "config key 'lr': must be > 0"),
    ("temperature=-0.5", "config key 'temperature': must be >= 0"),
    ("steps=abc", "config key 'steps': cannot parse"),
    ("steps=1.5", "config key 'steps': expected an integer"),
    ("policy=magic", "config key 'policy': must be one of"),
    ("policy=gkv", "config key 'budget': policy gkv needs budget > 0"),
    ("micro_batch_size=3", "config key 'micro_batch_size': must divide batch_size"),
    ("dist_backend=nccl", "nccl needs device=cuda"),
    ("data=/", "config key 'data': must be a JSONL file, not a directory"),
    (f"out_dir={__file__}", "config key 'out_dir': must be a directory (made when absent), not a file"),
])
def test_bad_keys_and_values_are_one_line_errors(work, tmp_path, override, message):
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"} \
        if override.startswith("dist_backend") else None
    out = run("sft", *sft_args(work, tmp_path / "o"), override, check=False, env=env)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_a_cuda_device_that_is_not_there_is_a_one_line_error(work, tmp_path):
    """device=cuda on a machine without a GPU, or a LOCAL_RANK past its GPUs, is named before any
    tensor moves (it was a page of torch's dispatcher backends)."""
    gpus = torch.cuda.device_count()
    message = f"LOCAL_RANK must be in [0, {gpus})" if gpus else \
        "config key 'device': cuda, but no CUDA device is available"
    out = run("sft", *sft_args(work, tmp_path / "o"), "device=cuda", check=False,
              env={"LOCAL_RANK": str(gpus)})
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and message in lines[0], out.stderr


def test_bad_config_file_and_data_name_the_problem(work, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": str(work / "model"), "lerning_rate": 1}))
    out = run("sft", "--config", str(cfg), check=False)
    assert out.returncode != 0 and "config key 'lerning_rate': unknown key" in out.stderr
    out = run("sft", "--config", str(cfg), "--config", str(cfg), check=False)
    assert out.returncode == 2 and out.stderr == \
        "gkv-train: --config given twice; one file, and key=value to override it\n"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [1, 2]}, {"prompt": [1, 999]}])
    out = run("sft", *sft_args(work, tmp_path / "o"), f"data={bad}", check=False)
    assert out.returncode != 0 and "bad.jsonl:2: 'prompt' holds 999" in out.stderr
    out = run("sft", *sft_args(work, tmp_path / "o2"), f"data={work / 'say.jsonl'}", check=False)
    assert out.returncode != 0 and "need a 'response'" in out.stderr
    out = run("rl", *sft_args(work, tmp_path / "o3"), check=False)
    assert out.returncode != 0 and "config key 'data': example 1 has no 'answer'" in out.stderr
    out = run("sft", *sft_args(work, tmp_path / "o4"), f"eval_data={work / 'say.jsonl'}",
              f"vocab={tmp_path / 'none.json'}", check=False)
    assert out.returncode != 0 and "config key 'vocab':" in out.stderr


def test_sft_lowers_the_loss_and_checkpoints_load_in_transformers(work, tmp_path):
    out_dir = tmp_path / "sft"
    out = run("sft", *sft_args(work, out_dir, "steps=40", "log_every=10", "save_every=10",
                               "keep_checkpoints=2"))
    assert "step 40/40 loss" in out.stderr and "tok/s" in out.stderr and "eta" in out.stderr
    loss = series(out_dir, "loss")
    assert len(loss) == 40 and mean(loss[-5:]) < 0.75 * mean(loss[:5]), loss
    ckpt = out_dir / "step-00000040"
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir()) == ["step-00000030", "step-00000040"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    trained = weights(ckpt)
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"],
                           weights(work / "model")["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(hf.model.embed_tokens.weight.detach(), trained["model.embed_tokens.weight"])


def test_sigkill_and_resume_gives_the_weights_of_an_uninterrupted_run(work, tmp_path):
    args = ["steps=300", "save_every=20", "lr_schedule=cosine", "warmup_steps=5"]
    whole = tmp_path / "whole"
    run("sft", *sft_args(work, whole, *args))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(BINARY), "sft", *sft_args(work, killed, *args)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "step-00000040").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "step-00000300").exists()
    out = run("sft", *sft_args(work, killed, *args))
    assert "resumed from" in out.stderr
    a, b = weights(whole / "step-00000300"), weights(killed / "step-00000300")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Every step's loss and gradient norm match too (Adam's moments were restored, not reset).
    assert [(m["loss"], m["grad_norm"]) for m in metrics(whole)] == \
        [(m["loss"], m["grad_norm"]) for m in metrics(killed)]


@pytest.mark.parametrize("damage", ["optimizer.pt", "trainer_state.json", "model.safetensors"])
def test_a_damaged_checkpoint_names_itself_and_the_way_on(work, tmp_path, damage):
    """A checkpoint changed after it was written (they are written whole or not at all) stops the
    resume with one line naming the directory, the file and what to do; removing it resumes from
    the one before, exactly as an uninterrupted run."""
    whole, out = tmp_path / "whole", tmp_path / "o"
    run("sft", *sft_args(work, whole, "steps=3"))
    run("sft", *sft_args(work, out, "steps=3", "save_every=1"))
    latest = out / "step-00000003"
    path = latest / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    result = run("sft", *sft_args(work, out, "steps=4"), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert f"cannot resume from {latest}: " in lines[0] and damage in lines[0]
    assert "remove that directory to resume from the checkpoint before it" in lines[0]
    shutil.rmtree(latest)
    run("sft", *sft_args(work, out, "steps=3"))
    resumed, expected = weights(out / "step-00000003"), weights(whole / "step-00000003")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_sft_under_teacher_forced_compression(work, tmp_path):
    out_dir = tmp_path / "sftc"
    run("sft", f"model={work / 'model'}", f"data={work / 'long.jsonl'}", f"out_dir={out_dir}",
        "lr=1e-2", "batch_size=4", "micro_batch_size=2", "steps=30", "sft_compressed=true",
        "policy=gkv", "budget=8", "window=2", "divide_length=4")
    loss = series(out_dir, "loss")
    assert mean(loss[-5:]) < 0.8 * mean(loss[:5]), loss


def test_distill_kl_falls_with_a_compressed_student(work, tmp_path):
    out_dir = tmp_path / "distill"
    run("distill", f"model={work / 'model'}", f"teacher={work / 'other'}", f"data={work / 'long.jsonl'}",
        f"out_dir={out_dir}", "lr=1e-2", "batch_size=4", "micro_batch_size=4", "steps=30",
        "policy=snapkv", "budget=8", "window=2", "divide_length=4", "distill_temperature=2.0")
    kl = series(out_dir, "loss")
    assert min(kl) >= 0 and mean(kl[-5:]) < 0.5 * mean(kl[:5]), kl


@pytest.mark.parametrize("policy", ["fullkv", "gkv"])
def test_self_distillation_starts_at_the_compression_gap(work, tmp_path, policy):
    """Teacher = the initial weights, responses generated by it: at step 1 the student is the
    teacher, so the KL is exactly the compressed cache's effect (0 under FullKV)."""
    out_dir = tmp_path / "self"
    run("distill", f"model={work / 'model'}", f"data={work / 'say.jsonl'}", f"out_dir={out_dir}",
        "lr=1e-3", "batch_size=4", "micro_batch_size=2", "steps=2", "distill_generate=true",
        "max_new_tokens=24", f"policy={policy}", f"budget={0 if policy == 'fullkv' else 6}",
        "window=2", "divide_length=4")
    kl = series(out_dir, "loss")
    assert len(kl) == 2
    if policy == "fullkv":
        assert abs(kl[0]) < 1e-7, kl
    else:
        assert kl[0] > 1e-6, kl


def test_grpo_reward_rises_under_a_compressed_cache(work, tmp_path):
    out_dir = tmp_path / "rl"
    eval_data = work / "say.jsonl"
    run("rl", f"model={work / 'model'}", f"data={work / 'say.jsonl'}", f"out_dir={out_dir}",
        f"eval_data={eval_data}", "eval_every=20", "eval_max_new_tokens=1", "lr=2e-2",
        "lr_schedule=constant", "batch_size=4", "micro_batch_size=2", "group_size=8", "steps=40",
        "max_new_tokens=1", "temperature=1.0", "policy=h2o", "budget=2", "divide_length=1",
        "ppo_epochs=2", "kl_coef=0.01")
    reward = series(out_dir, "reward")
    assert len(reward) == 40 and mean(reward[-8:]) > mean(reward[:8]) + 0.3, reward
    for key in ("length", "entropy", "clip_frac", "kl", "truncated"):
        assert len(series(out_dir, key)) == 40, key
    assert max(series(out_dir, "clip_frac")) > 0  # the second epoch's ratio moves
    acc = series(out_dir, "eval_accuracy")
    assert len(acc) == 3 and acc[-1] > acc[0] and len(series(out_dir, "eval_accuracy_fullkv")) == 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (and gkv-train built with CUDA)")


@pytest.mark.parametrize("backend, device", [
    ("gloo", "cpu"),
    pytest.param("nccl", "cuda", marks=pytest.mark.skipif(
        not CUDA or torch.cuda.device_count() < 2, reason="NCCL data parallel needs 2 GPUs")),
])
def test_two_ranks_match_one_rank_on_the_same_global_batch(work, tmp_path, backend, device):
    args = ["steps=6", "batch_size=8", f"eval_data={work / 'say.jsonl'}", "eval_every=3",
            "eval_max_new_tokens=2", "micro_batch_size=2", f"device={device}", f"dist_backend={backend}"]
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            [str(BINARY), "sft", *sft_args(work, tmp_path / "dp", *args)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    if any(f"{backend} was not built" in err for _, err in outs):
        pytest.skip(f"gkv-train was built without {backend} (gloo: apt install libgloo-dev; "
                    "nccl: the nvidia-nccl pip package), rebuild")
    # Each rank checks its weights against rank 0's bitwise before every checkpoint (exit != 0).
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    run("sft", *sft_args(work, tmp_path / "one", *args[:-1], "micro_batch_size=4"))
    one = weights(tmp_path / "one" / "step-00000006")
    two = weights(tmp_path / "dp" / "step-00000006")
    # Equal up to summation order: Adam's g / sqrt(v) magnifies 1e-7 gradient differences where
    # g is tiny, and the order depends on the CPU's BLAS path (an AMD EPYC with AVX2 moved one
    # element by 1.2e-5). 5e-5 is 0.5% of one update at lr 1e-2; a rank that trained on other
    # data or skipped the all-reduce moves whole tensors by updates.
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=5e-5, rtol=1e-4)
    assert not all(torch.equal(one[k], weights(work / "model")[k]) for k in one)
    # Evaluation is sharded over the ranks and summed.
    assert len(series(tmp_path / "dp", "eval_accuracy")) == 3
    assert series(tmp_path / "dp", "eval_accuracy_fullkv") == series(tmp_path / "one", "eval_accuracy_fullkv")


@requires_cuda
@pytest.mark.parametrize("recipe", ["sft", "rl"])
def test_cuda_bf16_autocast_runs_learn(work, tmp_path, recipe):
    out_dir = tmp_path / recipe
    common = [f"model={work / 'model'}", f"out_dir={out_dir}", "device=cuda", "bf16=true",
              "policy=gkv", "budget=8", "window=2", "divide_length=4", "lr=1e-2"]
    if recipe == "sft":
        run("sft", *common, f"data={work / 'long.jsonl'}", "batch_size=4", "micro_batch_size=2",
            "steps=30", "sft_compressed=true")
        loss = series(out_dir, "loss")
        assert mean(loss[-5:]) < 0.8 * mean(loss[:5]), loss
    else:
        run("rl", *common, f"data={work / 'say.jsonl'}", "lr=2e-2", "lr_schedule=constant",
            "batch_size=4", "micro_batch_size=2", "group_size=8", "steps=40", "max_new_tokens=1",
            "temperature=1.0")
        reward = series(out_dir, "reward")
        assert mean(reward[-8:]) > mean(reward[:8]) + 0.3, reward


STORIES = shared_dir() / "models" / "stories260k" / "tinystories_260k_v1.bin"


@pytest.mark.skipif(not STORIES.exists(), reason=f"stories260K not found at {STORIES} (../shared/DATA.md)")
def test_stories260k_trains_from_its_llama2ts_file_and_saves_a_transformers_checkpoint(tmp_path):
    """The real pretrained model: sft under a G-KV cache on a repeated sequence of its own
    vocabulary; the saved checkpoint is a transformers LlamaForCausalLM with tied embeddings."""
    rng = random.Random(1)
    rows = []
    for _ in range(8):
        x = [rng.randrange(3, 512) for _ in range(12)]
        rows.append({"prompt": [1] + x, "response": x + x})
    data = write_jsonl(tmp_path / "rep.jsonl", rows)
    out_dir = tmp_path / "out"
    run("sft", f"model={STORIES}", f"data={data}", f"out_dir={out_dir}", "lr=3e-3", "batch_size=4",
        "micro_batch_size=4", "steps=12", "sft_compressed=true", "policy=gkv", "budget=16",
        "window=4", "divide_length=4")
    loss = series(out_dir, "loss")
    assert mean(loss[-3:]) < mean(loss[:3]), loss
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "step-00000012")
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("script", ["rl.sh", "distill.sh"])
def test_scripts_run_a_job_end_to_end(work, tmp_path, script):
    """scripts/rl.sh and distill.sh on prepared data (train.jsonl, test.jsonl, vocab.json)."""
    data = tmp_path / "data"
    data.mkdir()
    source = work / ("say.jsonl" if script == "rl.sh" else "long.jsonl")
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(source.read_text())
    (data / "vocab.json").write_text((work / "vocab.json").read_text())
    if script == "distill.sh":  # answers for the evaluation
        rows = [dict(json.loads(line), answer="t4", answer_kind="exact")
                for line in source.read_text().splitlines()]
        write_jsonl(data / "test.jsonl", rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GKV_TRAIN": str(BINARY), "MODEL": str(work / "model"),
           "DATA_DIR": str(data), "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "BF16": "false",
           "BUDGET": "8", "WINDOW": "2", "DIVIDE_LENGTH": "4", "STEPS": "2", "BATCH": "2",
           "MICRO_BATCH": "1", "GROUP": "2", "MAX_NEW_TOKENS": "4", "EVAL_EVERY": "2",
           "EVAL_SAMPLES": "2", "SAVE_EVERY": "1", "LR": "1e-3", "WARMUP": "0"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out" / "step-00000002" / "model.safetensors").exists()
    assert len(series(tmp_path / "out", "eval_accuracy")) == 2
    # Every variable reached its key, and the script's own defaults the rest.
    config = json.loads((tmp_path / "out" / "step-00000002" / "train_config.json").read_text())
    expected = dict(model=str(work / "model"), data=str(data / "train.jsonl"),
                    eval_data=str(data / "test.jsonl"), out_dir=str(tmp_path / "out"),
                    policy="gkv", budget=8, window=2, divide_length=4, max_new_tokens=4,
                    eval_max_new_tokens=4, steps=2, batch_size=2, micro_batch_size=1, lr=1e-3,
                    warmup_steps=0, eval_every=2, eval_samples=2, save_every=1, device="cpu",
                    bf16=False)
    expected.update(dict(group_size=2, temperature=0.8, top_p=0.95, ppo_epochs=1, clip_eps=0.2,
                         kl_coef=0.0, clip_overlong=True) if script == "rl.sh" else
                    dict(teacher="", distill_temperature=0.6, distill_generate=False,
                         max_seq_len=4096))
    assert {key: config[key] for key in expected} == expected


def test_posttrain_compares_compressed_and_full_cache_runs(tmp_path):
    """scripts/posttrain.py on the bundled model, one step per run: every run trains (its weights
    differ from the start: their teacher-forced NLL changes), and the report has every model at
    every budget plus FullKV, in a table, JSON and a plot."""
    out = tmp_path / "report"
    args = ["--gkv-train", str(BINARY), "--work", str(tmp_path / "work"), "--out", str(out),
            "--steps", "1", "--distill-steps", "1", "--rl-steps", "1", "--lr", "1e-3", "--eval-limit", "4",
            "--train-examples", "16", "--eval-budgets", "32,64", "--max-new-tokens", "40"]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["python", str(ROOT / "scripts" / "posttrain.py"), *args], env=run_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["initial", "sft-fullkv", "sft-gkv", "distill-gkv", "rl-fullkv", "rl-gkv"]
    for name, rows in results.items():
        assert sorted((r["policy"], r["budget"]) for r in rows if r["policy"] == "gkv") == \
            [("gkv", 32), ("gkv", 64)], name
        assert [r["policy"] for r in rows].count("fullkv") == 1, name
    nll = {name: [r["nll"] for r in rows] for name, rows in results.items()}
    for name in ("sft-fullkv", "sft-gkv", "distill-gkv"):
        assert nll[name] != nll["initial"], name
    assert (out / "results.png").stat().st_size > 0 and "| rl-gkv |" in (out / "results.md").read_text()
    bad = subprocess.run(["python", str(ROOT / "scripts" / "posttrain.py"), *args, "--runs", "sft,rl"],
                         env=run_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--runs: unknown ['rl', 'sft']" in bad.stderr


def test_plot_metrics_draws_each_key_and_names_a_missing_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_accuracy": 0.5}])
    script = ["python", str(ROOT / "scripts" / "plot_metrics.py"), str(run / "metrics.jsonl")]
    done = subprocess.run([*script, "--keys", "loss,eval_accuracy", "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").stat().st_size > 0
    missing = subprocess.run([*script, "--keys", "reward", "--out", str(tmp_path / "d.png")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no record has the key 'reward'" in missing.stderr
