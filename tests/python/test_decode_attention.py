"""gkv::decode_attention: CPU kernel vs a dense formula, CUDA vs CPU, opcheck, bad inputs.

Inputs always carry left pads and scattered empty slots (per-head eviction leaves them anywhere),
NaN in every dead slot (empty or past `length`) and in the dead part of pos, one (b, h) row with
no live slot, and a non-zero score buffer.
"""
import pytest
import torch

from conftest import (DTYPES, GQA_GROUPS, HEAD_DIMS, LENGTHS, left_padded_pos, requires_cuda,
                      tolerance)
from gkv_ext import ops


def make_inputs(B, Hkv, G, C, length, d, dtype, device="cpu", seed=0):
    """q [B,Hq,d], k/v [B,Hkv,C,d], pos [B,Hkv,C] int32, score_acc [B,Hkv,C] fp32, scale."""
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    q = torch.randn(B, Hq, d, generator=gen)
    k = torch.randn(B, Hkv, C, d, generator=gen)
    v = torch.randn(B, Hkv, C, d, generator=gen)
    pads = [(b * 3) % max(length, 1) for b in range(B)]
    pos = left_padded_pos(B, Hkv, C, pads)
    evicted = torch.rand(B, Hkv, C, generator=gen) < 0.2
    pos[evicted] = -1
    if B > 1 or Hkv > 1:
        pos[B - 1, Hkv - 1, :] = -1  # a row with no live slot
    pos[:, :, length:] = torch.randint(-3, C, (B, Hkv, C - length), generator=gen,
                                       dtype=torch.int32)  # garbage past length
    dead = (pos < 0) | (torch.arange(C) >= length)
    k[dead] = float("nan")
    v[dead] = float("nan")
    score_acc = torch.rand(B, Hkv, C, generator=gen)
    score_acc[:, :, length:] = float("nan")  # must stay untouched
    scale = d ** -0.5
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            pos.to(**to), score_acc.to(**to), scale)


def dense_reference(q, k, v, pos, length, scale):
    """The formula in float64: (out [B,Hq,d], max-over-group probabilities [B,Hkv,C])."""
    B, Hq, d = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    live = (pos >= 0) & (torch.arange(C, device=pos.device) < length)   # [B,Hkv,C]
    live_q = live.repeat_interleave(G, dim=1)                             # [B,Hq,C]
    kq = k.double().repeat_interleave(G, dim=1)                           # [B,Hq,C,d]
    vq = v.double().repeat_interleave(G, dim=1).nan_to_num(0.0)
    logits = torch.einsum("bhd,bhcd->bhc", q.double(), kq.nan_to_num(0.0)) * scale
    logits = logits.masked_fill(~live_q, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    out = torch.einsum("bhc,bhcd->bhd", p, vq)
    pmax = p.view(B, Hkv, G, C).amax(dim=2)
    return out, pmax, live


CASES = [  # (B, Hkv, C, length)
    (2, 2, 1, 1),
    (3, 2, 40, 17),
    (2, 1, 97, 97),
    (2, 2, 301, 300),
    (1, 1, 8, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("G", GQA_GROUPS)
def test_cpu_matches_formula(dtype, d, G):
    for B, Hkv, C, length in CASES:
        q, k, v, pos, acc, scale = make_inputs(B, Hkv, G, C, length, d, dtype)
        acc0 = acc.clone()
        out = ops.decode_attention(q, k, v, pos, length, scale, acc)
        ref_out, pmax, live = dense_reference(q, k, v, pos, length, scale)
        assert out.dtype == dtype and out.shape == q.shape
        assert torch.isfinite(out).all()
        # CPU vs float64 formula: the only gap is the rounding of out to dtype.
        atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
        torch.testing.assert_close(acc[live].double(), (acc0 + pmax)[live].double(),
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(acc[~live].nan_to_num(-9), acc0[~live].nan_to_num(-9))
        if B * Hkv > 1:
            assert (out[B - 1, -G:] == 0).all()  # the row with no live slot
        # Without a score buffer the output is the same.
        torch.testing.assert_close(ops.decode_attention(q, k, v, pos, length, scale), out,
                                   atol=0, rtol=0)


def test_cpu_strided_cache_view():
    """A view of a larger cache (length < C after slicing C) gives the same answer."""
    q, k, v, pos, acc, scale = make_inputs(2, 2, 4, 64, 50, 64, torch.float32)
    out = ops.decode_attention(q, k[:, :, :55], v[:, :, :55], pos[:, :, :55], 50, scale)
    torch.testing.assert_close(out, ops.decode_attention(q, k, v, pos, 50, scale))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS + [16, 32])
@pytest.mark.parametrize("G", GQA_GROUPS + [3, 6, 16, 24])
# (48, 4, 700, 650): more (b, KV head) blocks than the device holds at once, so one split takes
# every slot and writes the output itself (no combine). On the H200 (16, 4, 1152, 1101), the
# engine's B = 16 at budget 1024, takes 4 splits (2 at G = 24) and (8, 4, 1500, 1499) 8.
@pytest.mark.parametrize("B,Hkv,C,length",
                         CASES + [(3, 2, 4100, 4099), (1, 4, 2049, 2049), (48, 4, 700, 650),
                                  (16, 4, 1152, 1101), (8, 4, 1500, 1499)])
def test_cuda_matches_cpu(dtype, d, G, B, Hkv, C, length):
    q, k, v, pos, acc, scale = make_inputs(B, Hkv, G, C, length, d, dtype, seed=C + G)
    acc_cpu = acc.clone()
    ref = ops.decode_attention(q, k, v, pos, length, scale, acc_cpu)
    qc, kc, vc, pc, ac = (t.cuda() for t in (q, k, v, pos, acc))
    out = ops.decode_attention(qc, kc, vc, pc, length, scale, ac)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), ref, **tolerance(dtype))
    # Probabilities are fp32 from the same inputs on both sides: only summation order differs.
    torch.testing.assert_close(ac.cpu(), acc_cpu, atol=1e-5, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(ops.decode_attention(qc, kc, vc, pc, length, scale), out,
                               atol=0, rtol=0)


@requires_cuda
def test_cuda_strided_cache_view():
    q, k, v, pos, acc, scale = (t.cuda() if torch.is_tensor(t) else t
                                for t in make_inputs(2, 4, 7, 3000, 2500, 128, torch.bfloat16))
    ref = ops.decode_attention(q, k.contiguous(), v, pos, 2500, scale)
    out = ops.decode_attention(q, k[:, :, :2600], v[:, :, :2600], pos[:, :, :2600], 2500, scale)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_q_sliced_from_joint_heads(dtype, d):
    """q as the decoder passes it: the first Hq heads of a joint q/k tensor (batch stride over
    Hq + Hkv heads), read in place; also heads that are not adjacent (copied)."""
    B, Hkv, G = 3, 4, 7
    q, k, v, pos, acc, scale = (t.cuda() if torch.is_tensor(t) else t
                                for t in make_inputs(B, Hkv, G, 300, 300, d, dtype))
    ref = ops.decode_attention(q, k, v, pos, 300, scale)
    joint = torch.cat([q, torch.randn(B, Hkv, d, device="cuda").to(dtype)], dim=1)
    sliced = joint[:, :Hkv * G]
    assert not sliced.is_contiguous()
    torch.testing.assert_close(ops.decode_attention(sliced, k, v, pos, 300, scale), ref,
                               atol=0, rtol=0)
    spread = torch.stack([q, q], dim=2)[:, :, 0]  # head stride 2d
    torch.testing.assert_close(ops.decode_attention(spread, k, v, pos, 300, scale), ref,
                               atol=0, rtol=0)


def cut_to_live(pos, live):
    """pos with every slot from `live` on marked empty: what live_length must amount to."""
    cut = pos.clone()
    cut[:, :, live:] = -1
    return cut


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_live_length_counts_later_slots_as_empty(dtype):
    """live_length cuts the slots read at live_length[0] (clamped to [0, length]): the same
    output and the same score emission as those slots marked empty, bit for bit."""
    B, Hkv, G, C, length = 3, 2, 4, 40, 37
    q, k, v, pos, acc, scale = make_inputs(B, Hkv, G, C, length, 16, dtype)
    for live in (-2, 0, 1, 20, 37, 90):
        cut = min(max(live, 0), length)
        acc_live, acc_cut = acc.clone(), acc.clone()
        out = ops.decode_attention(q, k, v, pos, length, scale, acc_live,
                                   torch.tensor([live]))
        ref = ops.decode_attention(q, k, v, cut_to_live(pos, cut), length, scale, acc_cut)
        assert torch.equal(out, ref)
        assert torch.equal(acc_live.nan_to_num(-9), acc_cut.nan_to_num(-9))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 128])
# (1, 4, 2049): several splits, the later ones wholly past the live slots; (48, 4, 700): one split;
# (16, 4, 1101): 4 splits.
@pytest.mark.parametrize("B,Hkv,C", [(3, 2, 301), (1, 4, 2049), (48, 4, 700), (16, 4, 1101)])
def test_cuda_live_length_matches_cpu(dtype, d, B, Hkv, C):
    """On CUDA the cut is read on the device: one CUDA graph, captured once with length = C,
    replayed with live_length changed in place in between, matches the CPU kernel each time
    (score emission included), and the call without emission in the same graph gives the same
    bits."""
    G, length = 7, C
    q, k, v, pos, acc, scale = make_inputs(B, Hkv, G, C, length, d, dtype, seed=C)
    qc, kc, vc, pc = (t.cuda() for t in (q, k, v, pos))
    live = torch.zeros(1, dtype=torch.long, device="cuda")
    acc_gpu = acc.cuda()
    graph = torch.cuda.CUDAGraph()
    for warm_acc in (acc_gpu.clone(), None):  # warm-up, with and without emission
        ops.decode_attention(qc, kc, vc, pc, length, scale, warm_acc, live)
    with torch.cuda.graph(graph):
        out = ops.decode_attention(qc, kc, vc, pc, length, scale, acc_gpu, live)
        out_plain = ops.decode_attention(qc, kc, vc, pc, length, scale, None, live)
    for cut in (C, C // 2 + 1, 1, 0, C - 3):
        live.fill_(cut)
        acc_gpu.copy_(acc)
        graph.replay()
        acc_cpu = acc.clone()
        ref = ops.decode_attention(q, k, v, pos, length, scale, acc_cpu, torch.tensor([cut]))
        torch.testing.assert_close(out.cpu(), ref, **tolerance(dtype))
        torch.testing.assert_close(acc_gpu.cpu(), acc_cpu, atol=1e-5, rtol=1e-4, equal_nan=True)
        torch.testing.assert_close(out_plain, out, atol=0, rtol=0)


def opcheck_args(device):
    q, k, v, pos, acc, scale = make_inputs(2, 2, 4, 33, 29, 8, torch.float32, device=device)
    acc = acc.nan_to_num(0.0)
    return (q, k, v, pos, 29, scale, acc)


def opcheck_live_args(device):
    return opcheck_args(device) + (torch.tensor([21], device=device),)


def test_opcheck_cpu():
    torch.library.opcheck(torch.ops.gkv.decode_attention.default, opcheck_args("cpu"))
    torch.library.opcheck(torch.ops.gkv.decode_attention.default, opcheck_live_args("cpu"))


@requires_cuda
def test_opcheck_cuda():
    torch.library.opcheck(torch.ops.gkv.decode_attention.default, opcheck_args("cuda"))
    torch.library.opcheck(torch.ops.gkv.decode_attention.default, opcheck_live_args("cuda"))


def good_args():
    q, k, v, pos, acc, scale = make_inputs(2, 2, 4, 16, 10, 8, torch.float32)
    return dict(q=q, k_cache=k, v_cache=v, pos=pos, length=10, scale=scale,
                score_acc=acc.nan_to_num(0.0))


def call(**overrides):
    args = good_args()
    args.update(overrides)
    return ops.decode_attention(**args)


BAD = {
    "q rank": (lambda a: dict(q=a["q"][0]), r"q must have shape \[B, Hq, d\]"),
    "k rank": (lambda a: dict(k_cache=a["k_cache"][0]), r"k_cache must have shape"),
    "v rank": (lambda a: dict(v_cache=a["v_cache"][..., 0]), r"v_cache must have shape"),
    "pos rank": (lambda a: dict(pos=a["pos"][0]), r"pos must have shape \[B, Hkv, C\]"),
    "Hq % Hkv": (lambda a: dict(q=a["q"][:, :7]), r"multiple of the KV heads"),
    "k d": (lambda a: dict(k_cache=a["k_cache"][..., :4]), r"k_cache.size\(3\) must be d of q"),
    "v d": (lambda a: dict(v_cache=a["v_cache"][..., :4]), r"v_cache.size\(3\) must be d of q"),
    "k B": (lambda a: dict(k_cache=a["k_cache"][:1]), r"k_cache.size\(0\) must be B of q"),
    "v Hkv": (lambda a: dict(v_cache=a["v_cache"][:, :1]), r"v_cache.size\(1\) must be Hkv"),
    "v C": (lambda a: dict(v_cache=a["v_cache"][:, :, :9]), r"v_cache.size\(2\) must be C"),
    "pos C": (lambda a: dict(pos=a["pos"][:, :, :9]), r"pos.size\(2\) must be C"),
    "pos Hkv": (lambda a: dict(pos=a["pos"][:, :1]), r"pos.size\(1\) must be Hkv"),
    "pos dtype": (lambda a: dict(pos=a["pos"].long()), r"pos must be Int"),
    "length < 0": (lambda a: dict(length=-1), r"length must be in \[0, C = 16\]"),
    "length > C": (lambda a: dict(length=17), r"length must be in \[0, C = 16\]"),
    "acc dtype": (lambda a: dict(score_acc=a["score_acc"].half()), r"score_acc must be Float"),
    "acc shape": (lambda a: dict(score_acc=a["score_acc"][:, :, :8]),
                  r"score_acc.size\(2\) must be C"),
    "acc rank": (lambda a: dict(score_acc=a["score_acc"][0]), r"score_acc must have shape"),
    "acc strided": (lambda a: dict(score_acc=a["score_acc"].transpose(0, 1).contiguous()
                                   .transpose(0, 1)), r"score_acc must be contiguous"),
    "q float64": (lambda a: dict(q=a["q"].double(), k_cache=a["k_cache"].double(),
                                 v_cache=a["v_cache"].double()),
                  r"q must be float32, bfloat16 or float16"),
    "k dtype": (lambda a: dict(k_cache=a["k_cache"].half()), r"k_cache must have the dtype of q"),
    "v dtype": (lambda a: dict(v_cache=a["v_cache"].bfloat16()),
                r"v_cache must have the dtype of q"),
    "mixed devices": (lambda a: dict(k_cache=a["k_cache"].to("meta")), r"k_cache is on meta"),
    "live dtype": (lambda a: dict(live_length=torch.tensor([3], dtype=torch.int32)),
                   r"live_length must be Long"),
    "live shape": (lambda a: dict(live_length=torch.tensor([3, 4])),
                   r"live_length must have shape \[1\], got \[2\]"),
    "live scalar": (lambda a: dict(live_length=torch.tensor(3)),
                    r"live_length must have shape \[1\], got \[\]"),
    "live device": (lambda a: dict(live_length=torch.tensor([3], device="meta")),
                    r"live_length is on meta"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, match = BAD[case]
    with pytest.raises(RuntimeError, match=match):
        call(**make(good_args()))


@requires_cuda
def test_bad_input_cuda_devices():
    args = good_args()
    with pytest.raises(RuntimeError, match=r"k_cache is on cpu but q is on cuda"):
        ops.decode_attention(args["q"].cuda(), args["k_cache"], args["v_cache"].cuda(),
                             args["pos"].cuda(), 10, 0.3)
    with pytest.raises(RuntimeError, match=r"score_acc is on cpu"):
        ops.decode_attention(args["q"].cuda(), args["k_cache"].cuda(), args["v_cache"].cuda(),
                             args["pos"].cuda(), 10, 0.3, args["score_acc"])
