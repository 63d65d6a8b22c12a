"""`python -m gkv_ext eval` for real: stories260K on TinyStories text, on a prepared synthetic data
file, and a transformers checkpoint on GSM8K prompts; FullKV agrees with itself exactly, a budget
no sequence reaches equals FullKV, a small budget does not, and bad arguments fail in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_cuda, shared_dir
from gkv_ext import __main__ as cli

ROOT = Path(__file__).resolve().parents[2]
SHARED = shared_dir()
STORIES = SHARED / "models" / "stories260k" / "tinystories_260k_v1.bin"
QWEN3 = SHARED / "tokenizers" / "qwen3"
requires_stories = pytest.mark.skipif(
    not STORIES.exists() or not (SHARED / "data" / "tinystories" / "valid-160k.txt").exists(),
    reason="stories260K or TinyStories text not found in shared/")

# 24 prompt + 40 new tokens = 64 per row: budget 512 never evicts, budget 24 evicts every 8 steps.
SMALL, LARGE = 24, 512


@pytest.fixture(autouse=True)
def _shared(monkeypatch):
    monkeypatch.setenv("GKV_SHARED_DIR", str(SHARED))


def run_eval(tmp_path, *args):
    out = tmp_path / "out"
    assert cli.main(["eval", *map(str, args), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    return out, {(r["policy"], r["budget"]): r for r in results["rows"]}, results


@requires_stories
def test_stories260k_tinystories(tmp_path, capsys):
    out, rows, results = run_eval(
        tmp_path, "--model", STORIES, "--data", "tinystories", "--policies", "streamingllm,gkv,fullkv",
        "--budgets", f"{SMALL},{LARGE}", "--limit", 3, "--batch-size", 2, "--prompt-tokens", 24,
        "--max-new-tokens", 40, "--divide-length", 8)
    assert results["examples"] == 3
    assert set(rows) == {("streamingllm", SMALL), ("streamingllm", LARGE), ("gkv", SMALL),
                         ("gkv", LARGE), ("fullkv", None)}
    full = rows[("fullkv", None)]
    assert full["agree_prefix"] == 1.0 and full["agree_overall"] == 1.0
    assert full["nll_increase"] == 0.0
    assert 0.05 < full["nll"] < 3.0  # a real language model on its own domain
    assert full["accuracy"] is None  # stories have no answers
    for policy in ("streamingllm", "gkv"):
        assert rows[(policy, LARGE)]["agree_prefix"] == 1.0
        # Teacher forcing runs in chunks of divide_length for these policies and in one pass for
        # FullKV: fp32 sums in another order differ by about 1e-7 nats (seen: 1.0e-7).
        assert rows[(policy, LARGE)]["nll_increase"] == pytest.approx(0.0, abs=1e-6)
    # evicting 40 of 64 tokens changes something
    small = rows[("streamingllm", SMALL)]
    assert small["agree_overall"] < 1.0 or small["nll_increase"] != 0.0
    table = capsys.readouterr().out
    assert "| policy | budget | accuracy |" in table and "| fullkv | all |" in table
    assert (out / "results.md").read_text().strip() in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@requires_cuda
@requires_stories
def test_stories260k_on_cuda_matches_cpu(tmp_path):
    args = ["--model", STORIES, "--data", "tinystories", "--policies", "gkv,fullkv",
            "--budgets", SMALL, "--limit", 4, "--prompt-tokens", 24, "--max-new-tokens", 40,
            "--divide-length", 8]
    _, cpu, _ = run_eval(tmp_path / "cpu", *args)
    _, gpu, _ = run_eval(tmp_path / "gpu", *args, "--device", "cuda")
    assert gpu.keys() == cpu.keys()
    assert gpu[("fullkv", None)]["agree_prefix"] == 1.0
    assert gpu[("fullkv", None)]["nll_increase"] == 0.0
    # fp32 on both; kernels sum in another order, so the NLL agrees to about 1e-5 nats
    assert gpu[("fullkv", None)]["nll"] == pytest.approx(cpu[("fullkv", None)]["nll"], abs=1e-4)
    assert 0.0 <= gpu[("gkv", SMALL)]["agree_overall"] <= 1.0  # eviction ran on the GPU


def tiny_checkpoint(path: Path, vocab_size: int, tokenizer_dir: Path) -> Path:
    """A random Qwen3 saved by transformers, with the tokenizer files copied beside it."""
    import shutil

    import torch
    import transformers
    config = transformers.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      vocab_size=vocab_size, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_synthetic_on_a_transformers_checkpoint(tmp_path):
    """The synthetic task end to end on a checkpoint directory with the character tokenizer: as a
    named data set and as a prepared token-id file (decoded through vocab.json). An untrained
    model gets the answers wrong, so the accuracy is low but defined."""
    from gkv_ext import tasks
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--data", "synthetic",
                    "--tokenizer", "char", "--splits", "test=2", "--synthetic-length", "128",
                    "--out", str(data)], check=True, env=env, capture_output=True)
    ckpt = tiny_checkpoint(tmp_path / "char-model", len(tasks.CHAR_VOCABULARY), data / "tokenizer")
    common = ["--model", ckpt, "--policies", "fullkv,tova", "--budgets", 32, "--max-new-tokens", 8,
              "--limit", 2]
    _, from_file, _ = run_eval(tmp_path, *common, "--data", data / "test.jsonl")
    _, named, _ = run_eval(tmp_path, *common, "--data", "synthetic", "--synthetic-length", 128)
    assert from_file == named  # the same examples (seeds 0, 1), tokenized the same way
    for row in named.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["nll"] > 0  # the reference response, teacher-forced


@pytest.mark.skipif(not (QWEN3 / "tokenizer.json").exists()
                    or not (SHARED / "data" / "gsm8k" / "test.jsonl").exists(),
                    reason="Qwen3 tokenizer or GSM8K not found in shared/")
def test_transformers_checkpoint_on_gsm8k(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "qwen3-tiny", 151669, QWEN3)
    _, rows, _ = run_eval(tmp_path, "--model", ckpt, "--data", "gsm8k", "--chat-template",
                          "--policies", "snapkv,fullkv", "--budgets", 32, "--limit", 2,
                          "--max-new-tokens", 6)
    assert rows[("fullkv", None)]["agree_prefix"] == 1.0
    assert rows[("fullkv", None)]["nll_increase"] == 0.0
    assert rows[("snapkv", 32)]["accuracy"] is not None


@pytest.mark.parametrize("args, message", [
    (["--policies", "nope"], "unknown policy 'nope'; one of fullkv, streamingllm, h2o, h2o-accumulate"),
    (["--policies", "gkv,snapkv,GKV"], "--policies names gkv more than once"),
    (["--budgets", "64,32,64"], "--budgets names 64 more than once"),
    (["--budgets", "64,x"], "--budgets: expected comma-separated integers"),
    (["--budgets", "0"], "--budgets must be positive"),
    (["--data", "wiki"], "neither a file nor one of tinystories"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--dtype", "fp8"], "--dtype must be one of"),
    (["--data", "synthetic", "--seed", "-1"], "seed must be in [0, 2**64), got -1"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, args, message):
    base = {"--model": str(STORIES), "--data": "tinystories", "--policies": "fullkv",
            "--budgets": "64"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [x for kv in base.items() for x in kv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gkv_ext", "eval", *argv, "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_missing_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gkv_ext", "eval", "--model", str(tmp_path / "none"),
                        "--data", "tinystories"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip() == f"error: --model: {tmp_path / 'none'} not found"


@requires_stories
@pytest.mark.parametrize("line, message", [
    ('{"prompt": "abc"}', "expected an object with 'prompt'"),
    ('{"prompt": [1, 2], "response": [5, 99999]}', "token ids must lie in [0, 512)"),
    ('{"prompt": [1, 2], "answer": "3", "answer_kind": "math"}', "answer_kind must be one of"),
    ('{"prompt": [1, 2], "answer": "3", "answer_kind": "exact"}', "accuracy needs"),  # no vocab.json
    ("{", "invalid JSON"),
])
def test_bad_data_file_gives_one_clear_line(tmp_path, line, message):
    data = tmp_path / "data.jsonl"
    data.write_text(line + "\n")
    r = subprocess.run([sys.executable, "-m", "gkv_ext", "eval", "--model", str(STORIES), "--data",
                        str(data), "--policies", "fullkv", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
