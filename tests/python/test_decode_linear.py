"""gkv::decode_linear: the CPU kernel against ATen's linear (bit for bit) and the float64 formula,
gradients, opcheck, bad inputs; on CUDA, our kernel against the CPU kernel over a grid of row
counts, widths and dtypes (one and several splits of K, partial column tiles, strided rows), the
cases that go to cuBLAS, determinism and CUDA-graph replay. The engine's CUDA tests run the decoder
with its projections on this op too (test_engine.py, switched by gkv_ext.switches).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import CUDA, linear_inputs as inputs, requires_cuda, tolerance
from gkv_ext import ops

# (out_features, in_features): one K chunk with a partial one; several splits of K with a partial
# column tile; the narrow projections of Qwen2.5-7B (q/k/v joint, o) at a shorter K; more column
# tiles than SMs (one split) with a partial chunk; and a long K.
WIDTHS = [(8, 8), (72, 136), (200, 1000), (4608, 512), (9000, 264), (64, 6400)]
ROWS = [1, 5, 16, 17, 40, 64]  # one to four m16 tiles, partial ones
LOW_PRECISION = [torch.bfloat16, torch.float16]


def formula(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


def cuda_kernels(fn):
    """Names of the CUDA kernels that fn() launches."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


def uses_our_kernel(fn):
    return any("decode_linear_kernel" in name for name in cuda_kernels(fn))


# ---------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (3,), (2, 1)])
def test_cpu_is_aten_linear(dtype, bias, leading):
    x, w, b = inputs(5, 24, 40, dtype, bias=bias, leading=leading)
    out = ops.decode_linear(x, w, b)
    assert out.shape == (*leading, 5, 24) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, F.linear(x, w, b))
    scale = formula(x, w, b).abs().max().item()
    relative = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), formula(x, w, b), atol=relative * scale, rtol=0)


def test_gradients():
    x, w, b = inputs(3, 6, 8, torch.float64)
    for t in (x, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.decode_linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.decode_linear(x, w), (x, w))


def autocast_devices():
    return ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", autocast_devices())
def test_autocast_casts_as_linear_does(device):
    """Under autocast the op computes in the autocast dtype, as ATen's linear does there (the
    trainer runs the decoder under bf16 autocast with fp32 weights), also for a mix of dtypes."""
    x, w, b = inputs(5, 72, 136, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = F.linear(x, w, b)
        for args in ((x, w, b), (x.bfloat16(), w, b), (x, w, None)):
            out = ops.decode_linear(*args)
            assert out.dtype == torch.bfloat16
            reference = expected if args[2] is not None else F.linear(x, w)
            torch.testing.assert_close(out, reference, **tolerance(torch.bfloat16))
            if device == "cpu":
                assert torch.equal(out, reference)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        ops.decode_linear(x.bfloat16(), w, b)


def opcheck_devices():
    return ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", opcheck_devices())
def test_opcheck(device):
    # bf16 with 3 rows: our kernel on CUDA.
    x, w, b = inputs(3, 72, 136, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.gkv.decode_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.gkv.decode_linear.default, (x, w))
    x, w, b = inputs(3, 8, 16, torch.float64, device)
    torch.library.opcheck(torch.ops.gkv.decode_linear.default, (x.requires_grad_(), w, b))


@pytest.mark.parametrize("args, message", [
    (lambda x, w, b: (x[0, 0], w, b), r"x must have shape \[\.\.\., K\] \(rank >= 1\)"),
    (lambda x, w, b: (x, w[0], b), r"weight must have shape \[N, K\] \(rank 2\)"),
    (lambda x, w, b: (x, w[:, :8], b), r"weight.size\(1\) must be K of x = 16"),
    (lambda x, w, b: (x, w, b[None]), r"bias must have shape \[N\] \(rank 1\)"),
    (lambda x, w, b: (x, w, b[:3]), r"bias.size\(0\) must be N of weight = 6"),
    (lambda x, w, b: (x, w.half(), b), r"weight must have the dtype of x \(Float\), got Half"),
    (lambda x, w, b: (x, w, b.half()), r"bias must have the dtype of x \(Float\), got Half"),
    (lambda x, w, b: (x.int(), w.int(), b), r"x must be float32, bfloat16 or float16, got Int"),
])
def test_bad_inputs(args, message):
    x, w, b = inputs(2, 6, 16, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        ops.decode_linear(*args(x, w, b))


@requires_cuda
def test_bad_device():
    x, w, b = inputs(2, 6, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight is on cuda:0 but x is on cpu"):
        ops.decode_linear(x, w.cuda(), b)


# ---------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n, k", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_cuda_matches_cpu(rows, n, k, dtype):
    for bias in (True, False):
        x, w, b = inputs(rows, n, k, dtype, bias=bias, seed=rows + n)
        expected = ops.decode_linear(x, w, b)
        out = ops.decode_linear(*(None if t is None else t.cuda() for t in (x, w, b)))
        assert out.shape == (rows, n) and out.dtype == dtype
        torch.testing.assert_close(out.cpu(), expected, **tolerance(dtype))
        # One rounding of an fp32 sum: within a unit in the last place of the float64 value, plus
        # the fp32 sum's own error.
        ref = formula(x, w, b)
        magnitude = formula(x.abs(), w.abs(), None if b is None else b.abs())
        ulp = ref.abs() * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)
        assert ((out.cpu().double() - ref).abs() <= ulp + 1e-5 * magnitude).all()
    x, w, b = (t.cuda() for t in inputs(rows, n, k, dtype))
    assert uses_our_kernel(lambda: ops.decode_linear(x, w, b))


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_strided_and_leading_rows(dtype):
    """Rows of x a slice of a wider buffer (row stride K + 8: read in place; K + 4: not 16-byte
    aligned, so cuBLAS) and leading dims, as the decoder's [B, 1, K] activations."""
    x, w, b = inputs(12, 200, 1000, dtype, "cuda")
    for pad in (8, 4):
        wide = torch.zeros(12, 1000 + pad, dtype=dtype, device="cuda")
        wide[:, :1000] = x
        out = ops.decode_linear(wide[:, :1000], w, b)
        if pad == 8:
            assert torch.equal(out, ops.decode_linear(x, w, b))
        else:
            torch.testing.assert_close(out, F.linear(x, w, b), **tolerance(dtype))
        assert uses_our_kernel(lambda: ops.decode_linear(wide[:, :1000], w, b)) == (pad == 8)
    out = ops.decode_linear(x.view(3, 4, 1000).unsqueeze(2), w, b)
    assert out.shape == (3, 4, 1, 200)
    assert torch.equal(out.view(12, 200), ops.decode_linear(x, w, b))


@requires_cuda
def test_cuda_other_cases_are_aten_linear():
    """More than 64 rows, fp32, K not a multiple of 8 and a strided weight go to ATen's linear:
    the same bits."""
    x, w, b = inputs(5, 200, 1000, torch.bfloat16, "cuda")
    strided_weight = torch.empty(1000, 200, dtype=w.dtype, device="cuda").t().copy_(w)
    cases = [inputs(65, 200, 1000, torch.bfloat16, "cuda"),
             inputs(5, 200, 1000, torch.float32, "cuda"),
             inputs(5, 200, 1002, torch.bfloat16, "cuda"),
             (x, strided_weight, b)]
    for x, w, b in cases:
        assert torch.equal(ops.decode_linear(x, w, b), F.linear(x, w, b))
        assert not uses_our_kernel(lambda: ops.decode_linear(x, w, b))


@requires_cuda
@pytest.mark.parametrize("rows", [16, 64])  # the mma.sync and the wgmma shape
def test_cuda_deterministic_and_graph_replay(rows):
    """The splits are summed in a fixed order: repeated calls and a CUDA-graph replay of a chain
    of calls (chained launches inside the graph) give the same bits."""
    x, w, b = inputs(rows, 4608, 3584, torch.bfloat16, "cuda")
    w2 = torch.randn(3584, 4608, device="cuda", dtype=torch.bfloat16)
    chain = lambda: ops.decode_linear(ops.decode_linear(x, w, b), w2)  # noqa: E731
    eager = chain()
    assert torch.equal(chain(), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = chain()
    for _ in range(3):
        graph.replay()
        assert torch.equal(replayed, eager)
