"""The suite's --shard I/N option (conftest.py): the shards of a file are disjoint and together
hold every test, so a GPU suite split over several runs leaves none out."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def collected(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/python/test_cache.py", *args],
                         capture_output=True, text=True, cwd=ROOT)
    return out.returncode, {line for line in out.stdout.splitlines() if "::" in line}, out.stderr


def test_shards_are_disjoint_and_cover_the_suite():
    rc, everything, err = collected()
    assert rc == 0 and len(everything) > 10, err
    shards = [collected("--shard", f"{i}/3")[1] for i in range(3)]
    assert all(shards) and sum(map(len, shards)) == len(everything)
    assert set().union(*shards) == everything


@pytest.mark.parametrize("spec", ["3/3", "-1/2", "a/b"])
def test_a_bad_shard_is_a_usage_error(spec):
    rc, _, err = collected(f"--shard={spec}")
    assert rc == 4 and f"--shard must be I/N with 0 <= I < N, got '{spec}'" in err
