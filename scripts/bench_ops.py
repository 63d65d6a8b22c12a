"""Benchmark of the gkv ops against their peers, measured in the same run.

  python scripts/bench_ops.py                 # full grid (GPU), writes docs/benchmarks_ops.{json,png}
  python scripts/bench_ops.py --quick         # small sizes, any device (CPU included)

Sections (issue 2):
  1. decode_attention, bf16, Hq=28, Hkv=4, d=128: time and effective bandwidth (bytes of K and V
     read / time), with and without score emission, against torch SDPA on the same tensors.
  2. lifetime_attention forward+backward, bf16, d=128: against SDPA causal (flash backend), with
     peak memory.
  3. One layer's compression (redundancy_scores_carry with the exemptions a cache carries +
     select_keep + compact_) at N=2176, B*Hkv=32, against the reference's eager PyTorch pipeline
     (similarity, topk, sort, gather); redundancy_scores alone with and without carried ones.
  4. The decoder's fused elementwise ops at a Qwen2.5-7B decode step (T=1, D=3584, Hq=28,
     Hkv=4, d=128), bf16: rms_norm of the hidden state and apply_rope of q (a transposed view, as
     the decoder passes it), each against its composite ATen formula (the decoder's former code).
     At these sizes both are bound by launch overhead, which is what the fusion removes.
  5. decode_attention at the engine's sizes (issue 3; CUDA only): B in {16, 64}, the G-KV cache
     of budget 1024 / 2048 (capacity 1152 / 2176) with 1101 / 2112 live slots read through
     live_length, 8 layers with their own K and V (nothing served from L2) replayed from one CUDA
     graph. Peers on the live slots: SDPA with enable_gqa (q [B, Hq, 1, d]), and cuDNN's flash
     kernel given each KV head's group as G query rows (q [B, Hkv, G, d]).
The device copy bandwidth (bytes read + written by a large device-to-device copy) is measured
first and is the yardstick of the memory-bound rows.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gkv_ext
from gkv_ext import ops

INT32_MAX = 2**31 - 1


def timed(fn, reps, warmup=3):
    """Median milliseconds of fn() over reps runs (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    samples = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def graph_replay(fn):
    """The replay of fn captured as a CUDA graph, after a warm-up outside the capture (cuBLAS
    workspaces, autotuning)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device, nbytes):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / ms / 1e6  # GB/s, read + write


def bench_decode(device, dtype, batches, lengths, reps, bw):
    rows = []
    hq, hkv, d = 28, 4, 128
    for b, c in tqdm([(b, c) for b in batches for c in lengths], desc="decode_attention"):
        q = torch.randn(b, hq, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, c, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, c, d, device=device, dtype=dtype)
        pos = torch.arange(c, device=device, dtype=torch.int32).expand(b, hkv, c).contiguous()
        acc = torch.zeros(b, hkv, c, device=device, dtype=torch.float32)
        scale = d ** -0.5
        plain = timed(lambda: ops.decode_attention(q, k, v, pos, c, scale), reps)
        emit = timed(lambda: ops.decode_attention(q, k, v, pos, c, scale, acc), reps)
        q4 = q.unsqueeze(2)
        sdpa = timed(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale,
                                                            enable_gqa=True), reps)
        kv_bytes = 2 * k.numel() * k.element_size()
        rows.append({"B": b, "C": c, "gkv_ms": plain, "gkv_emit_ms": emit, "sdpa_ms": sdpa,
                     "gkv_GBps": kv_bytes / plain / 1e6, "emit_GBps": kv_bytes / emit / 1e6,
                     "sdpa_GBps": kv_bytes / sdpa / 1e6,
                     "gkv_pct_copy_bw": 100 * kv_bytes / plain / 1e6 / bw,
                     "emit_overhead_pct": 100 * (emit / plain - 1)})
        del q, k, v, pos, acc
    return rows


def bench_engine_sizes(device, dtype, reps, layers=8, hq=28, hkv=4, d=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    shapes = [(16, 1152, 1101), (16, 2176, 2112), (64, 1152, 1101), (64, 2176, 2112)]
    for b, c, live in tqdm(shapes, desc="decode_attention, engine sizes"):
        qs = [torch.randn(b, hq, d, device=device, dtype=dtype) for _ in range(layers)]
        ks = [torch.randn(b, hkv, c, d, device=device, dtype=dtype) for _ in range(layers)]
        vs = [torch.randn(b, hkv, c, d, device=device, dtype=dtype) for _ in range(layers)]
        pos = torch.arange(c, device=device, dtype=torch.int32).expand(b, hkv, c).contiguous()
        live_length = torch.tensor([live], device=device)
        scale = d ** -0.5

        def ours():
            for q, k, v in zip(qs, ks, vs):
                ops.decode_attention(q, k, v, pos, c, scale, live_length=live_length)

        def sdpa_gqa():
            for q, k, v in zip(qs, ks, vs):
                F.scaled_dot_product_attention(q.unsqueeze(2), k[:, :, :live], v[:, :, :live],
                                               scale=scale, enable_gqa=True)

        def cudnn_rows():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                for q, k, v in zip(qs, ks, vs):
                    F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k[:, :, :live],
                                                   v[:, :, :live], scale=scale)

        kv_bytes = 2 * b * hkv * live * d * torch.finfo(dtype).bits // 8
        row = {"B": b, "C": c, "live": live}
        for name, fn in (("gkv", ours), ("sdpa_gqa", sdpa_gqa), ("cudnn_rows", cudnn_rows)):
            us = timed(graph_replay(fn), reps) * 1e3 / layers
            row[f"{name}_us"] = us
            row[f"{name}_TBps"] = kv_bytes / us / 1e6
        rows.append(row)
        del qs, ks, vs
    return rows


def peak_mb(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_lifetime(device, dtype, lengths, reps, hq=28, hkv=4):
    rows = []
    d = 128
    for t in tqdm(lengths, desc="lifetime_attention"):
        q = torch.randn(1, hq, t, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, hkv, t, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, hkv, t, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(1, hq, t, d, device=device, dtype=dtype)
        never = torch.full((1, hkv, t), INT32_MAX, device=device, dtype=torch.int32)
        # A compressed-cache pattern: half the keys die 1024 positions after they appear.
        lifetime = torch.where(torch.rand(1, hkv, t, device=device) < 0.5, 1024, INT32_MAX // 2)
        evicted = (torch.arange(t, device=device) + lifetime).clamp(max=INT32_MAX).to(torch.int32)
        scale = d ** -0.5

        def ours(death):
            out, _ = ops.lifetime_attention(q, k, v, death, scale)
            out.backward(grad)

        def sdpa():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                     enable_gqa=True)
            out.backward(grad)

        row = {"T": t, "gkv_causal_ms": timed(lambda: ours(never), reps),
               "gkv_evicting_ms": timed(lambda: ours(evicted), reps)}
        try:
            row["sdpa_flash_ms"] = timed(sdpa, reps)
            row["sdpa_peak_MB"] = peak_mb(sdpa, device)
        except RuntimeError as err:  # no flash backend on this device (e.g. CPU)
            row["sdpa_flash_ms"], row["sdpa_peak_MB"] = float("nan"), float("nan")
            row["sdpa_note"] = str(err).splitlines()[0][:80]
        row["gkv_peak_MB"] = peak_mb(lambda: ours(evicted), device)
        row["ratio_vs_sdpa"] = row["gkv_causal_ms"] / row["sdpa_flash_ms"]
        rows.append(row)
        del q, k, v, grad
    return rows


def reference_compression(k, v, pos, score, keep, window, threshold=0.5):
    """The authors' eager pipeline (reference section 2.2-2.3): dense cosine similarity with the
    latest-duplicate exemption and softmax, then topk, sort and gather."""
    kn = k.float() / (k.float().norm(dim=-1, keepdim=True) + 1e-6)
    sim = kn @ kn.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    n = sim.shape[-1]
    rows = torch.arange(n, device=k.device).view(1, 1, n, 1)
    latest = torch.where(sim > threshold, rows, -1).amax(dim=-2)  # [B,H,N] per column
    exempt = torch.zeros_like(sim).scatter_(
        -2, latest.clamp(min=0).unsqueeze(-2), (latest >= 0).float().unsqueeze(-2))
    redundancy = torch.softmax((sim * (1 - exempt)).sum(-1) / n, dim=-1)
    combined = score[..., : n - window] - redundancy[..., : n - window]
    top = combined.topk(keep, dim=-1).indices.sort(dim=-1).values
    tail = torch.arange(n - window, n, device=k.device).expand(*top.shape[:-1], window)
    idx = torch.cat([top, tail], dim=-1)
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, gather), v.gather(2, gather), pos.gather(2, idx)


def reference_window_scores(q, k, scale):
    """The authors' eager local score (reference section 2.1): softmax attention of the window
    queries over the cache (causal within the window), max over the GQA group, mean over the
    window; every slot live."""
    B, Hq, W, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    logits = q.float().view(B, Hkv, Hq // Hkv, W, d) @ k.float().unsqueeze(2).transpose(-1, -2)
    unseen = torch.arange(N, device=k.device) > (N - W + torch.arange(W, device=k.device))[:, None]
    p = torch.softmax((logits * scale).masked_fill(unseen, float("-inf")), dim=-1)
    return p.amax(2).mean(2)[..., : N - W]


def bench_compression(device, dtype, n, batches, reps, hkv=4, hq=28, d=128, window=16,
                      interval=128):
    """A compression step of one layer at its peak length: n = budget + interval (divide_length
    D), per batch size."""
    return [compression_row(device, dtype, n, b, reps, hkv, hq, d, window, interval)
            for b in tqdm(batches, desc="compression")]


def compression_row(device, dtype, n, batch, reps, hkv, hq, d, window, interval):
    budget = n - interval
    q_win = torch.randn(batch, hq, window, d, device=device, dtype=dtype)
    scale = d ** -0.5
    k = torch.randn(batch, hkv, n, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    pos = torch.arange(n, device=device, dtype=torch.int32).expand(batch, hkv, n).contiguous()
    score = torch.rand(batch, hkv, n, device=device)
    keep = budget - window
    # What a compression carries: the exemptions of the kept slots among themselves (here the
    # first `budget`), so that only the `interval` slots added since are scanned whole.
    none = torch.empty(batch, hkv, 0, device=device, dtype=torch.int32)
    carried = ops.redundancy_scores_carry(k[:, :, :budget].contiguous(),
                                          pos[:, :, :budget].contiguous(), none)[1]

    def ours():
        kc, vc, pc, sc = k.clone(), v.clone(), pos.clone(), score.clone()
        r = ops.redundancy_scores_carry(kc, pc, carried)[0]
        idx = ops.select_keep(sc[..., : n - window] - r[..., : n - window], keep, window)
        ops.compact_(kc, vc, pc, sc, idx)

    def clones():
        k.clone(), v.clone(), pos.clone(), score.clone()

    clone_ms = timed(clones, reps)
    return {"N": n, "B*Hkv": batch * hkv,
             "gkv_ms": timed(ours, reps) - clone_ms,
             "redundancy_ms": timed(lambda: ops.redundancy_scores(k, pos), reps),
             "redundancy_carried_ms": timed(lambda: ops.redundancy_scores_carry(k, pos, carried),
                                            reps),
             "select_ms": timed(lambda: ops.select_keep(score[..., : n - window], keep, window), reps),
             "reference_eager_ms": timed(
                 lambda: reference_compression(k, v, pos, score, keep, window), reps),
             "window_scores_ms": timed(lambda: ops.window_scores(q_win, k, pos, scale), reps),
             "reference_window_ms": timed(lambda: reference_window_scores(q_win, k, scale), reps)}


def composite_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def composite_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def bench_fused(device, dtype, batches, reps, hidden=3584, hq=28, d=128, eps=1e-6):
    """One decode step's rms_norm and q rope (T = 1) per batch size, against the composites."""
    rows = []
    for b in tqdm(batches, desc="fused ops"):
        h = torch.randn(b, 1, hidden, device=device, dtype=dtype)
        weight = torch.randn(hidden, device=device, dtype=dtype)
        q = torch.randn(b, 1, hq, d, device=device, dtype=dtype).transpose(1, 2)  # [B,Hq,1,d]
        angles = torch.rand(b, 1, 1, d // 2, device=device) * 100
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        rows.append({
            "B": b,
            "gkv_rms_norm_ms": timed(lambda: ops.rms_norm(h, weight, eps), reps),
            "composite_rms_norm_ms": timed(lambda: composite_rms_norm(h, weight, eps), reps),
            "gkv_rope_ms": timed(lambda: ops.apply_rope(q, cos, sin), reps),
            "composite_rope_ms": timed(lambda: composite_rope(q, cos, sin), reps)})
    return rows


def table(title, rows):
    cols = list(rows[0])
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"\n### {title}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def bar_groups(rows, series, group_labels, ylabel, title, path, log=False):
    """One group of bars per row, one bar per (key, label) of series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width,
               label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(rows))], group_labels)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_engine_sizes(rows, path):
    bar_groups(rows, [("gkv_us", "gkv"), ("sdpa_gqa_us", "SDPA enable_gqa"),
                      ("cudnn_rows_us", "cuDNN, group as rows")],
               [f"B={r['B']}\n{r['live']} live" for r in rows], "us per layer",
               "decode_attention at the engine's sizes, bf16, Hq=28 Hkv=4 d=128", path)


def plot_compression(rows, path):
    bar_groups(rows, [("gkv_ms", "gkv compression (carried)"),
                      ("redundancy_ms", "redundancy_scores"),
                      ("redundancy_carried_ms", "redundancy_scores_carry"),
                      ("reference_eager_ms", "reference eager compression")],
               [f"B*Hkv={r['B*Hkv']}, N={r['N']}" for r in rows], "ms per layer (log)",
               "one layer's compression, bf16, d=128", path, log=True)


def plot(decode_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for b in sorted({r["B"] for r in decode_rows}):
        rs = [r for r in decode_rows if r["B"] == b]
        c = [r["C"] for r in rs]
        line, = ax.plot(c, [r["gkv_GBps"] for r in rs], marker="o", label=f"gkv B={b}")
        ax.plot(c, [r["sdpa_GBps"] for r in rs], ls="--", color=line.get_color(),
                label=f"SDPA B={b}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache slots C")
    ax.set_ylabel("K+V GB/s")
    ax.set_title("decode_attention bf16, Hq=28 Hkv=4 d=128")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU-friendly)")
    parser.add_argument("--out", default="docs/benchmarks_ops", help="JSON/PNG path prefix")
    parser.add_argument("--only", default="decode,lifetime,compression,fused,engine_sizes",
                        help="comma-separated sections to run")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and gkv_ext.built_with_cuda else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    if args.quick:
        batches, lengths, t_lengths, reps, comp_batches, comp_n = [1, 4], [512, 2048], [256], 5, [2], 272
    else:
        batches, lengths, t_lengths, reps, comp_batches, comp_n = (
            [1, 8, 32, 64], [2048, 4096, 8192, 16384, 32768], [4096, 8192, 16384], 20, [8, 64], 2176)
    fused_batches = [1, 4] if args.quick else [1, 16, 64]
    bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    print(f"device: {name}, torch {torch.__version__}; measured copy bandwidth {bw:.0f} GB/s")
    sections = {
        "decode_attention": ("decode", lambda: bench_decode(device, dtype, batches, lengths, reps, bw)),
        "lifetime_attention": ("lifetime",
                               lambda: bench_lifetime(device, dtype, t_lengths, max(3, reps // 4))),
        "compression": ("compression",
                        lambda: bench_compression(device, dtype, comp_n, comp_batches, reps)),
        "fused_ops": ("fused", lambda: bench_fused(device, dtype, fused_batches, reps)),
        "engine_sizes": ("engine_sizes", lambda: bench_engine_sizes(device, dtype, reps)),
    }
    chosen = set(args.only.split(","))
    if "engine_sizes" in chosen and device.type != "cuda":
        print("engine_sizes: needs CUDA graphs and cuDNN, skipped on this device")
        chosen.discard("engine_sizes")
    results = {"device": name, "torch": torch.__version__, "copy_GBps": bw}
    results.update({key: run() for key, (flag, run) in sections.items() if flag in chosen})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    pngs = []
    if "decode_attention" in results:
        pngs.append(out.with_suffix(".png"))
        plot(results["decode_attention"], pngs[-1])
    if "engine_sizes" in results:
        pngs.append(out.with_name(out.name + "_engine_sizes.png"))
        plot_engine_sizes(results["engine_sizes"], pngs[-1])
    if "compression" in results:
        pngs.append(out.with_name(out.name + "_compression.png"))
        plot_compression(results["compression"], pngs[-1])
    print(f"\ndevice: {name}; copy bandwidth {bw:.0f} GB/s; times in ms (median)")
    titles = {"decode_attention": "decode_attention (bf16, Hq=28, Hkv=4, d=128)",
              "lifetime_attention": "lifetime_attention fwd+bwd (bf16, Hq=28, Hkv=4, d=128)",
              "compression": "compression of one layer (bf16, d=128)",
              "fused_ops": "fused rms_norm / apply_rope at a decode step "
                           "(bf16, D=3584, Hq=28, d=128)",
              "engine_sizes": "decode_attention at the engine's sizes, us per layer "
                              "(bf16, Hq=28, Hkv=4, d=128; 8 layers in one graph)"}
    for key, title in titles.items():
        if key in results:
            print(table(title, results[key]))
    print(f"\nwrote {out.with_suffix('.json')}" + "".join(f" and {p}" for p in pngs))


if __name__ == "__main__":
    main()
