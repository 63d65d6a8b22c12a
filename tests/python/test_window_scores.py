"""gkv::window_scores: CPU kernel vs a dense formula, CUDA vs CPU, opcheck, bad inputs.

Inputs carry left pads, scattered empty slots (NaN keys) and one (b, h) row with no live slot.
"""
import pytest
import torch

from conftest import DTYPES, GQA_GROUPS, HEAD_DIMS, left_padded_pos, requires_cuda, tolerance
from gkv_ext import ops


def make_inputs(B, Hkv, G, N, W, d, dtype, device="cpu", seed=0):
    """q_win [B,Hq,W,d], k [B,Hkv,N,d], pos [B,Hkv,N] int32, scale."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, W, d, generator=gen)
    k = torch.randn(B, Hkv, N, d, generator=gen)
    pos = left_padded_pos(B, Hkv, N, [(b * 5) % N for b in range(B)])
    pos[torch.rand(B, Hkv, N, generator=gen) < 0.2] = -1
    if B > 1 or Hkv > 1:
        pos[B - 1, Hkv - 1, :] = -1  # a row with no live slot: every query sees nothing
    k[pos < 0] = float("nan")
    # Larger logits than d ** -0.5 would give, so that the softmax is peaked, as in real models.
    scale = 2.0 * d ** -0.5
    return q.to(device, dtype), k.to(device, dtype), pos.to(device), scale


def dense_reference(q, k, pos, scale):
    """The formula in float64, one window query at a time: S [B,Hkv,N-W]."""
    B, Hq, W, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kq = k.double().nan_to_num(0.0).repeat_interleave(G, dim=1)          # [B,Hq,N,d]
    S = torch.zeros(B, Hkv, N - W, dtype=torch.float64)
    for i in range(W):
        visible = (pos >= 0) & (torch.arange(N) <= N - W + i)             # [B,Hkv,N]
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, i].double(), kq) * scale
        logits = logits.masked_fill(~visible.repeat_interleave(G, dim=1), float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)                 # [B,Hq,N]
        S += p.view(B, Hkv, G, N).amax(dim=2)[..., : N - W]
    return S / W


CASES = [  # (B, Hkv, N, W)
    (2, 2, 17, 1),
    (2, 1, 16, 16),
    (3, 2, 97, 16),
    (1, 2, 300, 7),
    (2, 1, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("G", GQA_GROUPS)
def test_cpu_matches_formula(dtype, d, G):
    for B, Hkv, N, W in CASES:
        q, k, pos, scale = make_inputs(B, Hkv, G, N, W, d, dtype)
        S = ops.window_scores(q, k, pos, scale)
        assert S.dtype == torch.float32 and S.shape == (B, Hkv, N - W)
        assert torch.isfinite(S).all()
        torch.testing.assert_close(S.double(), dense_reference(q, k, pos, scale),
                                   atol=1e-6, rtol=1e-5)
        assert (S[pos[..., : N - W] < 0] == 0).all()
        if N > W and (B > 1 or Hkv > 1):
            assert (S[B - 1, Hkv - 1] == 0).all()


def test_cpu_last_query_only():
    """W = 1 is the softmax of the last query itself (max over the group)."""
    q, k, pos, scale = make_inputs(1, 1, 4, 50, 1, 8, torch.float32)
    pos[...] = torch.arange(50, dtype=torch.int32)
    k = k.nan_to_num(0.0)
    p = torch.softmax(scale * q[0, :, 0] @ k[0, 0].T, dim=-1)  # [G, N]
    torch.testing.assert_close(ops.window_scores(q, k, pos, scale)[0, 0], p.amax(0)[:49])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("G", GQA_GROUPS + [3, 16])
@pytest.mark.parametrize("B,Hkv,N,W", CASES + [(2, 2, 2049, 16), (1, 4, 5000, 16),
                                                (1, 1, 129, 129), (1, 1, 200, 100)])
def test_cuda_matches_cpu(dtype, d, G, B, Hkv, N, W):
    q, k, pos, scale = make_inputs(B, Hkv, G, N, W, d, dtype, seed=N + G)
    ref = ops.window_scores(q, k, pos, scale)
    S = ops.window_scores(q.cuda(), k.cuda(), pos.cuda(), scale)
    assert torch.isfinite(S).all()
    # Both sides compute in fp32 from the same inputs; S is a mean of probabilities (<= 1), so
    # the fp32 row of the table applies whatever the input dtype.
    torch.testing.assert_close(S.cpu(), ref, **tolerance(torch.float32))


@requires_cuda
@pytest.mark.parametrize("W", [16, 100])
def test_cuda_score_pass_groups_key_tiles(W):
    """At a compression's size (B*Hkv = 64, N = 2176) a block of the score pass takes several
    candidate tiles with its queries loaded once; with W = 100 (7 rounds of 16 queries at G = 7,
    padded to 8 rows each) it also takes the queries in rounds."""
    q, k, pos, scale = make_inputs(16, 4, 7, 2176, W, 128, torch.bfloat16)
    ref = ops.window_scores(q, k, pos, scale)
    S = ops.window_scores(q.cuda(), k.cuda(), pos.cuda(), scale)
    torch.testing.assert_close(S.cpu(), ref, **tolerance(torch.float32))


@requires_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [20, 33, 64])
@pytest.mark.parametrize("W", [1, 16, 37])
def test_cuda_large_groups(d, G, W):
    """Groups beyond 16 heads: the tensor-core score pass pads a group to 32 or 64 rows, so one
    query spans the rows of one warp (G = 20) or of two (G = 33, 64), merged by a max."""
    q, k, pos, scale = make_inputs(2, 2, G, 700, W, d, torch.bfloat16, seed=G + W)
    ref = ops.window_scores(q, k, pos, scale)
    S = ops.window_scores(q.cuda(), k.cuda(), pos.cuda(), scale)
    torch.testing.assert_close(S.cpu(), ref, **tolerance(torch.float32))


@requires_cuda
def test_cuda_strided_views():
    q, k, pos, scale = make_inputs(2, 4, 7, 3000, 16, 128, torch.bfloat16, device="cuda")
    ref = ops.window_scores(q, k[:, :, :2500].contiguous(), pos[:, :, :2500].contiguous(), scale)
    S = ops.window_scores(q, k[:, :, :2500], pos[:, :, :2500], scale)
    torch.testing.assert_close(S, ref, atol=0, rtol=0)


def opcheck_args(device):
    q, k, pos, scale = make_inputs(2, 2, 4, 40, 5, 8, torch.float32, device=device)
    return (q, k.nan_to_num(0.0), pos, scale)


def test_opcheck_cpu():
    torch.library.opcheck(torch.ops.gkv.window_scores.default, opcheck_args("cpu"))


@requires_cuda
def test_opcheck_cuda():
    torch.library.opcheck(torch.ops.gkv.window_scores.default, opcheck_args("cuda"))


def good_args():
    q, k, pos, scale = make_inputs(2, 2, 4, 20, 4, 8, torch.float32)
    return dict(q_win=q, k=k, pos=pos, scale=scale)


BAD = {
    "q rank": (lambda a: dict(q_win=a["q_win"][0]), r"q_win must have shape \[B, Hq, W, d\]"),
    "k rank": (lambda a: dict(k=a["k"][0]), r"k must have shape \[B, Hkv, N, d\]"),
    "pos rank": (lambda a: dict(pos=a["pos"][0]), r"pos must have shape \[B, Hkv, N\]"),
    "Hq % Hkv": (lambda a: dict(q_win=a["q_win"][:, :7]), r"multiple of the KV heads"),
    "k d": (lambda a: dict(k=a["k"][..., :4]), r"k.size\(3\) must be d of q_win"),
    "k B": (lambda a: dict(k=a["k"][:1]), r"k.size\(0\) must be B of q_win"),
    "pos B": (lambda a: dict(pos=a["pos"][:1]), r"pos.size\(0\) must be B of q_win"),
    "pos Hkv": (lambda a: dict(pos=a["pos"][:, :1]), r"pos.size\(1\) must be Hkv of k"),
    "pos N": (lambda a: dict(pos=a["pos"][:, :, :9]), r"pos.size\(2\) must be N of k"),
    "pos dtype": (lambda a: dict(pos=a["pos"].long()), r"pos must be Int"),
    "W > N": (lambda a: dict(k=a["k"][:, :, :3], pos=a["pos"][:, :, :3]),
              r"W = q_win.size\(2\) must be in \[1, N = 3\]"),
    "W = 0": (lambda a: dict(q_win=a["q_win"][:, :, :0]), r"must be in \[1, N = 20\]"),
    "q float64": (lambda a: dict(q_win=a["q_win"].double(), k=a["k"].double()),
                  r"q_win must be float32, bfloat16 or float16"),
    "k dtype": (lambda a: dict(k=a["k"].half()), r"k must have the dtype of q_win"),
    "mixed devices": (lambda a: dict(pos=a["pos"].to("meta")), r"pos is on meta"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, match = BAD[case]
    args = good_args()
    args.update(make(args))
    with pytest.raises(RuntimeError, match=match):
        ops.window_scores(**args)


@requires_cuda
def test_bad_input_cuda_devices():
    args = good_args()
    with pytest.raises(RuntimeError, match=r"k is on cpu but q_win is on cuda"):
        ops.window_scores(args["q_win"].cuda(), args["k"], args["pos"].cuda(), 0.3)
