"""gkv::lifetime_attention and gkv::lifetime_attention_backward.

Key j is visible to query i iff j <= i < death[b, h, j]. The CPU oracle is checked against a dense
PyTorch formula written here (the T x T mask is fine in a test), the CUDA kernels against the CPU
oracle, the autograd registration by gradcheck (float64) and opcheck.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CUDA, DTYPES, GQA_GROUPS, HEAD_DIMS, LENGTHS, poison_, requires_cuda, tolerance

op = torch.ops.gkv.lifetime_attention
op_backward = torch.ops.gkv.lifetime_attention_backward
NEVER = 2**31 - 1  # death of a key that is never evicted


def random_death(batch, hkv, t, gen, pad=0):
    """death [B, Hkv, T] int32 mixing every case: never evicted, evicted soon, evicted later, and
    padding (death <= j). The first `pad` keys of every row are padding, so queries < pad see
    nothing."""
    j = torch.arange(t, dtype=torch.int64).expand(batch, hkv, t)
    kind = torch.randint(0, 4, (batch, hkv, t), generator=gen)
    soon = j + 1 + torch.randint(0, 4, (batch, hkv, t), generator=gen)
    later = j + 1 + torch.randint(0, t + 1, (batch, hkv, t), generator=gen)
    padding = j - torch.randint(0, 3, (batch, hkv, t), generator=gen)
    death = torch.where(kind == 0, torch.full_like(j, NEVER),
                        torch.where(kind == 1, soon, torch.where(kind == 2, later, padding)))
    death[..., :pad] = padding[..., :pad]
    return death.to(torch.int32)


def window_death(batch, hkv, t, window, device="cpu"):
    """death [B, Hkv, T] int32 of a sliding window: key j is seen by queries [j, j + window)."""
    death = (torch.arange(t, device=device) + window).clamp(max=NEVER).to(torch.int32)
    return death.expand(batch, hkv, t).clone()


def make_inputs(batch, hkv, g, t, d, dtype=torch.float32, seed=0, pad=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * g, t, d, generator=gen)
    k = torch.randn(batch, hkv, t, d, generator=gen)
    v = torch.randn(batch, hkv, t, d, generator=gen)
    death = random_death(batch, hkv, t, gen, pad)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), death.to(device),
            1.0 / math.sqrt(d))


def dense_reference(q, k, v, death, scale):
    """Dense formula in float64: (out, lse), with out = 0 and lse = -inf on rows that see nothing."""
    g = q.shape[1] // k.shape[1]
    t = q.shape[2]
    i = torch.arange(t, device=q.device)
    visible = (i[None, :] <= i[:, None]) & (i[:, None] < death.to(torch.int64)[..., None, :])
    visible = visible.repeat_interleave(g, dim=1)  # [B, Hq, T(i), T(j)]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    logits = scale * q.double() @ kk.transpose(-1, -2)
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.where(visible, torch.exp(logits - lse[..., None]), torch.zeros_like(logits))
    return p @ vv, lse


def assert_lse_equal(got, ref, **tol):
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    finite = ~torch.isneginf(ref)
    torch.testing.assert_close(got[finite].double(), ref[finite].double(), **tol)


# ------------------------------------------------------------------------------------- CPU oracle


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("g", GQA_GROUPS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_cpu_forward_matches_dense(t, g, d):
    q, k, v, death, scale = make_inputs(1, 2, g, t, d, seed=t * 100 + g * 10 + d, pad=3)
    out, lse = op(q, k, v, death, scale)
    ref_out, ref_lse = dense_reference(q, k, v, death, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    assert_lse_equal(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("g", GQA_GROUPS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_cpu_backward_matches_dense_autograd(t, g, d):
    q, k, v, death, scale = make_inputs(1, 2, g, t, d, seed=t + g + d, pad=2)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, lse = op(q, k, v, death, scale)
    dq, dk, dv = op_backward(grad, q, k, v, death, out, lse, scale)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, _ = dense_reference(qd, kd, vd, death, scale)
    ref = torch.autograd.grad(ref_out, (qd, kd, vd), grad.double())
    for got, want in zip((dq, dk, dv), ref):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("g", [1, 4])
def test_all_causal_equals_sdpa(g):
    q, k, v, _, scale = make_inputs(2, 2, g, 97, 64, seed=5)
    death = torch.full((2, 2, 97), NEVER, dtype=torch.int32)
    out, lse = op(q, k, v, death, scale)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         is_causal=True, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("window", [1, 40, 150])
def test_cpu_sliding_window_matches_dense(window):
    q, k, v, _, scale = make_inputs(1, 2, 2, 300, 8, seed=window)
    death = window_death(1, 2, 300, window)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    out, lse = op(q, k, v, death, scale)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = dense_reference(qd, kd, vd, death, scale)
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-5, rtol=1e-4)
    assert_lse_equal(lse, ref_lse.detach(), atol=1e-5, rtol=1e-5)
    ref = torch.autograd.grad(ref_out, (qd, kd, vd), grad.double())
    for got, want in zip(op_backward(grad, q, k, v, death, out, lse, scale), ref):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_autograd_matches_dense_and_death_gets_no_grad():
    q, k, v, death, scale = make_inputs(1, 2, 4, 33, 8, seed=3, pad=4)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = op(q, k, v, death, scale)
    assert not lse.requires_grad
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, _ = dense_reference(qd, kd, vd, death, scale)
    (ref_out * torch.linspace(-1, 1, out.numel()).view_as(out).double()).sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_rows_that_see_nothing_give_zero_and_minus_inf():
    q, k, v, death, scale = make_inputs(2, 1, 4, 17, 8, seed=9, pad=5)
    death[1, 0, :] = torch.arange(17, dtype=torch.int32)  # everything is padding in batch 1
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = op(q, k, v, death, scale)
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 5:]).all()
    assert (out[0, :, :5] == 0).all() and (out[1] == 0).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0, :, :5] == 0).all() and (q.grad[1] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_inputs(dtype):
    q, k, v, death, scale = make_inputs(1, 2, 4, 97, 64, dtype=dtype, seed=11, pad=2)
    out, lse = op(q, k, v, death, scale)
    ref_out, ref_lse = dense_reference(q, k, v, death, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, **tolerance(dtype))
    assert_lse_equal(lse, ref_lse, atol=1e-4, rtol=1e-4)  # fp32 math on the rounded inputs
    dq, dk, dv = op_backward(torch.ones_like(out), q, k, v, death, out, lse, scale)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, dtype, dtype)


def test_non_contiguous_inputs():
    q, k, v, death, scale = make_inputs(1, 2, 2, 17, 64, seed=4)
    qt, kt, vt = (x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v))
    assert not qt.is_contiguous()
    for got, want in zip(op(qt, kt, vt, death, scale), op(q, k, v, death, scale)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_gradcheck_float64():
    q, k, v, death, scale = make_inputs(1, 2, 2, 9, 8, dtype=torch.float64, seed=2, pad=2)
    inputs = tuple(x.requires_grad_() for x in (q, k, v))

    def out_only(q, k, v):
        return op(q, k, v, death, scale)[0]

    # lse is fp32 (the schema's contract) and feeds the backward, hence atol 1e-5.
    assert torch.autograd.gradcheck(out_only, inputs, atol=1e-5, rtol=1e-3)


def test_opcheck_cpu():
    q, k, v, death, scale = make_inputs(1, 2, 2, 17, 8, seed=6, pad=2)
    torch.library.opcheck(op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), death,
                               scale))
    out, lse = op(q.detach(), k.detach(), v.detach(), death, scale)
    torch.library.opcheck(op_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                        death, out, lse, scale))


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_rank():
    q, k, v, death, scale = make_inputs(1, 2, 2, 9, 8)
    with pytest.raises(RuntimeError, match=r"q must have shape \[B, Hq, T, d\]"):
        op(q[0], k, v, death, scale)
    with pytest.raises(RuntimeError, match=r"death must have shape \[B, Hkv, T\]"):
        op(q, k, v, death[0], scale)


def test_bad_group():
    q, k, v, death, scale = make_inputs(1, 2, 2, 9, 8)
    with pytest.raises(RuntimeError, match="positive multiple of the KV heads"):
        op(q[:, :3], k, v, death, scale)


@pytest.mark.parametrize("what", ["T", "d", "B", "v", "death"])
def test_bad_sizes(what):
    q, k, v, death, scale = make_inputs(2, 2, 2, 9, 8)
    if what == "T":
        k, v, pattern = k[:, :, :8], v[:, :, :8], r"k.size\(2\) must be T of q"
    elif what == "d":
        k, v, pattern = k[..., :4], v[..., :4], r"k.size\(3\) must be d of q"
    elif what == "B":
        k, v, pattern = k[:1], v[:1], r"k.size\(0\) must be B of q"
    elif what == "v":
        v, pattern = v[..., :4], r"v.size\(3\) must be the same size as k"
    else:
        death, pattern = death[:, :1], r"death.size\(1\) must be Hkv of k"
    with pytest.raises(RuntimeError, match=pattern):
        op(q, k, v, death, scale)


def test_bad_dtypes():
    q, k, v, death, scale = make_inputs(1, 2, 2, 9, 8)
    with pytest.raises(RuntimeError, match="death must be Int"):
        op(q, k, v, death.long(), scale)
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        op(q, k.half(), v, death, scale)
    # float64 q alone is a mixed-dtype call; all-float64 is accepted by the CPU oracle only (for
    # gradcheck) and rejected on CUDA (test_bad_inputs_cuda).
    with pytest.raises(RuntimeError, match="v must have the dtype of q"):
        op(q.double(), k.double(), v, death, scale)
    with pytest.raises(RuntimeError, match="q must be float32, bfloat16 or float16"):
        op(q.int(), k.int(), v.int(), death, scale)
    out, lse = op(q, k, v, death, scale)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        op_backward(out, q, k, v, death, out, lse.double(), scale)
    with pytest.raises(RuntimeError, match="grad_out must have the dtype of q"):
        op_backward(out.half(), q, k, v, death, out, lse, scale)
    with pytest.raises(RuntimeError, match=r"lse.size\(2\) must be the same size as q"):
        op_backward(out, q, k, v, death, out, lse[..., :4], scale)


@requires_cuda
def test_bad_inputs_cuda():
    q, k, v, death, scale = make_inputs(1, 2, 2, 9, 8, device="cuda")
    # float64 is only for the CPU oracle (gradcheck); the kernels are fp32/bf16/fp16.
    with pytest.raises(RuntimeError, match="q must be float32, bfloat16 or float16"):
        op(q.double(), k.double(), v.double(), death, scale)
    with pytest.raises(RuntimeError, match="all tensors must share one device"):
        op(q, k, v, death.cpu(), scale)
    with pytest.raises(RuntimeError, match="unsupported head_dim"):
        op(q[..., :6], k[..., :6], v[..., :6], death, scale)


# ------------------------------------------------------------------------------- CUDA vs the CPU


def grad_tolerance(dtype, ref):
    # Gradients sum up to T * G products, so their size grows with T; the absolute tolerance is
    # taken relative to the largest reference gradient (conftest's atol is for O(1) outputs).
    atol, rtol = tolerance(dtype).values()
    return {"atol": atol * max(1.0, ref.abs().max().item()), "rtol": rtol}


def assert_cuda_matches_cpu(q, k, v, death, scale, grad_seed):
    """The CUDA forward and backward against the CPU kernels on the same CPU inputs."""
    dtype = q.dtype
    out, lse = op(q, k, v, death, scale)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(grad_seed)).to(dtype)
    ref_grads = op_backward(grad, q, k, v, death, out, lse, scale)
    qc, kc, vc, dc, gc = (x.cuda() for x in (q, k, v, death, grad))
    out_c, lse_c = op(qc, kc, vc, dc, scale)
    torch.testing.assert_close(out_c.cpu(), out, **tolerance(dtype))
    assert_lse_equal(lse_c.cpu(), lse, **tolerance(dtype))
    # The backward from the CPU's forward results, so only the backward kernels are compared.
    grads_c = op_backward(gc, qc, kc, vc, dc, out.cuda(), lse.cuda(), scale)
    for got, want in zip(grads_c, ref_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want, **grad_tolerance(dtype, want))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", LENGTHS + [1000])
@pytest.mark.parametrize("g", GQA_GROUPS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_cuda_matches_cpu(dtype, t, g, d):
    q, k, v, death, scale = make_inputs(2, 2, g, t, d, dtype=dtype, seed=t + 7 * g + d, pad=3)
    assert_cuda_matches_cpu(q, k, v, death, scale, grad_seed=8)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS + [16, 32])  # 16: FFMA path, 32: smallest tensor-core one
@pytest.mark.parametrize("window", [1, 100, 300, NEVER])
def test_cuda_sliding_window_matches_cpu(dtype, d, window):
    """Regular deaths reach the kernels' tile paths that random ones do not: key tiles skipped
    (nobody in the query tile sees them), fully visible tiles (no per-element mask), and the
    dK/dV kernel's query range ending at the tile's last death."""
    q, k, v, _, scale = make_inputs(2, 2, 4, 1000, d, dtype=dtype, seed=window % 1000 + d)
    death = window_death(2, 2, 1000, window)
    death[1, 1, 500:700] = torch.arange(500, 700, dtype=torch.int32) - 1  # a run of padding
    assert_cuda_matches_cpu(q, k, v, death, scale, grad_seed=3)


@requires_cuda
def test_cuda_unaligned_inputs():
    """A contiguous view at an odd storage offset (the kernels copy 16-byte rows)."""
    q, k, v, death, scale = make_inputs(1, 2, 2, 97, 64, dtype=torch.bfloat16, seed=14,
                                        device="cuda")
    shifted = [torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x).copy_(x)
               for x in (q, k, v)]
    for got, want in zip(op(*shifted, death, scale), op(q, k, v, death, scale)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_outputs_fully_written(dtype):
    """Nothing stale: two calls on poisoned memory pools give identical, finite results."""
    q, k, v, death, scale = make_inputs(1, 2, 4, 300, 128, dtype=dtype, seed=12, pad=7,
                                        device="cuda")
    poison_(torch.empty(1 << 24, device="cuda"))  # dirties the caching allocator's blocks
    out, lse = op(q, k, v, death, scale)
    grads = op_backward(torch.ones_like(out), q, k, v, death, out, lse, scale)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[..., :7]).all() and (out[:, :, :7] == 0).all()
    for x in grads:
        assert torch.isfinite(x).all()
    again = op_backward(torch.ones_like(out), q, k, v, death, out, lse, scale)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)  # no atomics: the kernels are deterministic


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_all_causal_equals_sdpa(dtype):
    q, k, v, _, scale = make_inputs(1, 2, 4, 1000, 128, dtype=dtype, seed=13, device="cuda")
    death = torch.full((1, 2, 1000), NEVER, dtype=torch.int32, device="cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, _ = op(q, k, v, death, scale)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1),
                                             v.repeat_interleave(4, 1), is_causal=True,
                                             scale=scale)
    ref = torch.autograd.grad(ref_out, (q, k, v), grad)
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **grad_tolerance(dtype, b.float()))


@requires_cuda
def test_opcheck_cuda():
    q, k, v, death, scale = make_inputs(1, 2, 2, 17, 64, dtype=torch.bfloat16, seed=6, pad=2,
                                        device="cuda")
    torch.library.opcheck(op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), death,
                               scale))
    out, lse = op(q.detach(), k.detach(), v.detach(), death, scale)
    torch.library.opcheck(op_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                        death, out, lse, scale))
