"""scripts/bench_hf.py --quick runs end to end on this machine: both sides of its table, JSON
and plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def test_bench_hf_quick(tmp_path):
    out = tmp_path / "bench_hf"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RANDOM weights" in run.stdout and "| gkv_tok_s |" in run.stdout
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["random_weights"] is True
    rows = results["rows"]
    assert [(r["B"], r["new_tokens"]) for r in rows] == [(1, 48), (2, 48), (1, 96), (2, 96)]
    for r in rows:
        assert r["plain_tok_s"] > 0 and r["gkv_tok_s"] > 0
        # The compressed cache holds budget + D = 32 slots; the plain one every token.
        assert r["gkv_kv_MB"] < r["plain_kv_MB"]
    assert rows[2]["gkv_kv_MB"] == rows[0]["gkv_kv_MB"]
    assert out.with_suffix(".png").stat().st_size > 0

    # --merge: one table and plot from several runs' JSON files
    merged = tmp_path / "merged"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--merge",
                          str(out.with_suffix(".json")), str(out.with_suffix(".json")),
                          "--out", str(merged)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(merged.with_suffix(".json").read_text())["rows"] == rows + rows
    assert merged.with_suffix(".png").stat().st_size > 0


def test_bench_hf_bad_arguments_exit_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--quick",
                          "--batches", "0", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "bench_hf: batches, new tokens, budget and prompt must be >= 1"]
