"""Chained launches (programmatic dependent launch) of the decode step's kernels: a kernel may start
while the one before it finishes, and must wait before it reads that kernel's output. A chain of
layers shaped like a decode step (norm, projection, RoPE, cache write, attention and its combine,
SiLU) where each kernel reads what the one before it wrote: eager and graph-replayed on CUDA
against the same chain on CPU, and against the same chain launched plainly (switch chained_launch
off) bit for bit.
"""
import torch
import torch.nn.functional as F

import gkv_ext
from conftest import requires_cuda
from gkv_ext import ops

B, HQ, HKV, D, SLOTS, LAYERS = 3, 8, 2, 32, 40, 4
WIDTH = HQ * D // 2  # the hidden size: silu_mul halves the attention output


def chain_inputs(device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, WIDTH, generator=g)
    layers = []
    for _ in range(LAYERS):
        k = torch.randn(B, HKV, SLOTS, D, generator=g)
        layers.append({
            "norm": torch.rand(WIDTH, generator=g) + 0.5,
            "proj": torch.randn((HQ + 2 * HKV) * D, WIDTH, generator=g) / WIDTH**0.5,
            "k": k, "v": torch.randn(k.shape, generator=g),
            # slot SLOTS - 1 starts empty: attention sees the new token only once it is written
            "pos": torch.arange(SLOTS, dtype=torch.int32).repeat(B, HKV, 1).index_fill_(
                2, torch.tensor([SLOTS - 1]), -1)})
    angles = torch.rand(1, 1, 1, D // 2, generator=g) * 10
    emb = torch.cat([angles, angles], -1)
    tables = {"cos": emb.cos(), "sin": emb.sin(), "slot": torch.tensor([SLOTS - 1]),
              "new_pos": torch.full((B, HKV), SLOTS - 1, dtype=torch.int32)}
    move = lambda t: t.to(device)  # noqa: E731
    return (move(hidden), [{n: move(t) for n, t in layer.items()} for layer in layers],
            {n: move(t) for n, t in tables.items()})


def run_chain(hidden, layers, tables):
    """The layers in place on their caches; returns the last hidden state."""
    for layer in layers:
        qkv = F.linear(ops.rms_norm(hidden, layer["norm"], 1e-6), layer["proj"])
        heads = qkv.view(B, 1, HQ + 2 * HKV, D).transpose(1, 2)  # [B, H, 1, d]
        qk = ops.apply_rope(heads[:, :HQ + HKV], tables["cos"], tables["sin"])
        ops.write_slot_(layer["k"], layer["v"], layer["pos"], qk[:, HQ:, 0],
                        heads[:, HQ + HKV:, 0], tables["new_pos"], tables["slot"])
        out = ops.decode_attention(qk[:, :HQ, 0], layer["k"], layer["v"], layer["pos"], SLOTS,
                                   D**-0.5)
        hidden = ops.silu_mul(out.reshape(B, HQ * D))
    return hidden


def cuda_chain():
    hidden, layers, tables = chain_inputs("cuda")
    return run_chain(hidden, layers, tables)


@requires_cuda
def test_chain_matches_cpu_eager_and_replayed():
    expected = run_chain(*chain_inputs("cpu"))
    eager = cuda_chain()
    torch.testing.assert_close(eager.cpu(), expected, atol=1e-4, rtol=1e-4)
    hidden, layers, tables = chain_inputs("cuda")
    run_chain(hidden, layers, tables)  # warm-up: cuBLAS's per-stream state
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = run_chain(hidden, layers, tables)
    for _ in range(3):
        graph.replay()
        assert torch.equal(replayed, eager)


@requires_cuda
def test_plain_launches_give_the_same_bits():
    chained = cuda_chain()
    with gkv_ext.switches(chained_launch=False):
        plain = cuda_chain()
    assert torch.equal(plain, chained)
