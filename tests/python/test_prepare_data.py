"""scripts/prepare_data.py on the real data and tokenizers: the token ids decode back to the text
(through the tokenizer and through vocab.json's C++ reader), the answers are the references."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_dir
from gkv_ext import tasks

ROOT = Path(__file__).resolve().parents[2]
SHARED = shared_dir()
QWEN3 = SHARED / "tokenizers" / "qwen3"
STORIES_TOK = SHARED / "models" / "stories260k" / "tok512.bin"
requires = {
    "qwen3": pytest.mark.skipif(not (QWEN3 / "tokenizer.json").exists(),
                                reason=f"Qwen3 tokenizer not found at {QWEN3}"),
    "gsm8k": pytest.mark.skipif(not (SHARED / "data" / "gsm8k" / "test.jsonl").exists(),
                                reason="GSM8K not found in shared/data"),
    "math500": pytest.mark.skipif(not (SHARED / "data" / "math500" / "test.jsonl").exists(),
                                  reason="MATH-500 not found in shared/data"),
    "stories": pytest.mark.skipif(not STORIES_TOK.exists(), reason="stories260K tokenizer not found"),
}


def prepare(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GKV_SHARED_DIR": str(SHARED)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def read(out: Path, split: str):
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def test_synthetic_with_char_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    r = prepare("--data", "synthetic", "--tokenizer", "char", "--splits", "train=5,test=3",
                "--synthetic-length", 256, "--seed", 10, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    vocab = tasks.Vocab.load(str(tmp_path / "vocab.json"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(vocab) == len(tok) == len(tasks.CHAR_VOCABULARY)
    seeds = {"train": range(10, 15), "test": range(15, 18)}  # disjoint across splits
    for split, split_seeds in seeds.items():
        rows = read(tmp_path, split)
        assert len(rows) == len(split_seeds)
        for row, seed in zip(rows, split_seeds):
            ex = tasks.make_example(seed, length=256)
            assert vocab.decode(row["prompt"]).decode() == "<bos>" + ex["prompt"]
            assert vocab.decode(row["response"]).decode() == ex["response"] + "<eos>"
            assert tok.decode(row["prompt"] + row["response"], skip_special_tokens=True) == \
                ex["prompt"] + ex["response"]
            assert row["answer"] == ex["answer"] and row["answer_kind"] == "exact"
            response = vocab.decode(row["response"][:-1]).decode()
            assert tasks.reward("exact", response, row["answer"]) == 1.0


def test_synthetic_knobs(tmp_path):
    r = prepare("--data", "synthetic", "--tokenizer", "char", "--splits", "a=2",
                "--synthetic-length", 512, "--chain-depth", 3, "--num-variables", 10, "--modulus", 7,
                "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    options = tasks.synthetic_options(512, chain_depth=3, num_variables=10, modulus=7)
    vocab = tasks.Vocab.load(str(tmp_path / "vocab.json"))
    for seed, row in enumerate(read(tmp_path, "a")):
        ex = tasks.make_example(seed, options)
        assert vocab.decode(row["prompt"]).decode() == "<bos>" + ex["prompt"]
        assert ex["prompt"].count("\n") == 11  # 10 definitions and the question


@requires["qwen3"]
@requires["gsm8k"]
@pytest.mark.parametrize("chat", [False, True])
def test_gsm8k_with_qwen3(tmp_path, chat):
    from transformers import AutoTokenizer
    r = prepare("--data", "gsm8k", "--tokenizer", QWEN3, "--splits", "test=6,train=4",
                "--out", tmp_path, *(["--chat-template"] if chat else []))
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    vocab = tasks.Vocab.load(str(tmp_path / "vocab.json"))
    assert len(vocab) == len(tok)
    for split, n in (("test", 6), ("train", 4)):
        source = [json.loads(line) for line in
                  (SHARED / "data" / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]]
        rows = read(tmp_path, split)
        assert len(rows) == n
        for row, src in zip(rows, source):
            prompt = vocab.decode(row["prompt"]).decode()
            assert prompt == tok.decode(row["prompt"])  # the same bytes, specials included
            if chat:
                assert prompt.startswith("<|im_start|>user\n" + src["question"])
                assert prompt.rstrip().endswith("<|im_start|>assistant")
            else:
                assert prompt == src["question"]
            assert row["answer"] == src["answer"].rsplit("####", 1)[1].strip().replace(",", "")
            response = vocab.decode(row["response"]).decode()
            assert row["response"][-1] == tok.eos_token_id
            assert "<<" not in response  # calculator notes dropped
            assert tasks.reward("gsm8k", response, row["answer"]) == 1.0


@requires["stories"]
@requires["math500"]
def test_math500_with_stories_tokenizer(tmp_path):
    r = prepare("--data", "math500", "--tokenizer", STORIES_TOK, "--splits", "test=5",
                "--max-prompt-tokens", 100000, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    vocab = tasks.Vocab.load(str(tmp_path / "vocab.json"))
    tok = tasks.load_tokenizer(STORIES_TOK)
    source = [json.loads(line) for line in
              (SHARED / "data" / "math500" / "test.jsonl").read_text().splitlines()[:5]]
    for row, src in zip(read(tmp_path, "test"), source):
        assert row["prompt"][0] == tok.tok.bos_id
        # vocab.json keeps the dummy-prefix space that llama2.c encoding puts first
        assert vocab.decode(row["prompt"]).decode() == " " + src["question"]
        assert tok.decode(row["prompt"]) == src["question"]
        assert row["answer_kind"] == "boxed" and row["answer"] == tasks.extract_answer("boxed", src["answer"])
        assert tasks.reward("boxed", vocab.decode(row["response"]).decode(), row["answer"]) == 1.0


@requires["stories"]
@requires["gsm8k"]
def test_max_prompt_tokens_leaves_out_long_prompts(tmp_path):
    r = prepare("--data", "gsm8k", "--tokenizer", STORIES_TOK, "--splits", "test=20",
                "--max-prompt-tokens", 120, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read(tmp_path, "test")
    assert 0 < len(rows) < 20 and all(len(row["prompt"]) <= 120 for row in rows)
    assert "over --max-prompt-tokens left out" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "wiki", "--tokenizer", "char"], "--data must be one of gsm8k, math500, synthetic"),
    (["--data", "synthetic", "--tokenizer", "char", "--splits", "train=x"], "--splits: expected name=count"),
    (["--data", "synthetic", "--tokenizer", "char", "--splits", "train"], "needs a count"),
    (["--data", "synthetic", "--tokenizer", "/nonexistent"], "/nonexistent does not exist"),
    (["--data", "synthetic", "--tokenizer", "char", "--splits", "a=2", "--synthetic-length", 10],
     "--synthetic-length must be in [64, 65536], got 10"),
    (["--data", "synthetic", "--tokenizer", "char", "--splits", "a=2,b=1,a=3"], "'a' is named twice"),
    (["--data", "synthetic", "--tokenizer", "char", "--chain-depth", "0"], "chain_depth must be in"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, args, message):
    r = prepare(*args, "--out", tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_out_naming_a_file_is_refused_by_name(tmp_path):
    file = tmp_path / "data.txt"
    file.write_text("keep me")
    r = prepare("--data", "synthetic", "--tokenizer", "char", "--splits", "a=2", "--out", file)
    assert r.returncode == 2 and file.read_text() == "keep me"
    assert r.stderr.strip() == f"error: --out must be a directory (made when absent), got the file {file}"
