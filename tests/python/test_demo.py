"""`python -m gkv_ext demo` on the bundled model: its FullKV accuracy equals the eval harness's on
the same examples, G-KV's cache is smaller than FullKV's by the budget's share, the files are
written, and bad arguments fail in one line."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gkv_ext import __main__ as cli
from gkv_ext import demo, evaluate
from gkv_ext.engine import load_model

BUNDLED = demo.BUNDLED_MODEL
LIMIT, BUDGET = 6, 32


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--limit", str(LIMIT), "--budgets", str(BUDGET), "--batch-size", "3",
                     "--policies", "gkv", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "demo.json").read_text())
    return out, {(r["policy"], r["budget"]): r for r in results["rows"]}


def test_rows_files_and_memory(demo_run, capsys):
    out, rows = demo_run
    assert set(rows) == {("fullkv", None), ("gkv", BUDGET)}
    assert (out / "demo.png").stat().st_size > 10_000
    full, gkv = rows[("fullkv", None)], rows[("gkv", BUDGET)]
    # fp32 K and V of 2 layers x 2 KV heads x head_dim 64 per slot, for a batch of 3
    config = load_model(BUNDLED).config
    per_slot = config.num_layers * config.num_kv_heads * config.head_dim * 2 * 4 * 3
    assert gkv["kv_bytes"] < full["kv_bytes"]
    assert full["kv_bytes"] % per_slot == 0 and gkv["kv_bytes"] % per_slot == 0
    # FullKV holds the whole batch (prompt + response), G-KV about the budget (plus the slots a
    # compression interval adds before eviction)
    split = demo.eval_split(BUNDLED, LIMIT)
    assert full["kv_bytes"] // per_slot >= max(map(len, split.prompts))
    assert gkv["kv_bytes"] // per_slot < full["kv_bytes"] // per_slot
    for row in rows.values():
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0


def test_fullkv_accuracy_equals_the_eval_harness(demo_run, tmp_path):
    _, rows = demo_run
    task = json.loads((BUNDLED / "task.json").read_text())
    parser = cli.argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(BUNDLED), "--tokenizer", str(BUNDLED / "tokenizer"), "--data", "synthetic",
         "--policies", "fullkv",
         "--synthetic-length", str(task["synthetic_length"]), "--seed", str(task["eval_seed"]),
         "--limit", str(LIMIT), "--batch-size", "3", "--dtype", "float32", "--device", "cpu",
         "--max-new-tokens", str(demo.eval_split(BUNDLED, LIMIT).max_new_tokens),
         "--out", str(tmp_path)])
    harness = evaluate.evaluate(args)["rows"][0]
    assert rows[("fullkv", None)]["accuracy"] == pytest.approx(harness["accuracy"])


@pytest.mark.parametrize("arg, message", [
    (["--budgets", "0"], "--budgets"), (["--limit", "0"], "--limit"),
    (["--limit", "100000"], "--limit"), (["--dtype", "int8"], "--dtype"),
    (["--model", "/nonexistent"], "--model"), (["--policies", "nope"], "nope"),
    (["--policies", "gkv,rkv,gkv"], "--policies names gkv more than once"),
    (["--policies", "gkv,fullkv"], "FullKV always runs"),
    (["--budgets", "64,64"], "--budgets names 64 more than once")])
def test_bad_arguments_are_one_line_errors(arg, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gkv_ext", "demo", *arg, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and message in lines[-1]


def test_generate_command_runs_the_bundled_model_with_its_tokenizer(capsys, tmp_path):
    """`python -m gkv_ext generate --model <bundled>` finds the character tokenizer the bundled
    model keeps in tokenizer/ (it said "no tokenizer found"), and answers an eval example as the
    Python API does; --tokenizer names another one."""
    from gkv_ext import tasks
    from gkv_ext.engine import generate
    from gkv_ext.policies import FullKV
    example = tasks.make_example(seed=100000, length=256)
    tok = tasks.load_tokenizer(BUNDLED / "tokenizer")
    ref = generate(load_model(BUNDLED), [example["prompt"]], tokenizer=tok, policy=FullKV(),
                   max_new_tokens=80)
    assert ref.texts[0].endswith(f"Answer: {example['answer']}")
    for extra in ([], ["--tokenizer", str(BUNDLED / "tokenizer")]):
        assert cli.main(["generate", "--model", str(BUNDLED), "--prompt", example["prompt"],
                         "--policy", "fullkv", "--max-new-tokens", "80", *extra]) == 0
        assert capsys.readouterr().out.rstrip("\n") == ref.texts[0]
    assert cli.main(["generate", "--model", str(BUNDLED), "--prompt", "a=1\na?\n",
                     "--tokenizer", "/nonexistent/tok"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: /nonexistent/tok does not exist (a model directory or a llama2.ts .bin file)"
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no tokenizer found in .*/model or .*/model/tokenizer"):
        tasks.load_tokenizer(empty)


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_out_naming_a_file_is_refused_before_the_run(command, tmp_path, capsys):
    file = tmp_path / "results"
    file.write_text("keep me")
    args = ["--model", str(BUNDLED), "--data", "synthetic"] if command == "eval" else []
    assert cli.main([command, *args, "--out", str(file)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: --out must be a directory (made when absent), got the file {file}"
    assert file.read_text() == "keep me"
