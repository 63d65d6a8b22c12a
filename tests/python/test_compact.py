"""gkv::compact_, gkv::write_slot_ and gkv::gather_tokens: CPU vs a direct indexing reference, CUDA
vs CPU (exact: both only move values), NaN poison past the live length, opcheck, gradcheck, bad
inputs."""
import pytest
import torch

from conftest import CUDA, DTYPES, HEAD_DIMS, LENGTHS, poison_, requires_cuda

B, H = 2, 3
IDX_KINDS = ["ascending", "permutation", "duplicates"]


def make_idx(c, k, kind, gen, live=None):
    """[B, H, K] int64 in [0, live or C): ascending subsets (as select_keep makes), any order, or
    with repeats."""
    live = c if live is None else live
    rows = []
    for _ in range(B * H):
        if kind == "duplicates":
            rows.append(torch.randint(0, live, (k,), generator=gen))
            continue
        pick = torch.randperm(live, generator=gen)[:k]
        rows.append(pick.sort().values if kind == "ascending" else pick)
    return torch.stack(rows).view(B, H, k)


def make_cache(c, d, dtype, gen, live=None):
    """k, v [B,H,C,d], pos [B,H,C] int32, score [B,H,C] fp32; slots >= live poisoned."""
    k = torch.randn(B, H, c, d, generator=gen).to(dtype)
    v = torch.randn(B, H, c, d, generator=gen).to(dtype)
    pos = torch.randperm(B * H * c, generator=gen).to(torch.int32).view(B, H, c)
    score = torch.randn(B, H, c, generator=gen)
    if live is not None:
        for t in (k, v, pos, score):
            poison_(t[:, :, live:])
    return k, v, pos, score


def reference_compact(tensors, idx):
    out = []
    k_len = idx.shape[-1]
    for t in tensors:
        new = t.clone()
        for b in range(B):
            for h in range(H):
                new[b, h, :k_len] = t[b, h, idx[b, h]]
        out.append(new)
    return out


def assert_same(a, b):
    # Values are only moved, never computed: exact, NaN where NaN.
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("c", LENGTHS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("kind", IDX_KINDS)
def test_compact_cpu_matches_reference(c, d, kind):
    gen = torch.Generator().manual_seed(c * 10 + d)
    cache = make_cache(c, d, torch.float32, gen)
    for k_len in sorted({0, 1, c // 2, c}):
        idx = make_idx(c, k_len, kind, gen)
        expected = reference_compact(cache, idx)
        got = [t.clone() for t in cache]
        torch.ops.gkv.compact_(*got, idx)
        for g, e in zip(got, expected):
            assert_same(g, e)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_compact_poison_not_copied(device):
    gen = torch.Generator().manual_seed(0)
    c, live, keep = 97, 60, 40
    cache = [t.to(device) for t in make_cache(c, 64, torch.bfloat16, gen, live=live)]
    idx = make_idx(c, keep, "ascending", gen, live=live).to(device)
    torch.ops.gkv.compact_(*cache, idx)
    k, v, pos, score = cache
    for t in (k, v, score):
        assert torch.isfinite(t[:, :, :keep].float()).all()
        assert torch.isnan(t[:, :, live:].float()).all()  # slots >= K untouched
    assert (pos[:, :, :keep] >= 0).all() and (pos[:, :, live:] == -7).all()


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("c", LENGTHS + [2176])
@pytest.mark.parametrize("kind", IDX_KINDS)
def test_compact_cuda_matches_cpu(dtype, d, c, kind):
    gen = torch.Generator().manual_seed(c + d)
    live = max(1, c - 7)
    cache = make_cache(c, d, dtype, gen, live=live)
    for k_len in sorted({0, 1, live // 2, live - 1, live}):
        idx = make_idx(c, k_len, kind, gen, live=live)
        expected = [t.clone() for t in cache]
        torch.ops.gkv.compact_(*expected, idx)
        got = [t.cuda() for t in cache]
        torch.ops.gkv.compact_(*got, idx.cuda())
        for g, e in zip(got, expected):
            assert_same(g.cpu(), e)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_compact_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    cache = [t.to(device) for t in make_cache(17, 8, torch.float32, gen)]
    idx = make_idx(17, 9, "ascending", gen).to(device)
    torch.library.opcheck(torch.ops.gkv.compact_.default, (*cache, idx))


def _good_compact():
    gen = torch.Generator().manual_seed(2)
    return [*make_cache(10, 8, torch.float32, gen), make_idx(10, 6, "ascending", gen)]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("case, match", [
    ("k_rank", r"k_cache must have shape \[B, Hkv, C, d\] \(rank 4\)"),
    ("k_dtype", r"k_cache must be float32, bfloat16 or float16, got Double"),
    ("v_dtype", r"v_cache must have the dtype of k_cache"),
    ("v_shape", r"v_cache.size\(3\) must be the same dim of k_cache"),
    ("pos_dtype", r"pos must be Int, got Long"),
    ("pos_shape", r"pos.size\(2\) must be C of k_cache"),
    ("score_dtype", r"score must be Float, got BFloat16"),
    ("score_shape", r"score.size\(1\) must be Hkv of k_cache"),
    ("idx_dtype", r"idx must be Long, got Int"),
    ("idx_shape", r"idx.size\(0\) must be B of k_cache"),
    ("k_too_big", r"idx.size\(2\) = K must be <= C = 10, got 11"),
    ("idx_high", r"idx must be in \[0, C = 10\), got values in \[0, 10\]"),
    ("idx_negative", r"idx must be in \[0, C = 10\), got values in \[-1, "),
    ("k_noncontig", r"k_cache must be contiguous"),
    ("pos_noncontig", r"pos must be contiguous"),
    ("score_noncontig", r"score must be contiguous"),
])
def test_compact_bad_inputs(device, case, match):
    k, v, pos, score, idx = _good_compact()
    if case == "k_rank":
        k = k[0]
    elif case == "k_dtype":
        k, v = k.double(), v.double()
    elif case == "v_dtype":
        v = v.half()
    elif case == "v_shape":
        v = v[..., :4].contiguous()
    elif case == "pos_dtype":
        pos = pos.long()
    elif case == "pos_shape":
        pos = pos[..., :9].contiguous()
    elif case == "score_dtype":
        score = score.bfloat16()
    elif case == "score_shape":
        score = score[:, :2].contiguous()
    elif case == "idx_dtype":
        idx = idx.int()
    elif case == "idx_shape":
        idx = idx[:1]
    elif case == "k_too_big":
        idx = torch.zeros(2, 3, 11, dtype=torch.int64)
    elif case == "idx_high":
        idx[1, 2, 3] = 10
    elif case == "idx_negative":
        idx[0, 1, 0] = -1
    elif case == "k_noncontig":
        k = k.transpose(0, 1).contiguous().transpose(0, 1)
    elif case == "pos_noncontig":
        pos = pos.transpose(0, 1).contiguous().transpose(0, 1)
    elif case == "score_noncontig":
        score = score.transpose(0, 1).contiguous().transpose(0, 1)
    args = [t.to(device) for t in (k, v, pos, score, idx)]
    before = [t.clone() for t in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gkv.compact_(*args)
    for t, b in zip(args, before):  # a rejected call leaves the cache as it was
        assert_same(t, b)


# ---------------------------------------------------------------------------------------------
# write_slot_

HQ, W = 7, 4  # query heads and window of the query ring in the write_slot_ tests


def token_rows(d, dtype, gen, joint=False):
    """k, v [B,H,d], new_pos [B,H] int32, q [B,HQ,d] as the decoder hands them over: slices of
    one joint projection output (batch stride over all heads) when joint, else contiguous."""
    if joint:
        qkv = torch.randn(B, HQ + 2 * H + 1, d, generator=gen).to(dtype)
        q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + H], qkv[:, HQ + H + 1:]
    else:
        q = torch.randn(B, HQ, d, generator=gen).to(dtype)
        k, v = (torch.randn(B, H, d, generator=gen).to(dtype) for _ in range(2))
    return k, v, torch.randint(0, 10_000, (B, H), generator=gen, dtype=torch.int32), q


def reference_write_slot(k_cache, v_cache, pos, k, v, new_pos, slot):
    out = [t.clone() for t in (k_cache, v_cache, pos)]
    for t, new in zip(out, (k, v, new_pos)):
        t[:, :, slot] = new
    return out


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS + [24])
@pytest.mark.parametrize("joint", [False, True])
def test_write_slot_writes_one_slot(device, dtype, d, joint):
    gen = torch.Generator().manual_seed(d)
    for c in (1, 17, 2176):
        k_cache, v_cache, pos, _ = make_cache(c, d, dtype, gen)
        ring = poison_(torch.empty(B, HQ, W, d, dtype=dtype))
        k, v, new_pos, q = token_rows(d, dtype, gen, joint)
        for slot in {0, c // 2, c - 1}:
            expected = reference_write_slot(k_cache, v_cache, pos, k, v, new_pos, slot)
            got = [t.to(device) for t in (k_cache, v_cache, pos)]
            rows = [t.to(device) for t in (k, v, new_pos)]
            torch.ops.gkv.write_slot_(*got, *rows, torch.tensor([slot], device=device))
            for g, e in zip(got, expected):
                assert_same(g.cpu(), e)
            # With the query ring: the same cache writes, and q at ring_slot.
            ring_slot = slot % W
            expected_ring = ring.clone()
            expected_ring[:, :, ring_slot] = q
            got = [t.to(device) for t in (k_cache, v_cache, pos, ring)]
            torch.ops.gkv.write_slot_(*got[:3], *rows, torch.tensor([slot], device=device),
                                      got[3], q.to(device), torch.tensor(ring_slot, device=device))
            for g, e in zip(got, expected + [expected_ring]):
                assert_same(g.cpu(), e)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_write_slot_opcheck(device):
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, pos, _ = (t.to(device) for t in make_cache(17, 8, torch.float32, gen))
    k, v, new_pos, q = (t.to(device) for t in token_rows(8, torch.float32, gen))
    slot = torch.tensor(5, device=device)
    torch.library.opcheck(torch.ops.gkv.write_slot_.default,
                          (k_cache, v_cache, pos, k, v, new_pos, slot))
    ring = torch.zeros(B, HQ, W, 8, device=device)
    torch.library.opcheck(torch.ops.gkv.write_slot_.default,
                          (k_cache, v_cache, pos, k, v, new_pos, slot, ring, q,
                           torch.tensor([3], device=device)))


@requires_cuda
def test_write_slot_cuda_slot_out_of_range_writes_nothing():
    gen = torch.Generator().manual_seed(4)
    cache = [t.cuda() for t in make_cache(17, 8, torch.bfloat16, gen)[:3]]
    cache.append(torch.zeros(B, HQ, W, 8, dtype=torch.bfloat16, device="cuda"))  # the query ring
    k, v, new_pos, q = (t.cuda() for t in token_rows(8, torch.bfloat16, gen))
    before = [t.clone() for t in cache]
    for slot, ring_slot in ((-1, -1), (17, W)):
        torch.ops.gkv.write_slot_(*cache[:3], k, v, new_pos, torch.tensor([slot], device="cuda"),
                                  cache[3], q, torch.tensor([ring_slot], device="cuda"))
        for t, b in zip(cache, before):
            assert_same(t, b)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("case, match", [
    ("k_cache_dtype", r"k_cache must be float32, bfloat16 or float16, got Double"),
    ("v_cache_shape", r"v_cache.size\(2\) must be C of k_cache"),
    ("pos_dtype", r"pos must be Int, got Long"),
    ("k_shape", r"k must have shape \[B, Hkv, d\] \(rank 3\)"),
    ("v_dtype", r"v must have the dtype of k_cache"),
    ("v_heads", r"v.size\(1\) must be Hkv of k_cache"),
    ("new_pos_shape", r"new_pos.size\(0\) must be B of k_cache"),
    ("slot_dtype", r"slot must be Long, got Int"),
    ("slot_two", r"slot must hold one element"),
    ("pos_noncontig", r"pos must be contiguous"),
    ("ring_alone", r"q_ring, q and ring_slot go together"),
    ("ring_d", r"q_ring.size\(3\) must be d of k_cache"),
    ("q_heads", r"q.size\(1\) must be Hq of q_ring"),
    ("ring_slot_dtype", r"ring_slot must be Long, got Int"),
])
def test_write_slot_bad_inputs(device, case, match):
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, pos, _ = make_cache(10, 8, torch.float32, gen)
    k, v, new_pos, q = token_rows(8, torch.float32, gen)
    slot = torch.tensor([3])
    ring, ring_slot = torch.zeros(B, HQ, W, 8), torch.tensor([1])
    if case == "k_cache_dtype":
        k_cache, v_cache, k, v = (t.double() for t in (k_cache, v_cache, k, v))
    elif case == "v_cache_shape":
        v_cache = v_cache[:, :, :9].contiguous()
    elif case == "pos_dtype":
        pos = pos.long()
    elif case == "k_shape":
        k = k.unsqueeze(2)
    elif case == "v_dtype":
        v = v.half()
    elif case == "v_heads":
        v = v[:, :2]
    elif case == "new_pos_shape":
        new_pos = new_pos[:1]
    elif case == "slot_dtype":
        slot = slot.int()
    elif case == "slot_two":
        slot = torch.tensor([3, 4])
    elif case == "pos_noncontig":
        pos = pos.transpose(0, 1).contiguous().transpose(0, 1)
    elif case == "ring_alone":
        q = None
    elif case == "ring_d":
        ring = ring[..., :4]
    elif case == "q_heads":
        q = q[:, :3]
    elif case == "ring_slot_dtype":
        ring_slot = ring_slot.int()
    args = (k_cache, v_cache, pos, k, v, new_pos, slot, ring, q, ring_slot)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gkv.write_slot_(*(None if t is None else t.to(device) for t in args))


def test_write_slot_cpu_checks_the_slot():
    gen = torch.Generator().manual_seed(6)
    cache = make_cache(10, 8, torch.float32, gen)[:3]
    k, v, new_pos, q = token_rows(8, torch.float32, gen)
    for slot in (-1, 10):
        with pytest.raises(RuntimeError, match=r"slot must be in \[0, C = 10\)"):
            torch.ops.gkv.write_slot_(*cache, k, v, new_pos, torch.tensor([slot]))
    for ring_slot in (-1, W):
        with pytest.raises(RuntimeError, match=r"ring_slot must be in \[0, W = 4\)"):
            torch.ops.gkv.write_slot_(*cache, k, v, new_pos, torch.tensor([0]),
                                      torch.zeros(B, HQ, W, 8), q, torch.tensor([ring_slot]))


# ---------------------------------------------------------------------------------------------
# gather_tokens


def reference_gather(x, idx):
    return torch.stack([torch.stack([x[b, h, idx[b, h]] for h in range(x.shape[1])])
                        for b in range(x.shape[0])])


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("kind", IDX_KINDS)
def test_gather_cpu_matches_reference(n, d, kind):
    gen = torch.Generator().manual_seed(n + d)
    x = torch.randn(B, H, n, d, generator=gen)
    for k_len in sorted({0, 1, n // 2, n}):
        idx = make_idx(n, k_len, kind, gen)
        assert_same(torch.ops.gkv.gather_tokens(x, idx), reference_gather(x, idx))


def test_gather_k_larger_than_n():
    x = torch.randn(1, 2, 3, 8)
    idx = torch.randint(0, 3, (1, 2, 10))
    assert_same(torch.ops.gkv.gather_tokens(x, idx), reference_gather(x, idx))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("d", HEAD_DIMS + [24])
@pytest.mark.parametrize("n", LENGTHS + [2176])
@pytest.mark.parametrize("kind", IDX_KINDS)
def test_gather_cuda_matches_cpu(dtype, d, n, kind):
    gen = torch.Generator().manual_seed(n + d)
    x = torch.randn(B, H, n, d, generator=gen).to(dtype)
    for k_len in sorted({0, 1, n // 2, n, 2 * n}):
        idx = make_idx(n, k_len, "duplicates" if k_len > n else kind, gen)
        expected = torch.ops.gkv.gather_tokens(x, idx)
        got = torch.ops.gkv.gather_tokens(x.cuda(), idx.cuda())
        assert_same(got.cpu(), expected)


@requires_cuda
def test_gather_cuda_non_contiguous_x():
    x = torch.randn(3, 2, 50, 64, device="cuda").transpose(0, 1)
    idx = torch.randint(0, 50, (2, 3, 20), device="cuda")
    assert_same(torch.ops.gkv.gather_tokens(x, idx), reference_gather(x, idx))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_gather_gradcheck(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    idx = make_idx(7, 5, "duplicates", gen)[:2, :2].to(device)
    assert torch.autograd.gradcheck(lambda t: torch.ops.gkv.gather_tokens(t, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.gkv.gather_tokens(t, idx), (x,))


def test_gather_backward_accumulates_duplicates():
    x = torch.randn(1, 1, 4, 2, requires_grad=True)
    idx = torch.tensor([[[2, 2, 0, 2]]])
    torch.ops.gkv.gather_tokens(x, idx).sum().backward()
    assert x.grad[0, 0, :, 0].tolist() == [1.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_gather_opcheck(device, requires_grad):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 17, 8, generator=gen).to(device).requires_grad_(requires_grad)
    idx = make_idx(17, 9, "duplicates", gen).to(device)
    torch.library.opcheck(torch.ops.gkv.gather_tokens.default, (x, idx))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("case, match", [
    ("x_rank", r"x must have shape \[B, H, N, d\] \(rank 4\)"),
    ("x_dtype", r"x must be a floating tensor .*, got Long"),
    ("idx_rank", r"idx must have shape \[B, H, K\] \(rank 3\)"),
    ("idx_dtype", r"idx must be Long, got Int"),
    ("idx_batch", r"idx.size\(0\) must be B of x"),
    ("idx_heads", r"idx.size\(1\) must be H of x"),
    ("idx_high", r"idx must be in \[0, N = 5\), got values in \[0, 5\]"),
    ("idx_negative", r"idx must be in \[0, N = 5\), got values in \[-3, "),
])
def test_gather_bad_inputs(device, case, match):
    x, idx = torch.randn(2, 3, 5, 8), torch.zeros(2, 3, 4, dtype=torch.int64)
    if case == "x_rank":
        x = x[0]
    elif case == "x_dtype":
        x = x.long()
    elif case == "idx_rank":
        idx = idx[0]
    elif case == "idx_dtype":
        idx = idx.int()
    elif case == "idx_batch":
        idx = idx[:1]
    elif case == "idx_heads":
        idx = idx[:, :1]
    elif case == "idx_high":
        idx[1, 1, 1] = 5
    elif case == "idx_negative":
        idx[0, 0, 0] = -3
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gkv.gather_tokens(x.to(device), idx.to(device))
