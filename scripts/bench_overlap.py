"""Can a layer's weight GEMMs of one half-batch overlap the decode attention of the other?

  python scripts/bench_overlap.py --batch 928 --carveouts 24,40,56 --out docs/benchmarks_overlap_h200
  python scripts/bench_overlap.py --batch 928 --attention-sms 32,40,48 --out docs/benchmarks_partition_h200

The question behind the equal-memory target: at G-KV's largest batch (about 928 sequences of a
Qwen2.5-7B-shaped model at budget 2048 on one H200) the step is the compute-bound weight GEMMs
(M = B) followed by the memory-bound attention over 2112 live slots; overlapping them would
approach max(GEMMs, attention) instead of their sum. Measured here, every variant as 28 layers
replayed from one CUDA graph, random bf16 weights of the Qwen2.5-7B layer shapes:
  sequential   each layer's q/k/v GEMM, attention, o / gate-up / down GEMMs over the whole batch;
  gemms only   the same without the attention;
  ping-pong    two half-batches on two streams; a half's attention waits for the other half's
               attention of the same layer, so that one half's GEMMs run beside the other's
               attention;
  attention    the attention alone.
  partitioned  (--attention-sms N) the SMs cut in two with CUDA green contexts
               (gkv_ext._C.SmPartition): every attention runs on a stream that owns N SMs, every
               GEMM on a stream that owns the rest; the two halves' layers are pipelined so that
               one half's attention runs beside the other half's GEMMs.
Attention is ours (gkv::decode_attention over a 2176-slot cache) or torch SDPA (cuDNN's flash
kernel on this machine) over the live slots. --carveouts asks cuBLASLt to leave that many SMs
free for the attention (torch's experimental SM carveout; cuBLASLt is made the preferred BLAS
library so that every GEMM sees it).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gkv_ext import _C, ops
from bench_generate import SHAPES  # scripts/ is on the path when a script runs
from bench_ops import graph_replay, timed

LIVE, SLOTS = 2112, 2176  # G-KV@2048: live slots mid-way between compressions, capacity


def graph_ms(fn, reps=8):
    """Median milliseconds of one replay of fn captured as a CUDA graph."""
    return timed(graph_replay(fn), reps, warmup=1)


class Layers:
    """The shapes of one Qwen2.5-7B layer, 28 times, over a batch of B one-token rows."""

    def __init__(self, batch, attention, device="cuda", dtype=torch.bfloat16):
        s = SHAPES["qwen2.5-7b"]
        self.hidden, self.ffn = s["hidden_size"], s["intermediate_size"]
        self.hq, self.hkv = s["num_attention_heads"], s["num_key_value_heads"]
        self.d, self.layers = self.hidden // self.hq, s["num_hidden_layers"]
        qkv_rows = (self.hq + 2 * self.hkv) * self.d
        shapes = dict(qkv=(qkv_rows, self.hidden), o=(self.hidden, self.hidden),
                      gate_up=(2 * self.ffn, self.hidden), down=(self.hidden, self.ffn))
        # Two weight sets used by alternate layers, so that no layer finds its weights in L2.
        self.weights = [{n: torch.randn(shape, device=device, dtype=dtype) * 0.02
                         for n, shape in shapes.items()} for _ in range(2)]
        self.batch, self.attention = batch, attention
        slots = SLOTS if attention == "gkv" else LIVE
        self.k = torch.randn(batch, self.hkv, slots, self.d, device=device, dtype=dtype)
        self.v = torch.randn_like(self.k)
        self.pos = torch.arange(slots, device=device, dtype=torch.int32).expand(
            batch, self.hkv, slots).contiguous()
        self.x = torch.randn(batch, self.hidden, device=device, dtype=dtype)
        self.q = torch.randn(batch, self.hq, self.d, device=device, dtype=dtype)

    def attend(self, q, rows):
        """q [b, Hq, d] over the cache rows `rows`."""
        if self.attention == "gkv":
            return ops.decode_attention(q, self.k[rows], self.v[rows], self.pos[rows], LIVE,
                                        self.d ** -0.5)
        return F.scaled_dot_product_attention(q.unsqueeze(2), self.k[rows], self.v[rows],
                                              enable_gqa=True)

    def parts(self, layer, rows):
        """The layer's three phases over the batch rows `rows`: q/k/v GEMM, attention, the rest."""
        w, out = self.weights[layer % 2], {}

        def qkv():
            out["qkv"] = self.x[rows] @ w["qkv"].t()

        def attention():
            out["attn"] = self.attend(out["qkv"][:, :self.hq * self.d].reshape(-1, self.hq, self.d),
                                      rows)

        def rest():
            h = out.get("attn", self.x[rows]).reshape(-1, self.hidden) @ w["o"].t()
            out["y"] = (h @ w["gate_up"].t())[:, :self.ffn] @ w["down"].t()
        return qkv, attention, rest

    def sequential(self, with_attention=True):
        for layer in range(self.layers):
            qkv, attention, rest = self.parts(layer, slice(0, self.batch))
            qkv()
            if with_attention:
                attention()
            rest()

    def ping_pong(self, side):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        streams, attended = [main, side], [None, None]
        halves = [slice(0, self.batch // 2), slice(self.batch // 2, self.batch)]
        for layer in range(self.layers):
            for i in (0, 1):
                with torch.cuda.stream(streams[i]):
                    qkv, attention, rest = self.parts(layer, halves[i])
                    qkv()
                    if attended[1 - i] is not None:  # the attentions take turns
                        streams[i].wait_event(attended[1 - i])
                    attention()
                    attended[i] = torch.cuda.Event()
                    attended[i].record(streams[i])
                    rest()
        main.wait_stream(side)

    def partitioned(self, gemm_stream, attention_stream):
        """Half i's attention of layer l waits for its q/k/v GEMM; its o / gate-up / down GEMMs
        wait for that attention. The GEMM stream takes the halves in turn, so it runs one half's
        GEMMs while the attention stream runs the other half's attention."""
        main = torch.cuda.current_stream()
        gemm_stream.wait_stream(main)
        attention_stream.wait_stream(main)
        halves = [slice(0, self.batch // 2), slice(self.batch // 2, self.batch)]
        pending = [None, None]  # per half: (rest of the previous layer, its attention's event)

        def finish(i):
            rest, attended = pending[i]
            gemm_stream.wait_event(attended)
            rest()

        for layer in range(self.layers):
            for i in (0, 1):
                qkv, attention, rest = self.parts(layer, halves[i])
                with torch.cuda.stream(gemm_stream):
                    if pending[i] is not None:
                        finish(i)
                    qkv()
                    projected = torch.cuda.Event()
                    projected.record(gemm_stream)
                with torch.cuda.stream(attention_stream):
                    attention_stream.wait_event(projected)
                    attention()
                    attended = torch.cuda.Event()
                    attended.record(attention_stream)
                pending[i] = (rest, attended)
        with torch.cuda.stream(gemm_stream):
            for i in (0, 1):
                finish(i)
        main.wait_stream(gemm_stream)

    def attention_only(self):
        for _ in range(self.layers):
            self.attend(self.q, slice(0, self.batch))


def on_stream(stream, fn):
    """fn run on `stream`, ordered after (and before) the current stream's work."""
    def run():
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            fn()
        main.wait_stream(stream)
    return run


def partition_rows(layers, attention, sms_list, use_carveout):
    """Rows of the partitioned schedule, one per attention SM count."""
    rows = []
    for sms in sms_list:
        part = _C.SmPartition(torch.cuda.current_device(), sms)
        attention_stream = torch.cuda.ExternalStream(part.stream(0))
        gemm_stream = torch.cuda.ExternalStream(part.stream(1))
        # cuBLASLt sizes its grids for the SMs it is told are free.
        torch._C._set_sm_carveout_experimental(part.sms(0) if use_carveout else None)
        row = dict(batch=layers.batch, attention=attention, attention_sms=part.sms(0),
                   gemm_sms=part.sms(1), carveout=part.sms(0) if use_carveout else 0)
        runs = dict(gemms=on_stream(gemm_stream, lambda: layers.sequential(with_attention=False)),
                    attention=on_stream(attention_stream, layers.attention_only),
                    partitioned=lambda: layers.partitioned(gemm_stream, attention_stream))
        for name, fn in runs.items():
            row[name + "_ms"] = graph_ms(fn)
        torch._C._set_sm_carveout_experimental(None)
        rows.append(row)
        print(f"B={layers.batch} {attention} attention on {row['attention_sms']} SMs "
              f"{row['attention_ms']:.2f} ms, GEMMs on {row['gemm_sms']} SMs (carveout "
              f"{row['carveout']}) {row['gemms_ms']:.2f} ms; partitioned "
              f"{row['partitioned_ms']:.2f} ms", flush=True)
        del part
    return rows


def plot(rows, partition, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12 if partition else 7, 4))
    labels = [f"{r['attention']}\ncarveout {r['carveout']}" for r in rows]
    at = range(len(rows))
    width = 0.2
    for j, key in enumerate(["sequential_ms", "ping_pong_ms", "gemms_ms", "attention_ms"]):
        ax.bar([i + (j - 1.5) * width for i in at], [r[key] for r in rows], width,
               label=key.replace("_ms", "").replace("_", "-"))
    ax.set_xticks(list(at), labels, fontsize=7)
    ax.set_ylabel("ms for 28 layers")
    ax.set_title(f"GEMMs and decode attention, B={rows[0]['batch']}: overlap?")
    ax.legend(fontsize=7)
    if partition:
        ax2 = fig.add_subplot(1, 2, 2)
        ax.set_position([0.08, 0.2, 0.4, 0.7])
        for attention in sorted({r["attention"] for r in partition}):
            mine = [r for r in partition if r["attention"] == attention]
            for key, style in (("partitioned_ms", "o-"), ("attention_ms", "s--"),
                               ("gemms_ms", "^:")):
                ax2.plot([r["attention_sms"] for r in mine], [r[key] for r in mine], style,
                         label=f"{attention} {key.replace('_ms', '')}")
        ax2.set_xlabel("SMs given to the attention")
        ax2.set_ylabel("ms for 28 layers")
        ax2.set_title("SMs partitioned (green contexts)", fontsize=9)
        ax2.legend(fontsize=6)
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=928)
    ap.add_argument("--attention", default="gkv,sdpa", help="gkv, sdpa or both")
    ap.add_argument("--carveouts", default="", help="SM counts cuBLASLt leaves free, e.g. 24,40")
    ap.add_argument("--attention-sms", default="",
                    help="SM counts given to the attention in the partitioned schedule, e.g. 32,40")
    ap.add_argument("--no-partition-carveout", action="store_true",
                    help="partitioned: do not tell cuBLASLt about the attention's SMs")
    ap.add_argument("--out", default=None, help="writes OUT.json and OUT.png")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (streams and CUDA graphs)")
    torch.backends.cuda.preferred_blas_library("cublaslt")
    carveouts = [0] + [int(c) for c in args.carveouts.split(",") if c]
    attention_sms = [int(c) for c in args.attention_sms.split(",") if c]
    side = torch.cuda.Stream()
    rows, partition = [], []
    for attention in args.attention.split(","):
        layers = Layers(args.batch, attention)
        torch._C._set_sm_carveout_experimental(None)
        attention_ms = graph_ms(layers.attention_only)
        for carveout in carveouts:
            torch._C._set_sm_carveout_experimental(carveout or None)
            row = dict(batch=args.batch, attention=attention, carveout=carveout,
                       sequential_ms=graph_ms(layers.sequential),
                       gemms_ms=graph_ms(lambda: layers.sequential(with_attention=False)),
                       ping_pong_ms=graph_ms(lambda: layers.ping_pong(side)),
                       attention_ms=attention_ms)
            rows.append(row)
            print(f"B={args.batch} {attention} attention, carveout {carveout}: sequential "
                  f"{row['sequential_ms']:.2f} ms = GEMMs {row['gemms_ms']:.2f} + attention "
                  f"{attention_ms:.2f}; ping-pong {row['ping_pong_ms']:.2f}", flush=True)
        torch._C._set_sm_carveout_experimental(None)
        partition += partition_rows(layers, attention, attention_sms,
                                    not args.no_partition_carveout)
        del layers
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                 partition=partition), indent=1))
        plot(rows, partition, args.out + ".png")


if __name__ == "__main__":
    main()
