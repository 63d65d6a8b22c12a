"""gkv::redundancy_scores: CPU oracle vs a dense formula, CUDA vs CPU, opcheck, bad inputs.

Random keys in d >= 64 almost never reach the 0.5 threshold, so the keys here are built from
planted clusters (cosine ~0.9 inside a cluster, far from the threshold across clusters) and every
draw is checked to keep all similarities at least MARGIN away from the threshold: a comparison
c_ij > threshold must not flip between two correct implementations that round differently.
"""
import pytest
import torch

from conftest import CUDA, DTYPES, HEAD_DIMS, LENGTHS, left_padded_pos, requires_cuda, tolerance

THRESHOLDS = [0.5, 0.99, -1.0]
PADDINGS = ["none", "left", "scattered"]
MARGIN = 0.005
BATCH, HEADS = 2, 3


def unit_cos(k):
    kf = k.double()
    khat = kf / (kf.norm(dim=-1, keepdim=True) + 1e-6)
    return khat @ khat.transpose(-1, -2)


def make_pos(n, padding, gen):
    if padding == "none":
        return left_padded_pos(BATCH, HEADS, n, [0] * BATCH)
    if padding == "left":
        return left_padded_pos(BATCH, HEADS, n, [n // 3, min(n, 5)])
    pos = left_padded_pos(BATCH, HEADS, n, [0] * BATCH)
    pos[torch.rand(BATCH, HEADS, n, generator=gen) < 0.3] = -1
    pos[-1, -1] = -1  # one head with no valid slot at all: all zeros
    return pos


def clustered_keys(n, d, dtype, threshold, seed):
    """[B, H, N, d] keys s * u_a + 0.5 * v_m (+ a little noise), times a random norm.

    u_a, v_m are orthonormal (cluster directions and offsets), s = +-1. Cosines then sit near
    1 (same a, s, m: near-duplicates), 0.8, 0.6 (same cluster), 0.2, 0 (other clusters) and their
    negatives (never -1), so thresholds 0.5, 0.99 and -1.0 all have a margin.
    """
    for attempt in range(20):
        gen = torch.Generator().manual_seed(seed * 100 + attempt)
        n_dirs = min(d // 2, max(2, n // 8))
        n_offsets = min(d - n_dirs, 6)
        basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].T
        a = torch.randint(0, n_dirs, (BATCH, HEADS, n), generator=gen)
        m = torch.randint(0, n_offsets, (BATCH, HEADS, n), generator=gen) + n_dirs
        s = torch.randint(0, 2, (BATCH, HEADS, n, 1), generator=gen) * 2.0 - 1.0
        noise = torch.randn(BATCH, HEADS, n, d, generator=gen, dtype=torch.float64) / d ** 0.5
        norm = torch.rand(BATCH, HEADS, n, 1, generator=gen, dtype=torch.float64) * 2.5 + 0.5
        k = ((s * basis[a] + 0.5 * basis[m] + 0.01 * noise) * norm).to(dtype)
        c = unit_cos(k)
        off = ~torch.eye(n, dtype=torch.bool)
        if n == 1 or (c[..., off] - threshold).abs().min() > MARGIN:
            return k
    raise AssertionError("could not draw keys away from the threshold")


def reference(k, pos, threshold):
    """R from the formula of reference section 2.2, one column at a time, in float64."""
    B, H, N, _ = k.shape
    out = torch.zeros(B, H, N, dtype=torch.float64)
    c_all = unit_cos(k)
    for b in range(B):
        for h in range(H):
            valid = pos[b, h] >= 0
            n_valid = int(valid.sum())
            if n_valid == 0:
                continue
            c = c_all[b, h].clone()
            c.fill_diagonal_(0)
            raw = (c * valid).sum(1)
            for j in valid.nonzero().flatten().tolist():
                rows = ((c[:, j] > threshold) & valid).nonzero().flatten()
                if len(rows):
                    i = int(rows.max())
                    raw[i] -= c[i, j]
            out[b, h, valid] = torch.softmax(raw[valid] / n_valid, 0)
    return out


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_cpu_matches_formula(n, d, padding, threshold):
    k = clustered_keys(n, d, torch.float32, threshold, seed=n * 7 + d)
    pos = make_pos(n, padding, torch.Generator().manual_seed(n))
    r = torch.ops.gkv.redundancy_scores(k, pos, threshold)
    assert r.dtype == torch.float32 and r.shape == pos.shape
    torch.testing.assert_close(r.double(), reference(k, pos, threshold), atol=1e-6, rtol=1e-5)
    valid = pos >= 0
    assert (r[~valid] == 0).all()
    sums = r.double().sum(-1)
    torch.testing.assert_close(sums, valid.any(-1).double(), atol=1e-5, rtol=0)


def test_latest_copy_exempted():
    # Three copies a < b < c of one key and an orthogonal key: R_raw = [2, 1, 0, 0], so the
    # newest copy is the least redundant (R-KV's "retain last").
    k = torch.zeros(1, 1, 4, 8)
    k[0, 0, :3, 0] = torch.tensor([1.0, 2.0, 3.0])
    k[0, 0, 3, 1] = 1.0
    pos = torch.arange(4, dtype=torch.int32).view(1, 1, 4)
    r = torch.ops.gkv.redundancy_scores(k, pos)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 0.0]) / 4, 0)
    torch.testing.assert_close(r[0, 0], expected)


def test_low_precision_cpu_reads_stored_values():
    k = clustered_keys(97, 64, torch.bfloat16, 0.5, seed=3)
    pos = make_pos(97, "scattered", torch.Generator().manual_seed(1))
    r = torch.ops.gkv.redundancy_scores(k, pos, 0.5)
    torch.testing.assert_close(r.double(), reference(k, pos, 0.5), atol=1e-6, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("n", LENGTHS + [1100])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_cuda_matches_cpu(dtype, d, n, padding, threshold):
    k = clustered_keys(n, d, dtype, threshold, seed=n + d)
    pos = make_pos(n, padding, torch.Generator().manual_seed(n + 1))
    expected = torch.ops.gkv.redundancy_scores(k, pos, threshold)
    got = torch.ops.gkv.redundancy_scores(k.cuda(), pos.cuda(), threshold)
    # Float32 tolerance for every dtype: both sides take the dot products of the stored values
    # with fp32 accumulation (the CUDA kernel scales raw-key dots by the inverse norms), so the
    # only differences are fp32 summation order.
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))
    assert torch.isfinite(got).all()


def test_opcheck_cpu():
    k = clustered_keys(17, 8, torch.float32, 0.5, seed=0)
    pos = make_pos(17, "scattered", torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.gkv.redundancy_scores.default, (k, pos, 0.5))


@requires_cuda
def test_opcheck_cuda():
    k = clustered_keys(97, 64, torch.bfloat16, 0.5, seed=0).cuda()
    pos = make_pos(97, "left", torch.Generator().manual_seed(0)).cuda()
    torch.library.opcheck(torch.ops.gkv.redundancy_scores.default, (k, pos, 0.5))


def _good():
    return torch.randn(2, 3, 5, 8), torch.zeros(2, 3, 5, dtype=torch.int32)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("case, match", [
    ("k_rank", r"k must have shape \[B, Hkv, N, d\] \(rank 4\)"),
    ("pos_rank", r"pos must have shape \[B, Hkv, N\] \(rank 3\)"),
    ("k_dtype", r"k must be float32, bfloat16 or float16, got Double"),
    ("pos_dtype", r"pos must be Int, got Long"),
    ("pos_batch", r"pos.size\(0\) must be B of k"),
    ("pos_heads", r"pos.size\(1\) must be Hkv of k"),
    ("pos_len", r"pos.size\(2\) must be N of k"),
    ("nan_threshold", r"threshold must not be NaN"),
])
def test_bad_inputs(device, case, match):
    k, pos = _good()
    threshold = 0.5
    if case == "k_rank":
        k = k[0]
    elif case == "pos_rank":
        pos = pos[..., None]
    elif case == "k_dtype":
        k = k.double()
    elif case == "pos_dtype":
        pos = pos.long()
    elif case == "pos_batch":
        pos = pos[:1]
    elif case == "pos_heads":
        pos = pos[:, :2]
    elif case == "pos_len":
        pos = pos[..., :4]
    elif case == "nan_threshold":
        threshold = float("nan")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gkv.redundancy_scores(k.to(device), pos.to(device), threshold)


@requires_cuda
def test_bad_device_mix():
    k, pos = _good()
    with pytest.raises(RuntimeError, match="all tensors must share one device"):
        torch.ops.gkv.redundancy_scores(k.cuda(), pos, 0.5)
