"""The decode step's weight GEMMs: per BLAS library torch can pick, gkv::decode_linear and the
GEMM algorithm timed per shape (tuned_linear).

  python scripts/bench_gemms.py --batches 16,64 --out docs/benchmarks_gemms_h200
  python scripts/bench_gemms.py --quick            # tiny sizes, any device (CPU included)

Each projection of the Qwen2.5-7B-shaped decoder (q/k/v with its bias, o, gate/up, down) runs as
28 F.linear calls on a batch of B rows, each layer with its own weight (so nothing stays in L2),
replayed from one CUDA graph as the engine replays its step, once per BLAS library
(torch.backends.cuda.preferred_blas_library) and once as gkv::decode_linear ("gkv": our
weight-streaming kernel, its calls chained to each other as the engine's kernels are) and as
tuned_linear ("tuned": the cuBLASLt algorithm that timed fastest for the shape, as the decoder runs
17-1024 rows; ATen's linear elsewhere). Each also
runs with an RMSNorm of the hidden state between the GEMMs ("us_norm_between": the time per GEMM
and norm, less the norm's own time in a chain of norms), as in the engine's step, where our
GEMM's blocks can start fetching their weights while the small kernel before them runs. Prints
microseconds per call and the weight bandwidth (weight bytes / time) against the device's copy
bandwidth, and writes OUT.json and OUT.png. On CPU there is one library, "default", besides
"gkv" and "tuned" (ATen's linear there too), and no graph.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gkv_ext  # noqa: F401  (registers torch.ops.gkv)
from gkv_ext import _C, ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import copy_bandwidth, graph_replay, table, timed  # noqa: E402

# name, K (in), N (out), bias
PROJECTIONS = [("qkv", 3584, 4608, True), ("o", 3584, 3584, False),
               ("gate_up", 3584, 37888, False), ("down", 18944, 3584, False)]
QUICK_PROJECTIONS = [("tiny", 128, 256, True)]
HIDDEN = 3584  # the normed hidden state between the GEMMs


def bench(device, dtype, projections, batches, libraries, layers, reps):
    rows = []
    jobs = [(p, b) for p in projections for b in batches]
    weights = {}
    for (name, K, N, bias), B in tqdm(jobs, desc="gemms", unit="shape"):
        if name not in weights:
            weights.clear()  # one projection's weights at a time
            weights[name] = [(torch.randn(N, K, device=device, dtype=dtype) / K**0.5,
                              torch.randn(N, device=device, dtype=dtype) if bias else None)
                             for _ in range(layers)]
        x = torch.randn(B, K, device=device, dtype=dtype)
        hidden = torch.randn(B, HIDDEN, device=device, dtype=dtype)
        norm_weight = torch.ones(HIDDEN, device=device, dtype=dtype)

        def chain(x=x, ws=weights[name], linear=F.linear, norm=False):
            for w, b in ws:
                linear(x, w, b)
                if norm:
                    ops.rms_norm(hidden, norm_weight, 1e-6)

        def per_layer_ms(fn):
            return timed(graph_replay(fn) if device.type == "cuda" else fn, reps) / layers

        def norms():
            for _ in range(layers):
                ops.rms_norm(hidden, norm_weight, 1e-6)

        norm_ms = per_layer_ms(norms)
        for library in libraries:
            linear = F.linear
            if library == "gkv":
                linear = ops.decode_linear
            elif library == "tuned":
                linear = _C.tuned_linear
            elif device.type == "cuda":
                torch.backends.cuda.preferred_blas_library(library)
            ms = per_layer_ms(lambda: chain(linear=linear))
            with_norm_ms = per_layer_ms(lambda: chain(linear=linear, norm=True)) - norm_ms
            rows.append({"proj": name, "B": B, "N": N, "K": K, "library": library,
                         "us": ms * 1e3, "TBps": N * K * x.element_size() / ms / 1e9,
                         "us_norm_between": with_norm_ms * 1e3})
    return rows


def plot(rows, copy_tbps, path):
    """One panel per projection: weight bandwidth (weight bytes / us_norm_between, the time as in
    the engine's step) against the rows, a line per library."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    projections = list(dict.fromkeys(r["proj"] for r in rows))
    libraries = list(dict.fromkeys(r["library"] for r in rows))
    fig, axes = plt.subplots(1, len(projections), figsize=(3.2 * len(projections), 3.4),
                             sharey=True, squeeze=False)
    for ax, proj in zip(axes[0], projections):
        for library in libraries:
            mine = [r for r in rows if r["proj"] == proj and r["library"] == library]
            ax.plot([r["B"] for r in mine],
                    [r["TBps"] * r["us"] / r["us_norm_between"] for r in mine],
                    marker="o", ms=3, label=library)
        ax.axhline(copy_tbps, color="k", ls="--", lw=1, label="copy bandwidth")
        first = next(r for r in rows if r["proj"] == proj)
        ax.set_title(f"{proj} (N={first['N']}, K={first['K']})", fontsize=9)
        ax.set_xlabel("rows (decode batch)")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("weight TB/s, norm between")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("decode-step GEMMs, 28 layers per CUDA graph", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ints(text):
    return [int(v) for v in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, any device")
    ap.add_argument("--batches", type=ints, default=None, help="rows per GEMM (decode batch sizes)")
    ap.add_argument("--libraries", default="cublas,cublaslt,gkv,tuned",
                    help="BLAS libraries to compare (CUDA), gkv: gkv::decode_linear, tuned: "
                         "tuned_linear")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="bench_gemms", help="writes OUT.json and OUT.png")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    batches = args.batches or ([1, 4] if quick else [1, 16, 64])
    if min(batches) < 1:
        ap.error(f"batches must be >= 1, got {batches}")
    libraries = args.libraries.split(",") if device.type == "cuda" else ["default", "gkv", "tuned"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    rows = bench(device, dtype, QUICK_PROJECTIONS if quick else PROJECTIONS, batches, libraries,
                 4 if quick else 28, 3 if quick else args.reps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "copy_GBps": bw, "rows": rows}, indent=1))
    plot(rows, bw / 1e3, out.with_suffix(".png"))
    print(f"\ndevice: {name}; copy bandwidth {bw:.0f} GB/s")
    print(table("weight GEMMs per call (us) and weight bandwidth (TB/s)", rows))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
