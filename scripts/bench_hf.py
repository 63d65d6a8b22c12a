"""Benchmark of gkv_ext.hf.generate (G-KV cache) against plain transformers generate, same run.

  python scripts/bench_hf.py                  # GPU: Qwen2.5-1.5B shape, bf16, 8K and 16K new
                                              # tokens, batch 1 and 16 -> docs/benchmarks_hf.*
  python scripts/bench_hf.py --batches 16 --out /tmp/b16   # one batch size
  python scripts/bench_hf.py --quick          # tiny config, any device (CPU included)
  python scripts/bench_hf.py --merge /tmp/a.json /tmp/b.json   # one table/plot from several runs
  python scripts/bench_hf.py --batches 16 --plain integrate      # plain's side from step times

Each side generates once per batch size, up to the longest --new-tokens; a streamer reads the
time and peak memory when each shorter length's last token is out (so the 8K row of a 16K run is
that run's first 8K tokens). A 16K run takes minutes per side on one GPU (transformers' decode
step is 20-90 ms on an H200, bound by its host code), so the grid may be run one batch size per
command and merged; both sides always run in the same process, one after the other.
``--context 8192,16384`` is the quick form of the same question: the context is reached by a
prompt of that length, then --new-tokens decode steps are timed (tokens/s of the decode alone:
from the first new token to the last), so the rate at 16K of context costs seconds, not minutes.

``--plain integrate`` keeps gkv's side a real generation but derives plain's tokens/s for it
from plain's decode step time measured at --samples cache lengths spread over the generation
(the context form at each), integrated over the generated length, plus its measured prefill: a
plain decode step costs what its cache length and batch make it cost, however the cache was
filled. A 16K-token plain generation takes longer than one call of the GPU machine allows;
this takes seconds. Its plain peak memory is then not measured (NaN).

Both sides run the same transformers model with random weights (the timing and memory do not
depend on the weights; the table says so): plain is ``model.generate`` with its default
DynamicCache and the sdpa attention, greedy, every row forced to max_new_tokens; gkv is
``gkv_ext.hf.generate`` with ``GKV(budget)``, greedy, no EOS. Reported per point: tokens/s
(batch x new tokens / wall time, prefill included), peak memory allocated above the weights, and
the KV bytes each cache holds at the end (plain: every token; gkv: the budget + D slots it
preallocated).
"""
import argparse
import json
import statistics
import textwrap
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import gkv_ext
import gkv_ext.hf
from gkv_ext.policies import GKV

# Qwen2.5-1.5B(-Instruct) / DeepSeek-R1-Distill-Qwen-1.5B shape.
QWEN25_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=1024)


def build_model(shape, dtype, device):
    config = transformers.Qwen2Config(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def kv_bytes(model, batch, slots):
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * slots * head_dim * \
        model.dtype.itemsize


class Stopwatch(transformers.generation.BaseStreamer):
    """Wall seconds and peak memory allocated above the start, read at its creation's end and,
    as a streamer of a generation, once the n-th new token is out for each n in `marks` (so one
    run of max(marks) tokens times every shorter generation too: its first n tokens). With
    every_token, it also keeps the time each new token came out (`ticks`)."""

    def __init__(self, device, marks=(), desc=None, every_token=False):
        self.cuda = device.type == "cuda"
        self.marks, self.at, self.count = set(marks), {}, -1  # the first put is the prompt
        self.ticks = [] if every_token else None
        self.bar = tqdm(total=max(marks), desc=desc, unit="tok", leave=False) if desc else None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.t0 = time.perf_counter()

    def read(self):
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() - self.base if self.cuda else float("nan")
        return seconds, peak

    def put(self, value):
        self.count += 1
        if self.count in self.marks:
            self.at[self.count] = self.read()
        if self.ticks is not None and self.count > 0:
            self.ticks.append(self.read()[0])
        if self.bar is not None and self.count > 0:
            self.bar.update()

    def end(self):
        if self.bar is not None:
            self.bar.close()


def timed_generation(run, marks, device, desc=None):
    """{n: (seconds, peak bytes)} for n in marks, from one run(max(marks), streamer)."""
    clock = Stopwatch(device, marks, desc)
    run(max(marks), clock)
    return clock.at


def random_prompt(model, batch, length, device):
    return torch.randint(0, model.config.vocab_size, (batch, length), device=device,
                         generator=torch.Generator(device).manual_seed(batch))


def plain_generate(model, ids, n, streamer=None):
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                       streamer=streamer)


def plain_step_seconds(model, batch, context, steps, device):
    """(seconds, device allocations) of plain generate's decode step with `context` tokens
    cached: the median time between its new tokens over steps + 1 of them (robust to the odd
    slow step: an allocator growth, a garbage collection), and the cudaMalloc calls the caching
    allocator made over them (its DynamicCache grows by torch.cat every step)."""
    ids = random_prompt(model, batch, context, device)
    allocs = device_allocations(device)
    clock = Stopwatch(device, every_token=True)
    plain_generate(model, ids, steps + 1, clock)
    return (statistics.median(b - a for a, b in zip(clock.ticks, clock.ticks[1:])),
            device_allocations(device) - allocs)


def device_allocations(device):
    return torch.cuda.memory_stats().get("num_device_alloc", 0) if device.type == "cuda" else 0


def plain_integrated(model, batch, prompt_len, new_tokens, device, samples, steps):
    """(tokens/s, {cache length: step ms}, {cache length: device allocations of its steps}) of
    plain over a generation of new_tokens after prompt_len tokens, from its step time at
    `samples` cache lengths (the last one the end of the generation), linear in between and flat
    before the first, plus the measured prefill (see the module docstring). A first step
    measurement at the longest length, discarded, sizes the caching allocator for all of them."""
    ids = random_prompt(model, batch, prompt_len, device)
    prefill = timed_generation(lambda n, s: plain_generate(model, ids, n, s), [1], device)[1][0]
    xs = [prompt_len + new_tokens * (i + 1) // samples for i in range(samples)]
    plain_step_seconds(model, batch, xs[-1], 2, device)
    ys, allocs = zip(*(plain_step_seconds(model, batch, x, steps, device) for x in xs))
    step_ms = {x: 1e3 * y for x, y in zip(xs, ys)}
    xs, ys = [prompt_len] + xs, ys[:1] + ys
    decode = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return (batch * new_tokens / (prefill + decode * (new_tokens - 1) / new_tokens), step_ms,
            dict(zip(step_ms, allocs)))


def bench_batch(model, batch, prompt_len, lengths, budget, divide_length, device,
                decode_only=False, plain_samples=None, plain_steps=32, progress=False,
                cuda_graph=True):
    """One row per generated length in `lengths`, each side timed by one generation of the
    longest. decode_only: tokens/s of the decode alone (from the first new token on).
    plain_samples: plain's tokens/s from plain_integrated instead of a run. cuda_graph: gkv's
    decode forward replayed from a CUDA graph (gkv_ext.hf.generate's default) or eager."""
    ids = random_prompt(model, batch, prompt_len, device)
    mask = torch.ones_like(ids)

    def plain(n, streamer):
        plain_generate(model, ids, n, streamer)

    def gkv(n, streamer):
        gkv_ext.hf.generate(model, ids, mask, policy=GKV(budget, divide_length=divide_length),
                            max_new_tokens=n, eos_token_id=[], streamer=streamer,
                            cuda_graph=cuda_graph)

    rows = [{"B": batch, "prompt": prompt_len, "new_tokens": n, "budget": budget}
            for n in lengths]
    for name, run in (("plain", plain), ("gkv", gkv)):
        if name == "plain" and plain_samples:
            for row in rows:
                (row["plain_tok_s"], row["plain_step_ms"],
                 row["plain_step_allocs"]) = plain_integrated(
                    model, batch, prompt_len, row["new_tokens"], device, plain_samples,
                    plain_steps)
                row["plain_peak_MB"] = float("nan")
            continue
        at = timed_generation(run, set(lengths) | ({1} if decode_only else set()), device,
                              desc=f"{name} B={batch}" if progress else None)
        for row in rows:
            n = row["new_tokens"]
            seconds, peak = at[n]
            if decode_only:
                row[f"{name}_tok_s"] = batch * (n - 1) / (seconds - at[1][0])
            else:
                row[f"{name}_tok_s"] = batch * n / seconds
            row[f"{name}_peak_MB"] = peak / 2**20
    for row in rows:
        n = row["new_tokens"]
        row["plain_kv_MB"] = kv_bytes(model, batch, prompt_len + n) / 2**20
        row["gkv_kv_MB"] = kv_bytes(model, batch, min(prompt_len + n,
                                                      budget + divide_length)) / 2**20
        row["speedup"] = row["gkv_tok_s"] / row["plain_tok_s"]
    return rows


def table(rows, title):
    """The rows' numbers as a markdown table (per-length details, such as plain_step_ms, stay
    in the JSON)."""
    cols = [c for c, v in rows[0].items() if not isinstance(v, dict)]
    fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"\n### {title}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"B={r['B']}\n{r['prompt']}+{r['new_tokens']} tok" for r in rows]
    x = range(len(rows))
    panels = (("tok_s", "tokens/s"), ("kv_MB", "KV cache MB at the end"),
              ("peak_MB", "peak MB above the weights\n(none: not measured)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (key, ylabel) in zip(axes, panels):
        for offset, name in ((-0.2, "plain"), (0.2, "gkv")):
            ax.bar([i + offset for i in x], [r[f"{name}_{key}"] for r in rows], 0.4, label=name)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, CPU-friendly sizes")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", default=None, help="comma-separated generated lengths")
    parser.add_argument("--budget", type=int, default=None, help="G-KV budget (default 2048)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt length (default 128)")
    parser.add_argument("--context", default=None,
                        help="comma-separated prompt lengths: time --new-tokens decode steps "
                             "after each (decode tokens/s only)")
    parser.add_argument("--plain", choices=["generate", "integrate"], default="generate",
                        help="plain's side: a real generation, or integrated from its step time "
                             "at --samples cache lengths (see above)")
    parser.add_argument("--samples", type=int, default=4, help="cache lengths of --plain integrate")
    parser.add_argument("--gkv-eager", action="store_true",
                        help="gkv's decode forward eager, not replayed from a CUDA graph")
    parser.add_argument("--out", default="docs/benchmarks_hf", help="JSON/PNG path prefix")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no run: merge the rows of earlier runs' JSON files")
    args = parser.parse_args()
    if args.merge:
        try:
            runs = [json.loads(Path(p).read_text()) for p in args.merge]
            keys = {(r["device"], r["torch"], r["transformers"]) for r in runs}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"bench_hf --merge: not a bench_hf JSON file: {e!r}")
        if len(keys) != 1:
            raise SystemExit("bench_hf --merge: the runs differ in device, torch or transformers")
        report(runs[0], [row for r in runs for row in r["rows"]], Path(args.out))
        return

    device = torch.device("cuda" if torch.cuda.is_available() and gkv_ext.built_with_cuda
                          else "cpu")
    if args.quick:
        shape, dtype, batches, lengths, budget, prompt, D = TINY, torch.float32, [1, 2], \
            [48, 96], 24, 16, 8
    else:
        shape, dtype, batches, lengths, budget, prompt, D = QWEN25_1_5B, torch.bfloat16, \
            [1, 16], [8192, 16384], 2048, 128, 128
    parse = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    batches = parse(args.batches) if args.batches else batches
    lengths = parse(args.new_tokens) if args.new_tokens else lengths
    budget = args.budget or budget
    prompt = args.prompt or prompt
    if min(batches + lengths) < 1 or budget < 1 or prompt < 1 or args.samples < 1:
        raise SystemExit("bench_hf: batches, new tokens, budget, prompt and samples must be >= 1")
    if args.context and args.plain == "integrate":
        raise SystemExit("bench_hf: --plain integrate is for generated lengths, not --context")
    plain_samples = args.samples if args.plain == "integrate" else None

    model = build_model(shape, dtype, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    cuda_graph = device.type == "cuda" and not args.gkv_eager
    gkv_mode = "replayed from a CUDA graph" if cuda_graph else "eager"
    title = (f"{'tiny Qwen2' if args.quick else 'Qwen2.5-1.5B-shaped'} model, RANDOM weights, "
             f"{str(dtype).removeprefix('torch.')}, {name}; plain = transformers "
             f"{transformers.__version__} generate (DynamicCache, sdpa), gkv = gkv_ext.hf "
             f"GKV(budget={budget}, D={D}), decode {gkv_mode}")
    if args.context:  # one row per (batch, prompt length), decode rate only
        runs = [(b, c, lengths[:1]) for c in parse(args.context) for b in batches]
        title += f"; context from the prompt, decode tokens/s over {lengths[0]} new tokens"
    else:  # one run per batch; its shorter lengths are read at the way through
        runs = [(b, prompt, lengths) for b in batches]
        if plain_samples:
            title += (f"; plain tokens/s integrated from its step time at {plain_samples} cache "
                      "lengths, not a run")
    for b in batches:  # warm-up: kernels loaded, allocator primed, for every batch size
        bench_batch(model, b, prompt, [2 * D], budget, D, device)
    rows = [row for b, p, ns in tqdm(runs, desc="bench_hf", unit="run")
            for row in bench_batch(model, b, p, ns, budget, D, device,
                                   decode_only=bool(args.context), plain_samples=plain_samples,
                                   plain_steps=8 if args.quick else 32, progress=True,
                                   cuda_graph=cuda_graph)]
    report({"title": title, "device": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "random_weights": True}, rows,
           Path(args.out))


def report(meta, rows, out):
    """Prints the table, writes out.json (meta + rows) and out.png."""
    print(meta["title"])
    print(table(rows, "gkv_ext.hf.generate vs transformers generate"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, meta["title"], out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
