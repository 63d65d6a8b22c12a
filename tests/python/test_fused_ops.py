"""gkv::rms_norm, gkv::add_rms_norm, gkv::silu_mul and gkv::apply_rope: CPU kernels vs the formulas
(in float64, and bit for bit against the decoder's former composite code, which matches
transformers), gradients (gradcheck in float64, and against autograd through the composite),
autocast, opcheck, bad inputs, CUDA vs CPU.
"""
import pytest
import torch

from conftest import DTYPES, CUDA, requires_cuda, tolerance
from gkv_ext import ops

NORM_DIMS = [64, 128, 896, 4096]
NORM_LEADING = [(1,), (3,), (2, 7), (5, 1, 3)]  # odd row counts: 1, 3, 14, 15
ROPE_HEAD_DIMS = [8, 64, 128]
ROPE_SHAPES = [(1, 1), (3, 7), (2, 12)]  # (B, H)
ROPE_TOKENS = [1, 7]
EPS = 1e-6

# The composite formulas are computed in the op's dtype with the same roundings, so against them
# the CPU kernels are exact; against the float64 formula the table of conftest applies, except that
# rms_norm of a low-precision x rounds twice (the normalised value, then the product with weight).
FORMULA_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3),
                      torch.bfloat16: (3e-2, 3e-2)}


def formula_tolerance(dtype):
    atol, rtol = FORMULA_TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def composite_rms_norm(x, weight, eps):
    """The decoder's former code (transformers' Llama/Qwen2 RMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def composite_silu_mul(x):
    """The decoder's former code: silu(gate) * up over the halves of the joint projection."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul_float64(x):
    gate, up = x.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def composite_rope(x, cos, sin):
    """The decoder's former code (transformers' apply_rotary_pos_emb)."""
    return x * cos + rotate_half(x) * sin


def rms_norm_float64(x, weight, eps):
    xd = x.double()
    return weight.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


def rope_float64(x, cos, sin):
    return composite_rope(x.double(), cos.double(), sin.double())


def norm_inputs(leading, D, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different scales, so that the per-row normalisation matters.
    x = torch.randn(*leading, D, generator=gen) * torch.rand(*leading, 1, generator=gen).mul(8)
    weight = 1 + 0.5 * torch.randn(D, generator=gen)
    return x.to(device, dtype), weight.to(device, dtype)


def rope_tables(B, T, d, dtype, device="cpu", seed=0, per_batch=True):
    """cos/sin [B or 1, 1, T, d] as the decoder builds them: positions times inverse frequencies,
    duplicated halves, computed in fp32 and cast."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (B if per_batch else 1, T), generator=gen).float()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    angles = positions.unsqueeze(-1) * inv_freq
    emb = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def rope_x(B, H, T, d, dtype, device="cpu", seed=1):
    """x [B,H,T,d] as the decoder passes it: a transposed view of [B,T,H,d]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, d, generator=gen).to(device, dtype).transpose(1, 2)


# ---------------------------------------------------------------------------- rms_norm, CPU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", NORM_DIMS)
def test_rms_norm_cpu_matches_formula(dtype, D):
    for leading in NORM_LEADING:
        x, weight = norm_inputs(leading, D, dtype)
        out = ops.rms_norm(x, weight, EPS)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert torch.equal(out, composite_rms_norm(x, weight, EPS))
        torch.testing.assert_close(out.double(), rms_norm_float64(x, weight, EPS),
                                   **formula_tolerance(dtype))


def test_rms_norm_non_contiguous_input():
    x, weight = norm_inputs((4, 6), 128, torch.float32)
    strided = x.transpose(0, 1)                                     # [6, 4, 128], rows strided
    sliced = torch.cat([x, x], dim=-1)[..., ::2]                    # last-dim stride 2
    for view in (strided, sliced):
        assert not view.is_contiguous()
        assert torch.equal(ops.rms_norm(view, weight, EPS), composite_rms_norm(view, weight, EPS))


def test_rms_norm_eps_guards_a_zero_row():
    x, weight = norm_inputs((3,), 64, torch.float32)
    x[1] = 0
    out = ops.rms_norm(x, weight, 1e-5)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", NORM_DIMS)
def test_add_rms_norm_cpu_is_the_add_then_the_norm(dtype, D):
    for leading in NORM_LEADING:
        x, weight = norm_inputs(leading, D, dtype)
        residual, _ = norm_inputs(leading, D, dtype, seed=1)
        total, normed = ops.add_rms_norm(x, residual, weight, EPS)
        assert torch.equal(total, x + residual) and total.is_contiguous()
        assert torch.equal(normed, composite_rms_norm(x + residual, weight, EPS))


# ---------------------------------------------------------------------------- silu_mul, CPU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", [1, 64, 136, 4736])
def test_silu_mul_cpu_matches_formula(dtype, F):
    for leading in NORM_LEADING:
        x, _ = norm_inputs(leading, 2 * F, dtype)
        out = ops.silu_mul(x)
        assert out.dtype == dtype and out.shape == (*leading, F) and out.is_contiguous()
        assert torch.equal(out, composite_silu_mul(x))
        torch.testing.assert_close(out.double(), silu_mul_float64(x), **formula_tolerance(dtype))
    strided = torch.randn(3, 4, 2 * F).transpose(0, 1).to(dtype)
    assert torch.equal(ops.silu_mul(strided), composite_silu_mul(strided))


# ---------------------------------------------------------------------------- apply_rope, CPU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", ROPE_HEAD_DIMS)
@pytest.mark.parametrize("T", ROPE_TOKENS)
def test_apply_rope_cpu_matches_formula(dtype, d, T):
    for B, H in ROPE_SHAPES:
        x = rope_x(B, H, T, d, dtype)
        cos, sin = rope_tables(B, T, d, dtype)
        out = ops.apply_rope(x, cos, sin)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert torch.equal(out, composite_rope(x, cos, sin))
        torch.testing.assert_close(out.double(), rope_float64(x, cos, sin), **tolerance(dtype))


def test_apply_rope_broadcasts_and_reads_any_strides():
    B, H, T, d = 2, 3, 5, 16
    cos, sin = rope_tables(1, T, d, torch.float32, per_batch=False)        # [1,1,T,d]
    x = torch.randn(B, H, T, 2 * d)[..., ::2]                               # last-dim stride 2
    expected = composite_rope(x, cos, sin)
    assert torch.equal(ops.apply_rope(x, cos, sin), expected)
    # Tables expanded over B and H (stride 0) and a table with a strided last dim.
    wide_cos = torch.stack([cos, cos], dim=-1).flatten(-2)[..., ::2].expand(B, H, T, d)
    assert torch.equal(ops.apply_rope(x, wide_cos, sin.expand(B, 1, T, d)), expected)


def test_apply_rope_is_a_rotation():
    """Each pair (i, i + d/2) turns by its angle: the norm of every pair is kept."""
    x = rope_x(2, 4, 7, 64, torch.float64)
    cos, sin = rope_tables(2, 7, 64, torch.float64)
    out = ops.apply_rope(x, cos, sin)
    pair_norm = lambda t: t[..., :32] ** 2 + t[..., 32:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x))


# ---------------------------------------------------------------------------- gradients

def test_rms_norm_gradcheck():
    x, weight = norm_inputs((3, 2), 16, torch.float64)
    x = x.transpose(0, 1).requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-3), (x, weight))


def test_add_rms_norm_and_silu_mul_gradcheck():
    x, weight = norm_inputs((3, 2), 16, torch.float64)
    residual, _ = norm_inputs((3, 2), 16, torch.float64, seed=1)
    leaves = [t.requires_grad_() for t in (x, residual, weight)]
    assert torch.autograd.gradcheck(lambda a, r, w: ops.add_rms_norm(a, r, w, 1e-3), leaves)
    gate_up = torch.randn(3, 5, 12, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ops.silu_mul, (gate_up,))


def test_apply_rope_gradcheck():
    x = rope_x(2, 3, 5, 8, torch.float64).requires_grad_()
    cos, sin = rope_tables(2, 5, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda a: ops.apply_rope(a, cos, sin), (x,))
    # General (not duplicated-half) tables: the backward is the transpose of rotate_half.
    cos = torch.randn(1, 3, 5, 8, dtype=torch.float64)
    sin = torch.randn(2, 1, 1, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ops.apply_rope(a, cos, sin), (x,))


def composite_grads(fn, composite, inputs, grad):
    """Gradients of fn(*inputs) and of composite(*inputs) against the same upstream grad."""
    grads = []
    for f in (fn, composite):
        leaves = [t.detach().requires_grad_() for t in inputs]
        f(*leaves).backward(grad)
        grads.append([t.grad for t in leaves])
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_autograd_of_the_composite(dtype):
    x, weight = norm_inputs((5, 3), 896, dtype)
    grad = torch.randn(5, 3, 896).to(dtype)
    ours, theirs = composite_grads(lambda a, b: ops.rms_norm(a, b, EPS),
                                   lambda a, b: composite_rms_norm(a, b, EPS), (x, weight), grad)
    # The weight gradient sums 15 rows; ours accumulates them in fp32.
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), **formula_tolerance(dtype))

    gate_up = torch.randn(5, 3, 2 * 896).to(dtype)
    (ours,), (theirs,) = composite_grads(ops.silu_mul, composite_silu_mul, (gate_up,),
                                         torch.randn(5, 3, 896).to(dtype))
    torch.testing.assert_close(ours, theirs, **formula_tolerance(dtype))

    x = rope_x(2, 3, 7, 64, dtype)
    cos, sin = rope_tables(2, 7, 64, dtype)
    grad = torch.randn(2, 3, 7, 64).to(dtype)
    (ours,), (theirs,) = composite_grads(lambda a: ops.apply_rope(a, cos, sin),
                                         lambda a: composite_rope(a, cos, sin), (x,), grad)
    torch.testing.assert_close(ours, theirs, **tolerance(dtype))


def test_apply_rope_refuses_tables_that_require_grad():
    x = rope_x(1, 2, 3, 8, torch.float32).requires_grad_()
    cos, sin = rope_tables(1, 3, 8, torch.float32)
    with pytest.raises(RuntimeError, match="cos and sin get no gradient"):
        ops.apply_rope(x, cos.requires_grad_(), sin)


# ---------------------------------------------------------------------------- autocast

def test_autocast_promotes_mixed_dtypes():
    """Under autocast a bf16 activation meets fp32 norm weights / RoPE tables, as the composite
    code it replaces did by type promotion; outside autocast the mix is an error."""
    x, weight = norm_inputs((3,), 64, torch.float32)
    q = rope_x(1, 2, 3, 8, torch.float32)
    cos, sin = rope_tables(1, 3, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = ops.rms_norm(x.bfloat16(), weight, EPS)
        rotated = ops.apply_rope(q.bfloat16(), cos, sin)
    assert normed.dtype == torch.float32 and rotated.dtype == torch.float32
    assert torch.equal(normed, ops.rms_norm(x.bfloat16().float(), weight, EPS))
    assert torch.equal(rotated, ops.apply_rope(q.bfloat16().float(), cos, sin))
    # The decoder's residual stream stays fp32 while a layer's output comes out in bf16.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, normed = ops.add_rms_norm(x, x.bfloat16(), weight, EPS)
    assert total.dtype == torch.float32 and torch.equal(total, x + x.bfloat16().float())
    assert torch.equal(normed, ops.rms_norm(total, weight, EPS))
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        ops.rms_norm(x.bfloat16(), weight, EPS)


# ---------------------------------------------------------------------------- bad inputs

def test_rms_norm_bad_inputs_name_the_argument():
    x, weight = norm_inputs((3,), 64, torch.float32)
    cases = [
        ((x, weight[:32], EPS), r"weight.size\(0\) must be D = x.size\(-1\) = 64"),
        ((x, weight.view(8, 8), EPS), r"weight must have shape \[D\]"),
        ((x, weight.half(), EPS), "weight must have the dtype of x"),
        ((x.int(), weight.int(), EPS), "x must be float32, bfloat16 or float16"),
        ((x[:, :0], weight[:0], EPS), r"x.size\(-1\) = D must be >= 1"),
        ((x, weight, -1.0), "eps must be finite and >= 0"),
        ((torch.tensor(1.0), weight, EPS), r"x must have shape \[..., D\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.rms_norm(*args)


def test_add_rms_norm_and_silu_mul_bad_inputs_name_the_argument():
    x, weight = norm_inputs((3,), 64, torch.float32)
    cases = [
        ((x, x[:2], weight, EPS), r"residual must have the shape of x \[3, 64\], got \[2, 64\]"),
        ((x, x.half(), weight, EPS), "residual must have the dtype of x"),
        ((x, x, weight[:32], EPS), r"weight.size\(0\) must be D = x.size\(-1\) = 64"),
        ((x, x, weight, float("nan")), "eps must be finite and >= 0"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.add_rms_norm(*args)
    for bad, message in [(x[:, :5], r"x.size\(-1\) = 2F must be even and >= 2"),
                         (x[:, :0], r"x.size\(-1\) = 2F must be even and >= 2"),
                         (torch.tensor(1.0), r"x must have shape \[..., 2F\]"),
                         (x.int(), "x must be float32, bfloat16 or float16")]:
        with pytest.raises(RuntimeError, match=message):
            ops.silu_mul(bad)


def test_apply_rope_bad_inputs_name_the_argument():
    x = rope_x(2, 3, 5, 8, torch.float32)
    cos, sin = rope_tables(2, 5, 8, torch.float32)
    odd = rope_x(2, 3, 5, 7, torch.float32)
    cases = [
        ((odd, cos[..., :7], sin[..., :7]), r"d = x.size\(3\) must be even"),
        ((x, cos[:, :, :3], sin), r"cos.size\(2\) must be 1 or x.size\(2\) = 5"),
        ((x, cos, sin[..., :4]), r"sin.size\(3\) must be d of x = 8"),
        ((x, cos.squeeze(1), sin), r"cos must have shape \[B or 1, H or 1, T or 1, d\]"),
        ((x, cos, sin.double()), "sin must have the dtype of x"),
        ((x[0], cos, sin), r"x must have shape \[B, H, T, d\]"),
        ((x.long(), cos.long(), sin.long()), "x must be float32, bfloat16 or float16"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.apply_rope(*args)


# ---------------------------------------------------------------------------- opcheck

def opcheck_devices():
    return ["cpu"] + (["cuda"] if CUDA else [])


@pytest.mark.parametrize("device", opcheck_devices())
def test_opcheck(device):
    x, weight = norm_inputs((3, 5), 128, torch.float32, device)
    torch.library.opcheck(torch.ops.gkv.rms_norm.default,
                          (x.requires_grad_(), weight.requires_grad_(), EPS))
    residual = norm_inputs((3, 5), 128, torch.float32, device, seed=1)[0].requires_grad_()
    torch.library.opcheck(torch.ops.gkv.add_rms_norm.default, (x, residual, weight, EPS))
    torch.library.opcheck(torch.ops.gkv.silu_mul.default, (residual,))
    q = rope_x(2, 4, 3, 64, torch.float32, device).requires_grad_()
    cos, sin = rope_tables(2, 3, 64, torch.float32, device)
    torch.library.opcheck(torch.ops.gkv.apply_rope.default, (q, cos, sin))


# ---------------------------------------------------------------------------- CUDA vs CPU

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", NORM_DIMS + [97])  # 97: not a multiple of the vector width
def test_rms_norm_cuda_matches_cpu(dtype, D):
    for leading in NORM_LEADING:
        x, weight = norm_inputs(leading, D, dtype)
        out = ops.rms_norm(x.cuda(), weight.cuda(), EPS)
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.cpu(), ops.rms_norm(x, weight, EPS), **tolerance(dtype))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", NORM_DIMS + [97])
def test_add_rms_norm_cuda_matches_cpu(dtype, D):
    for leading in NORM_LEADING:
        x, weight = norm_inputs(leading, D, dtype)
        residual, _ = norm_inputs(leading, D, dtype, seed=1)
        total, normed = ops.add_rms_norm(x.cuda(), residual.cuda(), weight.cuda(), EPS)
        # The sum is one rounding of the same fp32 sum on both devices.
        assert torch.equal(total.cpu(), x + residual)
        torch.testing.assert_close(normed.cpu(), ops.rms_norm(x + residual, weight, EPS),
                                   **tolerance(dtype))
    # Unaligned (scalar path) and strided inputs.
    x, weight = norm_inputs((6, 4), 128, dtype)
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    unaligned = buf[1:].view_as(x).copy_(x)
    total, normed = ops.add_rms_norm(unaligned, x.cuda().transpose(0, 1).contiguous().transpose(0, 1),
                                     weight.cuda(), EPS)
    assert torch.equal(total.cpu(), x + x)
    torch.testing.assert_close(normed.cpu(), ops.rms_norm(x + x, weight, EPS), **tolerance(dtype))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F", [1, 64, 97, 136, 4736])  # 1 and 97: the scalar path
def test_silu_mul_cuda_matches_cpu(dtype, F):
    for leading in NORM_LEADING:
        x, _ = norm_inputs(leading, 2 * F, dtype)
        out = ops.silu_mul(x.cuda())
        assert out.dtype == dtype and out.shape == (*leading, F) and out.is_contiguous()
        torch.testing.assert_close(out.cpu(), ops.silu_mul(x), **tolerance(dtype))
        assert torch.equal(out, composite_silu_mul(x.cuda()))  # ATen's CUDA silu, then mul
    strided = torch.randn(3, 4, 2 * F).to(dtype).transpose(0, 1)
    torch.testing.assert_close(ops.silu_mul(strided.cuda()).cpu(), ops.silu_mul(strided),
                               **tolerance(dtype))


@requires_cuda
def test_rms_norm_cuda_unaligned_and_strided():
    x, weight = norm_inputs((6, 4), 128, torch.bfloat16)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    unaligned = buf[1:].view_as(x).copy_(x)                             # scalar path
    strided = x.cuda().transpose(0, 1)
    for view, ref in ((unaligned, x), (strided, x.transpose(0, 1))):
        torch.testing.assert_close(ops.rms_norm(view, weight.cuda(), EPS).cpu(),
                                   ops.rms_norm(ref, weight, EPS), **tolerance(torch.bfloat16))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", ROPE_HEAD_DIMS)
@pytest.mark.parametrize("T", ROPE_TOKENS)
def test_apply_rope_cuda_matches_cpu(dtype, d, T):
    for B, H in ROPE_SHAPES:
        x = rope_x(B, H, T, d, dtype)
        cos, sin = rope_tables(B, T, d, dtype)
        out = ops.apply_rope(x.cuda(), cos.cuda(), sin.cuda())
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.cpu(), ops.apply_rope(x, cos, sin), **tolerance(dtype))
        # Contiguous x, tables broadcast over B, strided last dim (the scalar paths).
        cos1, sin1 = cos[:1], sin[:1]
        strided = torch.cat([x, x], dim=-1)[..., ::2]
        for view in (x.contiguous(), strided):
            got = ops.apply_rope(view.cuda(), cos1.cuda(), sin1.cuda()).cpu()
            torch.testing.assert_close(got, ops.apply_rope(view, cos1, sin1), **tolerance(dtype))


@requires_cuda
def test_cuda_gradients_and_autocast():
    x, weight = norm_inputs((5, 3), 128, torch.float32)
    grad = torch.randn(5, 3, 128)
    leaves = [t.cuda().requires_grad_() for t in (x, weight)]
    ops.rms_norm(*leaves, EPS).backward(grad.cuda())
    ref = [t.detach().requires_grad_() for t in (x, weight)]
    composite_rms_norm(*ref, EPS).backward(grad)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.cpu(), b.grad, **tolerance(torch.float32))
    q = rope_x(2, 4, 3, 64, torch.float32)
    cos, sin = rope_tables(2, 3, 64, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.apply_rope(q.cuda().bfloat16(), cos.cuda(), sin.cuda())
        normed = ops.rms_norm(x.cuda().bfloat16(), weight.cuda(), EPS)
    assert out.dtype == torch.float32 and normed.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ops.apply_rope(q.bfloat16().float(), cos, sin))
