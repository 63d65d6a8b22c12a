"""The README's main command (scripts/bench_ops.py --quick) runs end to end on this machine and
writes its table, JSON and plot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ops_quick(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ops.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "### decode_attention" in run.stdout and "### compression" in run.stdout
    results = json.loads(out.with_suffix(".json").read_text())
    for section in ("decode_attention", "lifetime_attention", "compression"):
        assert results[section], section
        assert all(v == v for row in results[section] for k, v in row.items()
                   if k.startswith("gkv") and k.endswith("_ms")), section  # no NaN timings
    assert out.with_suffix(".png").stat().st_size > 0
