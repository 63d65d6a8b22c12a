"""tuned_linear (csrc/ops/tuned_linear.h): linear through the cuBLASLt algorithm timed fastest for
its shape. On a CPU, and wherever it does not apply, it is ATen's linear bit for bit. On CUDA,
against ATen's linear over a grid of rows, widths, dtypes and biases; what the timing records; a
capture before the shape was timed (ATen's linear, no timing inside it) and one after (the chosen
algorithm replays); unaligned rows; a timing with no room for its weight copies, and a device
too full for the timing's scratch; and the decoder's logits with the switch on and off.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import gkv_ext
from conftest import CUDA, linear_inputs as inputs, requires_cuda
from gkv_ext import _C

LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def tiny_cuda_model(tmp_path_factory):
    """A tiny random Qwen2 (q/k/v biases) as our model on CUDA in bf16."""
    pytest.importorskip("transformers")
    from hf_models import random_hf

    path = tmp_path_factory.mktemp("qwen2")
    random_hf("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)).save_pretrained(
        path, safe_serialization=True)
    model = gkv_ext.load_model(path)
    out = gkv_ext.Model.from_tensors(model.config,
                                     {k: v.to("cuda") for k, v in model.state_dict().items()})
    out.to(dtype=torch.bfloat16)
    return out


def choice(rows, n, k, bias, dtype):
    found = [c for c in _C.tuned_linear_choices()
             if (c["rows"], c["n"], c["k"], c["bias"]) == (rows, n, k, bias)
             and c["dtype"] == str(dtype).removeprefix("torch.").replace("bfloat16", "BFloat16")
             .replace("float16", "Half")]
    return found[0] if found else None


def assert_close_to_aten(out, x, w, b):
    ref = F.linear(x, w, b).float()
    assert out.shape == ref.shape and out.dtype == x.dtype
    # Algorithms differ in summation order only: a few bf16 roundings of the largest entry.
    assert (out.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_is_aten_linear(dtype):
    x, w, b = inputs(37, 24, 40, dtype, "cpu")
    assert torch.equal(_C.tuned_linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(_C.tuned_linear(x, w), F.linear(x, w))
    assert choice(37, 24, 40, True, dtype) is None


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("rows", [17, 100, 437, 1024])
@pytest.mark.parametrize("n,k", [(256, 128), (1000, 520), (4608, 3584)])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_matches_aten_and_records_its_choice(dtype, rows, n, k, bias):
    x, w, b = inputs(rows, n, k, dtype, "cuda", bias=bias, seed=rows + n)
    assert_close_to_aten(_C.tuned_linear(x, w, b), x, w, b)
    c = choice(rows, n, k, bias, dtype)
    assert c is not None and c["candidates"] >= 1 and -1 <= c["chosen"] < c["candidates"]
    assert c["chosen_us"] <= c["aten_us"] and c["aten_us"] > 0
    # Later calls take the recorded choice, on new data too.
    x2, _, _ = inputs(rows, n, k, dtype, "cuda", bias=bias, seed=rows + n + 1)
    assert_close_to_aten(_C.tuned_linear(x2, w, b), x2, w, b)
    assert len([d for d in _C.tuned_linear_choices() if d == c]) == 1


@requires_cuda
def test_cuda_leading_dims_and_unaligned_rows():
    x, w, b = inputs(40, 264, 136, torch.bfloat16, "cuda", leading=(3,))
    out = _C.tuned_linear(x, w, b)
    assert out.shape == (3, 40, 264)
    assert_close_to_aten(out, x, w, b)
    # x one element into its storage: 2-byte aligned, where the 256-byte case was timed.
    flat = torch.randn(121 * 136 + 1, device="cuda", dtype=torch.bfloat16)
    x_odd = flat[1:].view(121, 136)
    assert_close_to_aten(_C.tuned_linear(x_odd, w, b), x_odd, w, b)


@requires_cuda
@pytest.mark.parametrize("rows", [16, 1025])
def test_cuda_outside_its_rows_is_aten_linear(rows):
    x, w, b = inputs(rows, 72, 64, torch.bfloat16, "cuda")
    assert torch.equal(_C.tuned_linear(x, w, b), F.linear(x, w, b))
    assert choice(rows, 72, 64, True, torch.bfloat16) is None


@requires_cuda
def test_cuda_gradients_and_autocast_go_to_aten():
    x, w, b = inputs(48, 40, 24, torch.bfloat16, "cuda")
    w.requires_grad_(True)
    out = _C.tuned_linear(x, w, b)
    assert torch.equal(out, F.linear(x, w, b))
    out.float().sum().backward()
    assert w.grad is not None and choice(48, 40, 24, True, torch.bfloat16) is None
    x32, w32, b32 = inputs(48, 40, 24, torch.float32, "cuda", seed=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(_C.tuned_linear(x32, w32, b32), F.linear(x32, w32, b32))


def tuned_with_room(x, w, b, room):
    """tuned_linear(x, w, b) with the process capped at its reserved memory plus `room` bytes;
    returns its result and the allocations the cap refused."""
    F.linear(x, w, b)  # cuBLAS's workspace for this stream, allocated once, before the cap
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(x.device).total_memory
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + room) / total)
    try:
        out = _C.tuned_linear(x, w, b)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out, torch.cuda.memory_stats().get("num_ooms", 0) - ooms


@requires_cuda
def test_cuda_timing_without_room_for_the_weight_copies():
    """The timing takes turns over copies of a weight that fits in L2. With no room left for a
    copy (a batch that fills the device), it times on the weight alone instead of failing."""
    rows, n, k = 64, 10240, 4608  # a 90 MiB weight: 2 of them exceed a 50 MiB L2 twice
    x, w, b = inputs(rows, n, k, torch.bfloat16, "cuda", seed=11)
    if 2 * torch.cuda.get_device_properties(x.device).L2_cache_size <= w.nbytes:
        pytest.skip("this L2 is too small for the weight to be copied")
    # Room for the timing's own scratch, as the caching allocator rounds it: the results and
    # their fp32 comparisons (1-10 MiB each, which it serves from 20 MiB segments) and a
    # candidate's workspace of up to 32 MiB. Not for the 90 MiB copy, even once those are freed.
    out, ooms = tuned_with_room(x, w, b, 64 << 20)
    assert ooms > 0  # the copy was refused
    assert_close_to_aten(out, x, w, b)
    assert math.isfinite(choice(rows, n, k, True, torch.bfloat16)["aten_us"])  # it was timed


@requires_cuda
def test_cuda_device_too_full_to_time_keeps_aten():
    """With no room even for the timing's scratch, the shape keeps ATen's linear, untimed: the call
    is ATen's (which may itself find no room, as any linear would) and later calls do not time."""
    rows, n, k = 64, 4352, 4608
    x, w, b = inputs(rows, n, k, torch.float16, "cuda", seed=12)
    try:
        tuned_with_room(x, w, b, 0)
    except torch.OutOfMemoryError:
        pass  # ATen's own output found no room in the cap: the user's linear would fail there too
    kept = choice(rows, n, k, True, torch.float16)
    assert kept is not None, "the refused timing should leave the shape on ATen, not untried"
    assert kept["chosen"] == -1 and kept["candidates"] == 0 and math.isnan(kept["aten_us"])
    assert torch.equal(_C.tuned_linear(x, w, b), F.linear(x, w, b))  # with room: still ATen's
    assert math.isnan(choice(rows, n, k, True, torch.float16)["aten_us"])  # and not timed again


@requires_cuda
def test_cuda_graph_capture_before_and_after_timing():
    x, w, b = inputs(96, 520, 264, torch.float16, "cuda", seed=7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.linear(x, w, b)  # cuBLAS's lazy per-stream setup, outside any capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _C.tuned_linear(x, w, b)  # not timed yet: ATen's linear, nothing timed
    assert choice(96, 520, 264, True, torch.float16) is None
    graph.replay()
    assert torch.equal(captured, F.linear(x, w, b))

    _C.tuned_linear(x, w, b)  # eager: times the shape
    assert choice(96, 520, 264, True, torch.float16) is not None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _C.tuned_linear(x, w, b)
    x.copy_(inputs(96, 520, 264, torch.float16, "cuda", seed=8)[0])
    graph.replay()
    assert_close_to_aten(captured, x, w, b)


@requires_cuda
def test_decoder_logits_with_the_switch_on_and_off(tiny_cuda_model):
    model = tiny_cuda_model
    tokens = torch.randint(0, model.config.vocab_size, (24, 1), device="cuda")
    positions = torch.zeros(24, 1, dtype=torch.long, device="cuda")
    with gkv_ext.switches(tuned_linear=False):
        off = model(tokens, positions)
    with gkv_ext.switches(tuned_linear=True):
        on = model(tokens, positions)
    assert (on.float() - off.float()).abs().max().item() <= 2e-2 * off.float().abs().max().item()


def test_switch_is_known_and_off_by_default():
    with gkv_ext.switches(tuned_linear=True):
        assert gkv_ext.switch_on("tuned_linear")
    assert not gkv_ext.switch_on("tuned_linear")
    assert isinstance(_C.built_with_cublaslt, bool)
    if CUDA:
        assert _C.built_with_cublaslt, "a CUDA build should find the cuBLASLt that torch loads"
