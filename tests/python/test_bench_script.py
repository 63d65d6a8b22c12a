"""The benchmark scripts' quick runs work end to end on this machine and write their table, JSON
and plot: scripts/bench_ops.py (the README's main command), bench_generate.py, bench_hf.py."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gkv_ext

ROOT = Path(__file__).resolve().parents[2]
# The checkout's package first, whether or not it is pip-installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_bench_ops_quick(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ops.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "### decode_attention" in run.stdout and "### compression" in run.stdout
    assert "### fused rms_norm" in run.stdout
    results = json.loads(out.with_suffix(".json").read_text())
    for section in ("decode_attention", "lifetime_attention", "compression", "fused_ops"):
        assert results[section], section
        assert all(v == v for row in results[section] for k, v in row.items()
                   if k.startswith("gkv") and k.endswith("_ms")), section  # no NaN timings
    assert out.with_suffix(".png").stat().st_size > 0
    assert all(row["redundancy_carried_ms"] > 0 for row in results["compression"])
    assert out.with_name(out.name + "_compression.png").stat().st_size > 0


def test_bench_generate_quick(tmp_path):
    """scripts/bench_generate.py on a tiny model: every row measured, G-KV's KV memory is the
    same at every generated length while FullKV's grows."""
    out = tmp_path / "gen"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--quick",
                          "--batches", "2", "--points", "160,400", "--steps", "8", "--hf-steps", "4",
                          "--only", "engine,transformers", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Decode step of our engine" in run.stdout and "transformers" in run.stdout
    result = json.loads(out.with_suffix(".json").read_text())
    every = {(r["policy"], r["mode"], r["generated"]): r for r in result["engine"]}
    assert set(every) == {(p, m, g) for p in ("FullKV", "G-KV@32", "G-KV@64")
                          for m in ("graph", "eager") for g in (160, 400)}
    rows = {(p, g): r for (p, m, g), r in every.items() if m == "graph"}
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in rows.values())
    assert rows["FullKV", 400]["live_slots"] > rows["FullKV", 160]["live_slots"]
    for b in (32, 64):
        assert rows[f"G-KV@{b}", 400]["kv_mb"] == rows[f"G-KV@{b}", 160]["kv_mb"]
        assert rows[f"G-KV@{b}", 400]["live_slots"] <= b + 128
    assert len(result["transformers"]) == 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_generate_ab_times_both_sides_in_turn(tmp_path):
    """--ab decode_linear: every batch, policy and mode timed with the switch off and on in each
    round, and a summary row per point whose ratio is that of the two medians."""
    out = tmp_path / "ab"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--quick",
                          "--batches", "2", "--budgets", "32", "--points", "160", "--steps", "4",
                          "--modes", "graph", "--only", "engine", "--ab", "decode_linear",
                          "--ab-rounds", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "A/B of switch decode_linear" in run.stdout
    result = json.loads(out.with_suffix(".json").read_text())
    assert (result["ab_switch"], result["ab_rounds"]) == ("decode_linear", 2)
    turns = [(r["policy"], r["round"], r["switch_on"]) for r in result["engine"]]
    assert turns == [(p, r, on) for p in ("FullKV", "G-KV@32")
                     for r in (0, 1) for on in (False, True)]
    assert len(result["ab"]) == 2
    for row in result["ab"]:
        steps = {on: sorted(r["step_ms"] for r in result["engine"]
                            if r["policy"] == row["policy"] and r["switch_on"] == on)
                 for on in (False, True)}
        assert row["off_ms"] == pytest.approx(sum(steps[False]) / 2)  # the median of two
        assert row["on_over_off"] == pytest.approx(sum(steps[True]) / sum(steps[False]))
    assert out.with_suffix(".png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--quick",
                          "--ab", "decode_linear", "--ab-rounds", "0"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert bad.returncode != 0 and "--ab-rounds must be >= 1, got 0" in bad.stderr


def test_bench_generate_equal_memory_at_given_batches(tmp_path):
    """--memory-batches skips the batch search, so the equal-memory section runs on a CPU too:
    one row per policy at the given batch, each printed as soon as it is measured;
    --memory-policies measures one of them alone."""
    out = tmp_path / "memory"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--quick",
                          "--only", "memory", "--memory-batches", "2,3", "--steps", "4",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["equal_memory"]
    assert [(r["policy"], r["batch"]) for r in rows] == [("FullKV", 2), ("G-KV@64", 3)]
    for r in rows:
        assert r["mean_step_ms"] > 0 and r["tokens_per_s"] > 0
        assert f"equal memory: {r['policy']} at B={r['batch']}" in run.stdout
    # Both from generated length 0: FullKV at 0 and --points, G-KV at 0, just before its first
    # compression and in its steady state.
    assert rows[0]["points"] == [0, 64, 256] and len(rows[0]["step_ms"]) == 3
    assert rows[0]["timed_at"] == [3, 67, 259]  # the middle of 2 untimed and 4 timed steps
    assert rows[1]["points"][0] == 0 < rows[1]["points"][1] < rows[1]["first_compression"]
    assert out.with_suffix(".png").stat().st_size > 0  # the equal-memory panel alone
    one = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--quick",
                          "--only", "memory", "--memory-batches", "2,3", "--steps", "4",
                          "--memory-policies", "gkv", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["equal_memory"]
    assert [(r["policy"], r["batch"]) for r in rows] == [("G-KV@64", 3)]
    for args, message in [(["--memory-batches", "2"], "--memory-batches takes two batch sizes"),
                          (["--memory-policies", "gkv,snapkv"],
                           "--memory-policies takes fullkv and/or gkv, got gkv,snapkv"),
                          (["--points", "64,128"], "the last of --points must be it, got 128"),
                          (["--memory-batches", "2,3", "--memory-policies", "gkv", "--max-new",
                            "64", "--points", "32,64"], "past the generation the rows compare")]:
        bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"),
                              "--quick", "--only", "memory", *args],
                             capture_output=True, text=True, timeout=600, env=ENV)
        assert bad.returncode != 0 and message in bad.stderr, args


def test_bench_generate_equal_memory_ab_has_a_row_per_setting(tmp_path):
    """--ab in the equal-memory section: one cache, timed with the switch off and on in turn,
    and a row per setting, each printed with its setting."""
    out = tmp_path / "memory_ab"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--quick",
                          "--only", "memory", "--memory-batches", "2,3", "--memory-policies",
                          "gkv", "--steps", "4", "--ab", "tuned_linear", "--ab-rounds", "2",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["equal_memory"]
    assert [(r["policy"], r["batch"], r["switch_on"]) for r in rows] == [
        ("G-KV@64", 3, False), ("G-KV@64", 3, True)]
    for r in rows:
        assert r["mean_step_ms"] > 0 and 0 <= r["compress_share"] < 1
        setting = "on" if r["switch_on"] else "off"
        assert f"equal memory: G-KV@64 at B=3, tuned_linear {setting}:" in run.stdout
    assert out.with_suffix(".png").stat().st_size > 0


def load_script(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the scripts import each other
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_prefills_in_chunks_to_the_same_cache(monkeypatch):
    """The equal-memory runs prefill a large batch in chunks: the cache ends holding the same
    prompt, at the same positions, with the same last logits, as after one prefill forward;
    and transformers' model reads our joint q/k/v and gate/up tensors (weights held once)."""
    from gkv_ext import policies
    bench = load_script("bench_generate", monkeypatch)
    bench.transformers = pytest.importorskip("transformers")  # main() imports it
    cpu = torch.device("cpu")
    hf, model = bench.build_models("tiny", cpu, torch.float32)
    ours = model.state_dict()
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert hf.get_parameter(name).data_ptr() == ours[name].data_ptr()
    whole = bench.Run(model, policies.FullKV(), 2, 40, 8, cpu)
    chunked = bench.Run(model, policies.FullKV(), 2, 40, 8, cpu, chunk=16)
    assert whole.generated == chunked.generated == 0
    assert whole.cache.length == chunked.cache.length == 40
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-4, atol=1e-4)
    for layer in range(model.config.num_layers):
        assert torch.equal(chunked.cache.positions(layer), whole.cache.positions(layer))
        live = slice(0, 40)  # the slots past the live ones are never written
        torch.testing.assert_close(chunked.cache.keys(layer)[:, :, live],
                                   whole.cache.keys(layer)[:, :, live])


def test_bench_generate_times_g_kv_before_its_first_compression(monkeypatch):
    """The equal-memory rows integrate the step over the whole generation. G-KV's cache grows
    until its first compression: its growing points' timed steps (and their two untimed ones)
    end just before that compression, and its steady step holds from the compression on."""
    from types import SimpleNamespace
    from gkv_ext import policies
    bench = load_script("bench_generate", monkeypatch)
    bench.transformers = pytest.importorskip("transformers")
    cpu = torch.device("cpu")
    _, model = bench.build_models("tiny", cpu, torch.float32)
    args = SimpleNamespace(points=[64, 256], max_new=256, steps=4, ab=None, ab_rounds=1,
                           divide=128)
    run = bench.Run(model, policies.GKV(64), 2, 48, 400, cpu, chunk=8)
    points, steady, first = bench.equal_memory_points(run, args)
    assert points[:2] == [0, first - 6] and points[2] == 256 and steady == [False, False, True]
    for g in points[:2]:
        run.fill_to(g, chunk=8)
        _, compressed = run.decode(args.steps, graph=False, steady=False)
        assert not any(compressed)
    assert run.generated == first and run.cache.decode_compresses(1)
    full = bench.Run(model, policies.FullKV(), 2, 48, 400, cpu, chunk=8)
    assert bench.equal_memory_points(full, args) == ([0, 64, 256], [True] * 3, None)
    # FullKV: linear between the points (flat before the first), the last segment interpolated
    # to the end (at 400: 2 + 3 * 300 / 350). Under a budget: the growing points, then the steady
    # (last) step from the first compression (120) to the end.
    assert bench.equal_memory_mean_step([0, 100, 400], [1.0, 2.0, 5.0], None, 400) == \
        pytest.approx((100 * 1.5 + 300 * 3.5) / 400)
    end = 2 + 3 * 300 / 350
    assert bench.equal_memory_mean_step([50, 100, 450], [1.0, 2.0, 5.0], None, 400) == \
        pytest.approx((50 * 1 + 50 * 1.5 + 300 * (2 + end) / 2) / 400)
    assert bench.equal_memory_mean_step([0, 100, 400], [1.0, 2.0, 5.0], 120, 1000) == \
        pytest.approx((100 * 1.5 + 20 * 3.5 + 880 * 5) / 1000)


def test_bench_generate_batch_search_finds_the_largest_fitting_batch(monkeypatch):
    """The equal-memory batch search (on a GPU each probe allocates a real cache) returns a batch
    that fits and is the largest that does, in few probes, none at or above the bound that the
    free memory gives."""
    bench = load_script("bench_generate", monkeypatch)
    for largest in (0, 1, 2, 7, 59, 100, 928, 4000):
        for upper in sorted({largest + 1, 2 * largest + 1, 9 * largest + 5}):
            probed = []

            def fits(batch):
                probed.append(batch)
                return batch <= largest

            found = bench.largest_fitting(fits, upper)
            assert found == largest, (largest, upper, found)
            assert all(1 <= b < upper for b in probed), (largest, upper, probed)
            assert len(probed) <= 28, (largest, upper, probed)


def test_bench_generate_floor_reads_only_the_batch_rows_of_an_untied_embedding(monkeypatch):
    """The bandwidth floor counts the weight bytes a decode step reads: an untied embedding table
    gives only the batch's rows; a tied one is read whole by the lm_head."""
    bench = load_script("bench_generate", monkeypatch)
    bench.transformers = pytest.importorskip("transformers")
    hf, model = bench.build_models("tiny", torch.device("cpu"), torch.float32)
    every = sum(p.numel() * 4 for p in hf.parameters())
    vocab, hidden = hf.get_parameter("model.embed_tokens.weight").shape
    assert bench.weight_bytes(model) == every
    for batch in (1, 3):
        assert bench.step_weight_bytes(model, batch) == every - (vocab - batch) * hidden * 4
    config = bench.transformers.Qwen2Config(**bench.SHAPES["tiny"], tie_word_embeddings=True)
    hf = bench.transformers.AutoModelForCausalLM.from_config(config)
    tied = gkv_ext.Model.from_tensors(gkv_ext.ModelConfig.from_json(config.to_json_string()),
                                      dict(hf.state_dict()))
    assert bench.step_weight_bytes(tied, 3) == sum(p.numel() * 4 for p in hf.parameters())


def test_bench_hf_quick(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench_hf"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RANDOM weights" in run.stdout and "| gkv_tok_s |" in run.stdout
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["random_weights"] is True
    rows = results["rows"]
    assert [(r["B"], r["new_tokens"]) for r in rows] == [(1, 48), (1, 96), (2, 48), (2, 96)]
    for r in rows:
        assert r["plain_tok_s"] > 0 and r["gkv_tok_s"] > 0
        # The compressed cache holds budget + D = 32 slots; the plain one every token.
        assert r["gkv_kv_MB"] < r["plain_kv_MB"]
    for short, long in (rows[:2], rows[2:]):  # 48 tokens: the first part of the 96-token run
        assert short["gkv_kv_MB"] == long["gkv_kv_MB"]
        for side in ("plain", "gkv"):
            seconds = [r["B"] * r["new_tokens"] / r[f"{side}_tok_s"] for r in (short, long)]
            assert 0 < seconds[0] < seconds[1]
    assert out.with_suffix(".png").stat().st_size > 0

    # --merge: one table and plot from several runs' JSON files
    merged = tmp_path / "merged"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--merge",
                          str(out.with_suffix(".json")), str(out.with_suffix(".json")),
                          "--out", str(merged)], capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(merged.with_suffix(".json").read_text())["rows"] == rows + rows
    assert merged.with_suffix(".png").stat().st_size > 0


def test_bench_hf_plain_integrated(tmp_path):
    """--plain integrate: gkv generates for real, plain's tokens/s comes from its step time at
    several cache lengths; it is finite, and its peak memory is marked as not measured."""
    pytest.importorskip("transformers")
    out = tmp_path / "integrated"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--quick",
                          "--batches", "2", "--new-tokens", "64", "--plain", "integrate",
                          "--samples", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "integrated from its step time at 3 cache lengths" in run.stdout
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert 0 < row["plain_tok_s"] < float("inf") and row["gkv_tok_s"] > 0
    assert row["plain_peak_MB"] != row["plain_peak_MB"]  # NaN: not measured
    # The step times it integrated, at 3 cache lengths up to the generation's end.
    assert [int(x) for x in row["plain_step_ms"]] == [16 + 21, 16 + 42, 16 + 64]
    assert all(ms > 0 for ms in row["plain_step_ms"].values())
    assert list(row["plain_step_allocs"]) == list(row["plain_step_ms"])  # counted per length
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--quick",
                          "--plain", "integrate", "--context", "64"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert bad.returncode != 0 and "--plain integrate is for generated lengths" in bad.stderr


def test_bench_hf_bad_arguments_exit_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hf.py"), "--quick",
                          "--batches", "0", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "bench_hf: batches, new tokens, budget, prompt and samples must be >= 1"]


def test_bench_gemms_quick(tmp_path):
    out = tmp_path / "gemms"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gemms.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    libraries = (["cublas", "cublaslt", "gkv", "tuned"] if torch.cuda.is_available()
                 else ["default", "gkv", "tuned"])
    assert [(r["proj"], r["B"], r["library"]) for r in result["rows"]] == [
        ("tiny", b, library) for b in (1, 4) for library in libraries]
    assert all(r["us"] > 0 and r["TBps"] > 0 for r in result["rows"])
    assert "| tiny | 4 | 256 | 128 |" in run.stdout


def test_bench_gemms_bad_batches_exit_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gemms.py"), "--batches",
                          "0", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].endswith("batches must be >= 1, got [0]")
