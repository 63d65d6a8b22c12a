"""gkv::select_keep: CPU oracle vs a per-head Python reference, CUDA vs CPU (exact: the order is
total), opcheck, bad inputs. Scores have many ties, -inf, NaN and signed zeros."""
import math

import pytest
import torch

from conftest import CUDA, requires_cuda

KINDS = ["normal", "ties", "specials", "all_equal", "all_neg_inf"]


def make_score(b, h, m, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(b, h, m, generator=gen)
    if kind == "ties":
        return torch.randint(0, 4, (b, h, m), generator=gen).float()
    if kind == "specials":
        s = torch.randint(-2, 3, (b, h, m), generator=gen).float()
        r = torch.rand(b, h, m, generator=gen)
        s[r < 0.15] = float("-inf")
        s[(r >= 0.15) & (r < 0.3)] = float("nan")
        s[(r >= 0.3) & (r < 0.4)] = -0.0
        s[(r >= 0.4) & (r < 0.45)] = float("inf")
        return s
    if kind == "all_equal":
        return torch.full((b, h, m), 0.25)
    return torch.full((b, h, m), float("-inf"))


def reference(score, keep, window):
    """Per head: order by (score desc, slot desc) with NaN as -inf, take `keep`, sort ascending."""
    b, h, m = score.shape
    out = torch.empty(b, h, keep + window, dtype=torch.int64)
    for i in range(b):
        for j in range(h):
            vals = [(-math.inf if math.isnan(v) else v) for v in score[i, j].tolist()]
            order = sorted(range(m), key=lambda t: (vals[t], t), reverse=True)
            out[i, j] = torch.tensor(sorted(order[:keep]) + list(range(m, m + window)),
                                     dtype=torch.int64)
    return out


def keeps(m):
    return sorted({0, 1, m // 2, max(m - 1, 0), m} & set(range(m + 1)))


@pytest.mark.parametrize("m", [1, 17, 97, 300])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [0, 16])
def test_cpu_matches_reference(m, kind, window):
    score = make_score(2, 3, m, kind, seed=m)
    for keep in keeps(m):
        idx = torch.ops.gkv.select_keep(score, keep, window)
        assert idx.dtype == torch.int64 and idx.shape == (2, 3, keep + window)
        assert torch.equal(idx, reference(score, keep, window)), (keep, window)


def test_ties_go_to_later_slot_and_nan_last():
    score = torch.tensor([[[1.0, float("nan"), 1.0, float("-inf"), 0.0, -0.0, 1.0]]])
    assert torch.ops.gkv.select_keep(score, 2, 0).tolist() == [[[2, 6]]]
    # 0.0 and -0.0 are equal: the later slot wins.
    assert torch.ops.gkv.select_keep(score, 4, 1).tolist() == [[[0, 2, 5, 6, 7]]]
    # -inf and NaN are equal last resorts: the later one (slot 3) first.
    assert torch.ops.gkv.select_keep(score, 6, 0).tolist() == [[[0, 2, 3, 4, 5, 6]]]


def test_empty_candidates():
    idx = torch.ops.gkv.select_keep(torch.empty(2, 1, 0), 0, 3)
    assert idx.tolist() == [[[0, 1, 2]], [[0, 1, 2]]]


@requires_cuda
@pytest.mark.parametrize("m", [1, 17, 97, 300, 2049, 2160, 4111, 33000])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [0, 16])
def test_cuda_matches_cpu(m, kind, window):
    score = make_score(2, 4, m, kind, seed=m + 1)
    for keep in keeps(m) + [min(m, 2032)]:
        expected = torch.ops.gkv.select_keep(score, keep, window)
        got = torch.ops.gkv.select_keep(score.cuda(), keep, window)
        assert torch.equal(got.cpu(), expected), (keep, window)


@requires_cuda
def test_cuda_empty_candidates():
    idx = torch.ops.gkv.select_keep(torch.empty(2, 1, 0, device="cuda"), 0, 3)
    assert idx.cpu().tolist() == [[[0, 1, 2]], [[0, 1, 2]]]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_opcheck(device):
    score = make_score(2, 3, 97, "ties", seed=0).to(device)
    torch.library.opcheck(torch.ops.gkv.select_keep.default, (score, 40, 16))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("case, match", [
    ("rank", r"score must have shape \[B, Hkv, M\] \(rank 3\)"),
    ("dtype_double", r"score must be Float, got Double"),
    ("dtype_half", r"score must be Float, got Half"),
    ("keep_big", r"keep must be in \[0, M = 10\], got 11"),
    ("keep_negative", r"keep must be in \[0, M = 10\], got -1"),
    ("window_negative", r"window must be >= 0, got -2"),
])
def test_bad_inputs(device, case, match):
    score, keep, window = torch.randn(2, 3, 10), 4, 2
    if case == "rank":
        score = score[0]
    elif case == "dtype_double":
        score = score.double()
    elif case == "dtype_half":
        score = score.half()
    elif case == "keep_big":
        keep = 11
    elif case == "keep_negative":
        keep = -1
    elif case == "window_negative":
        window = -2
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gkv.select_keep(score.to(device), keep, window)
