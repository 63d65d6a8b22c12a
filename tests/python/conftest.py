"""Shared test grids, tolerances and helpers for the op tests.

Every op is checked three ways: its CPU kernel against a dense PyTorch formula written in the
test, its CUDA kernel against the CPU kernel (over the grids below, skipped without a GPU), and
torch.library.opcheck on one grid point.
"""
import os
import zlib
from pathlib import Path

import pytest
import torch

import gkv_ext  # noqa: F401  (registers torch.ops.gkv)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [8, 64, 128]  # 8 is the real stories260K model's head size
HEAD_PAIRS = [(8, 8), (12, 2), (28, 4), (32, 8)]  # (Hq, Hkv): G = 1, 6, 7, 4
GQA_GROUPS = [1, 4, 7, 8]
LENGTHS = [1, 17, 97, 300]  # not multiples of any tile size

# Tolerances (atol, rtol) of a CUDA kernel against the CPU oracle, by input dtype. Both accumulate
# in fp32; the low-precision rows allow for one rounding of the output and of intermediate
# probabilities (bf16 has 8 mantissa bits: 2^-8 ~ 4e-3).
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

CUDA = torch.cuda.is_available() and gkv_ext.built_with_cuda
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build of gkv_ext")


def tolerance(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def linear_inputs(rows, n, k, dtype, device="cpu", bias=True, seed=0, leading=()):
    """x [*leading, rows, k] (scaled so that x @ w.T stays O(1)), w [n, k] and b [n] (or None),
    from a seeded CPU generator, then moved to device and dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, rows, k, generator=gen) / k**0.5
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return move(x), move(w), move(b)


def left_padded_pos(batch, heads, n, pads, device="cpu"):
    """pos [B, Hkv, N] int32: row b has pads[b] empty slots (-1) on the left, then 0, 1, ..."""
    pos = torch.arange(n, dtype=torch.int32, device=device).expand(batch, heads, n).clone()
    for b, p in enumerate(pads):
        pos[b, :, :p] = -1
        pos[b, :, p:] -= p
    return pos


def poison_(t):
    """Fills a buffer with NaN (or a sentinel for integers) so unwritten outputs show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-7)


def shared_dir() -> Path:
    """The real models and data (../shared beside the checkout; ./shared inside it on machines
    where it is carried along, such as the GPU machine)."""
    root = Path(__file__).resolve().parents[2]
    inside = root / "shared"
    return inside if inside.is_dir() else root.parent / "shared"


def pytest_configure(config):
    # Under pytest-xdist every worker would start one ATen thread per core (14 workers on 16
    # cores: over 200 threads), so the CPU oracles share the cores instead of fighting for them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N shards of the tests (0 <= I < N), so that a "
                          "suite too long for one run can be split over several")


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if spec is None:
        return
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard must be I/N with 0 <= I < N, got {spec!r}")
    # A hash of the test's id, stable across processes (xdist workers collect on their own).
    keep = [item for item in items if zlib.crc32(item.nodeid.encode()) % count == index]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
