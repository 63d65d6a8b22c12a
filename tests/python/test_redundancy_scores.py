"""gkv::redundancy_scores and redundancy_scores_carry: CPU oracle vs a dense formula, CUDA vs
CPU (with exemptions carried through a compaction), opcheck, bad inputs.

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


def reference(k, pos, threshold, exempt=None):
    """R from the formula of reference section 2.2, one column at a time, in float64; fills
    exempt [B, H, N] (when given) with each column's m*(j), -1 for none and at empty slots."""
    B, H, N, _ = k.shape
    out = torch.zeros(B, H, N, dtype=torch.float64)
    if exempt is not None:
        exempt.fill_(-1)
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
                    if exempt is not None:
                        exempt[b, h, j] = i
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


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_carry_cpu_returns_exemptions(n, padding):
    k = clustered_keys(n, 16, torch.float32, 0.5, seed=n)
    pos = make_pos(n, padding, torch.Generator().manual_seed(n))
    exempt = torch.empty(pos.shape, dtype=torch.int32)
    expected = reference(k, pos, 0.5, exempt)
    # The CPU oracle scans every row whatever is carried.
    carried = torch.full((BATCH, HEADS, n // 2), -2, dtype=torch.int32)
    r, got = torch.ops.gkv.redundancy_scores_carry(k, pos, carried, 0.5)
    torch.testing.assert_close(r.double(), expected, atol=1e-6, rtol=1e-5)
    assert got.dtype == torch.int32 and torch.equal(got, exempt)
    torch.testing.assert_close(r, torch.ops.gkv.redundancy_scores(k, pos, 0.5), atol=0, rtol=0)


def carry_through_compaction(exempt, idx):
    """The kept slots' exemptions among the kept slots, renumbered; -2 where the slot named was
    evicted (what CompressedKVCache carries to its next compression)."""
    renumber = torch.full(exempt.shape, -2, dtype=torch.int32)
    ranks = torch.arange(idx.shape[-1], dtype=torch.int32).expand(idx.shape).contiguous()
    renumber.scatter_(2, idx, ranks)
    kept = exempt.gather(2, idx)
    return torch.where(kept >= 0, renumber.gather(2, kept.clamp(min=0).long()), kept)


def compacted_then_extended(n0, kept, fresh, d, dtype, threshold, padding, seed):
    """A cache of n0 slots scored, `kept` of them kept (a random sorted subset per head), then
    `fresh` new slots: -> (k, pos, carried) of the kept + fresh slots."""
    total = n0 + fresh
    pool = clustered_keys(total, d, dtype, threshold, seed=seed)
    pos_pool = make_pos(total, padding, torch.Generator().manual_seed(seed))
    _, exempt = torch.ops.gkv.redundancy_scores_carry(
        pool[:, :, :n0], pos_pool[:, :, :n0], torch.empty(BATCH, HEADS, 0, dtype=torch.int32),
        threshold)
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.rand(BATCH, HEADS, n0, generator=gen).argsort(-1)[..., :kept].sort(-1).values
    carried = carry_through_compaction(exempt, idx)
    k = torch.cat([pool[:, :, :n0].gather(2, idx[..., None].expand(-1, -1, -1, d)),
                   pool[:, :, n0:]], 2)
    pos = torch.cat([pos_pool[:, :, :n0].gather(2, idx), pos_pool[:, :, n0:]], 2)
    return k, pos, carried


# (scored, kept, fresh): fresh rows in one or several row blocks, carried slots not on a tile
# edge, one fresh slot, and the benchmark's G-KV compression (budget 2048, divide_length 128).
CARRY_SHAPES = [(40, 20, 13), (300, 170, 200), (130, 129, 1), (200, 64, 64)]


def test_carried_exemptions_hold_among_kept_slots():
    # What is carried (where not -2) is the exemption the kept slots have among themselves.
    for n0, kept, fresh in CARRY_SHAPES:
        k, pos, carried = compacted_then_extended(n0, kept, fresh, 16, torch.float32, 0.5, "left",
                                                  seed=n0)
        _, alone = torch.ops.gkv.redundancy_scores_carry(
            k[:, :, :kept], pos[:, :, :kept], torch.empty(BATCH, HEADS, 0, dtype=torch.int32), 0.5)
        known = carried != -2
        assert torch.equal(carried[known], alone[known])
        assert (carried == -2).any() and (carried >= 0).any()  # both paths are exercised


def assert_carry_cuda_matches_cpu(k, pos, carried, threshold, cuda_carried=None):
    """R and m* of the CUDA kernels (given cuda_carried, else carried) equal the CPU oracle's:
    R to fp32 rounding, m* exactly (the keys keep every c away from the threshold)."""
    expected_r, expected_ex = torch.ops.gkv.redundancy_scores_carry(k, pos, carried, threshold)
    cuda_carried = carried if cuda_carried is None else cuda_carried
    got_r, got_ex = torch.ops.gkv.redundancy_scores_carry(k.cuda(), pos.cuda(), cuda_carried.cuda(),
                                                          threshold)
    torch.testing.assert_close(got_r.cpu(), expected_r, **tolerance(torch.float32))
    assert torch.equal(got_ex.cpu(), expected_ex)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", CARRY_SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("threshold", [0.5, -1.0])
def test_cuda_carry_matches_cpu(dtype, d, shape, padding, threshold):
    n0, kept, fresh = shape
    k, pos, carried = compacted_then_extended(n0, kept, fresh, d, dtype, threshold, padding,
                                              seed=n0 + d)
    assert_carry_cuda_matches_cpu(k, pos, carried, threshold)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [0.5, -1.0])
def test_cuda_carry_matches_cpu_long(dtype, threshold):
    k, pos, carried = compacted_then_extended(2176, 2048, 128, 128, dtype, threshold, "none",
                                              seed=7)
    assert_carry_cuda_matches_cpu(k, pos, carried, threshold)


@requires_cuda
def test_cuda_carry_rescans_what_it_cannot_use():
    # Out-of-range, self-naming and empty-slot exemptions are unknown: those slots are scanned.
    k, pos, carried = compacted_then_extended(300, 170, 200, 64, torch.bfloat16, 0.5, "scattered",
                                              seed=2)
    gen = torch.Generator().manual_seed(3)
    junk = carried.clone()
    pick = torch.rand(junk.shape, generator=gen)
    junk[pick < 0.2] = 10 ** 6
    junk[(pick >= 0.2) & (pick < 0.4)] = -7
    self_slot = torch.arange(junk.shape[-1], dtype=torch.int32).expand(junk.shape)
    junk = torch.where((pick >= 0.4) & (pick < 0.5), self_slot, junk)
    empty = pos[..., :junk.shape[-1]] < 0
    first_empty = empty.int().argmax(-1, keepdim=True).int().expand(junk.shape)
    at_empty = (pick >= 0.5) & (pick < 0.6) & empty.any(-1, keepdim=True)
    junk = torch.where(at_empty, first_empty, junk)
    assert (junk == first_empty).logical_and(empty.any(-1, keepdim=True)).any()
    assert_carry_cuda_matches_cpu(k, pos, carried, 0.5, cuda_carried=junk)


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


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padding", ["none", "scattered"])
@pytest.mark.parametrize("threshold", [0.5, -1.0])
def test_cuda_matches_cpu_long(dtype, padding, threshold):
    # The benchmark's compression length (N = 2176, d = 128): 34 column tiles, which the
    # tensor-core pass splits over several blocks per row tile (unevenly for some GPU sizes).
    n, d = 2176, 128
    k = clustered_keys(n, d, dtype, threshold, seed=5)
    pos = make_pos(n, padding, torch.Generator().manual_seed(5))
    expected = torch.ops.gkv.redundancy_scores(k, pos, threshold)
    got = torch.ops.gkv.redundancy_scores(k.cuda(), pos.cuda(), threshold)
    torch.testing.assert_close(got.cpu(), expected, **tolerance(torch.float32))


def test_opcheck_cpu():
    k = clustered_keys(17, 8, torch.float32, 0.5, seed=0)
    pos = make_pos(17, "scattered", torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.gkv.redundancy_scores.default, (k, pos, 0.5))


@requires_cuda
def test_opcheck_cuda():
    k = clustered_keys(97, 64, torch.bfloat16, 0.5, seed=0).cuda()
    pos = make_pos(97, "left", torch.Generator().manual_seed(0)).cuda()
    torch.library.opcheck(torch.ops.gkv.redundancy_scores.default, (k, pos, 0.5))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_opcheck_carry(device):
    k, pos, carried = compacted_then_extended(97, 50, 30, 64, torch.bfloat16, 0.5, "left", seed=0)
    torch.library.opcheck(torch.ops.gkv.redundancy_scores_carry.default,
                          (k.to(device), pos.to(device), carried.to(device), 0.5))


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
    ("carried_rank", r"carried must have shape \[B, Hkv, M\] \(rank 3\)"),
    ("carried_dtype", r"carried must be Int, got Long"),
    ("carried_batch", r"carried.size\(0\) must be B of k"),
    ("carried_heads", r"carried.size\(1\) must be Hkv of k"),
    ("carried_too_long", r"carried.size\(2\) = M must be <= N = 5, got 6"),
])
def test_bad_inputs(device, case, match):
    k, pos = _good()
    threshold = 0.5
    if case.startswith("carried_"):
        carried = torch.full((2, 3, 4), -2, dtype=torch.int32)
        carried = {"carried_rank": carried[0], "carried_dtype": carried.long(),
                   "carried_batch": carried[:1], "carried_heads": carried[:, :2],
                   "carried_too_long": torch.full((2, 3, 6), -2, dtype=torch.int32)}[case]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.gkv.redundancy_scores_carry(k.to(device), pos.to(device), carried.to(device),
                                                  threshold)
        return
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
