"""Benchmark of batched generation: our engine under FullKV and G-KV against transformers' generate.

  python scripts/bench_generate.py            # GPU: Qwen2.5-7B-shaped model, random bf16 weights
  python scripts/bench_generate.py --quick    # a tiny model on any device (CPU included)

Measured in one run, on one set of random weights (the model's shape is what matters for speed;
the weights are random and the text is meaningless):
  1. Decode step time of our engine at B in --batches, for FullKV and G-KV at --budgets, after
     --prompt prompt tokens and g generated tokens for g in --points. The cache is brought to each
     point by chunked forwards (teacher forcing in chunks that end at the compression steps, the
     schedule of generation), then, for each of --modes (graph: the decode step replayed from a
     CUDA graph, as generate does; eager: launched op by op), two untimed steps and --steps decode
     steps timed one by one with device events:
     the mean step time, the share of it spent in the steps that compress (score + select +
     compact: their excess over the median step), the KV memory and the bandwidth floor
     (weight bytes one step reads + live KV) / the measured copy bandwidth. A step reads every
     weight except an untied embedding table, of which it reads only the batch's rows.
  2. transformers' own generate (full cache, sdpa) on the same weights at the same batch sizes,
     timed over its first --hf-steps generated tokens: its cheapest steps (its cache is smallest
     there and grows by torch.cat), so the ratio against it is conservative.
  3. Equal GPU memory: the largest batch that FullKV and G-KV at the largest budget each fit for
     --max-new generated tokens, and the tokens/s each sustains over that whole generation: the
     step time integrated over generated lengths 0..--max-new, linear between measured points,
     each placed at the middle of the steps it times.
     FullKV is measured at 0 and at --points. G-KV's cache grows as FullKV's until its first
     compression, so it is measured at 0 and over the last steps before that compression; from
     the compression on its step is flat, measured once, at the second point, after several
     compressions, over at least divide_length steps so that its compression step is counted.
     Both prefill and fill their caches in forwards of divide_length / 16 tokens, so that the
     batch is bounded by the cache and the decode step, not by the scratch of the fill (a
     T-token forward over N cached slots masks [B,Hq,T,N]: 2 GB at B=128, T=32, N=16.9K, which
     made FullKV's probed batch fail late in its fill).
     --memory-batches FULLKV,GKV skips the search (it also lets the section run on a CPU);
     --memory-policies fullkv or gkv measures one row alone; --only search runs the search alone.
     The search is exact: FullKV's tokens/s grows almost in proportion to its batch.
In the engine section, G-KV's rows are measured at the first two points only: its cache is
allocated once and holds at most budget + divide_length slots from then on, so later points cost
the same (the flat KV column shows it) while bringing a large batch there by teacher forcing
would dominate the run time.
--ab SWITCH compares two implementations of the same step (gkv_ext.switches: decode_linear,
chained_launch, tuned_linear) in one process: the engine and equal-memory sections time each
point with the switch off and on in turn (--ab-rounds times, one cache stepped through a graph
captured under each setting), so that machine state that drifts during a session (clocks, L2,
other tenants) weighs on both alike; they print the median step of each (and the engine section
their ratio).
Tables go to stdout; --out PREFIX writes PREFIX.json and PREFIX.png (step time vs generated
length per batch size and policy, and the equal-memory rows' tokens/s).
"""
import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import gkv_ext
from bench_ops import copy_bandwidth  # scripts/ is on the path when a script runs
from gkv_ext import policies

transformers = None  # imported in main(): only this script needs it

SHAPES = {
    # Qwen2.5-7B-Instruct's config.json (the sizes only).
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, max_position_embeddings=8192),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Per-step elapsed milliseconds: device events on CUDA, the wall clock elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self):
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def build_models(shape, device, dtype):
    """(transformers model, our model) over the same weight tensors."""
    config = transformers.Qwen2Config(**SHAPES[shape])
    config.dtype = dtype
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                           attn_implementation="sdpa").eval()
    ours = gkv_ext.Model.from_tensors(gkv_ext.ModelConfig.from_json(config.to_json_string()),
                                      dict(hf.state_dict()))
    # Ours copied q/k/v and gate/up into joint tensors: transformers reads those too, so that
    # the weights are on the device once.
    for name, tensor in ours.state_dict().items():
        hf.get_parameter(name).data = tensor
    return hf, ours


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def step_weight_bytes(model, batch):
    """Weight bytes one decode step of `batch` rows reads: every weight, except that an untied
    embedding table gives only the rows of the batch's tokens (a tied one is read whole by the
    lm_head)."""
    weights = model.state_dict()
    embed = weights["model.embed_tokens.weight"]
    head = weights.get("lm_head.weight")
    if head is None or head.data_ptr() == embed.data_ptr():
        return weight_bytes(model)
    row_bytes = embed.shape[1] * embed.element_size()
    return weight_bytes(model) - embed.shape[0] * row_bytes + batch * row_bytes


def kv_bytes_per_slot(config, dtype):
    """K and V bytes of one token in every layer and KV head."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


class Run:
    """One batch of random prompts stepped through our model and a CompressedKVCache."""

    def __init__(self, model, policy, batch, prompt, max_new, device, seed=0, chunk=None):
        """chunk: prefill the prompt in forwards of at most this many tokens (the first one a
        prefill, the rest teacher-forced like fill_to's), so that a large batch needs scratch
        memory for `chunk` tokens, not the whole prompt. The compression schedule then counts
        the later chunks as decode steps: its phase shifts, its period (and the timing) not."""
        c = model.config
        self.model, self.policy, self.device = model, policy, device
        self.D = policy.divide_length
        g = torch.Generator().manual_seed(seed)
        self.vocab = c.vocab_size
        first = min(prompt, chunk or prompt)
        tokens = torch.randint(0, self.vocab, (batch, prompt), generator=g).to(device)
        # No eviction log: serving does not keep one, and under a budget it is the one
        # allocation that grows with max_new (7.6 MB a row at 16K tokens, 6% of G-KV@2048's KV).
        self.cache = gkv_ext.CompressedKVCache(policy, c.num_layers, batch, c.num_heads,
                                               c.num_kv_heads, c.head_dim,
                                               max_tokens=prompt + max_new + 1,
                                               dtype=c.dtype, device=str(device),
                                               eviction_log=False)
        positions = self.cache.begin_prefill(torch.ones_like(tokens[:, :first]))
        self.logits = self.model(tokens[:, :first], positions, cache=self.cache,
                                 last_only=True)[:, -1]
        self.generated = first - prompt  # the rest of the prompt, then generated tokens
        self.fill_to(0, chunk, source=tokens[:, first:])
        self.steppers = {}
        self.warm_compression = {}  # per stepper: its first (eager) compression is behind it

    def fill_to(self, generated, chunk=None, source=None):
        """Teacher-forces tokens up to `generated` tokens (those of `source` [B, n] in order, else
        random ones), in chunks of at most `chunk` (default D) ending at the compression steps
        (the cache's decisions are those of decoding them one by one). Smaller chunks need less
        scratch memory for their attention."""
        while self.generated < generated:
            f = self.cache.forwards
            n = min(((f - 1) // self.D + 1) * self.D - f + 1, generated - self.generated,
                    chunk or self.D)
            if source is None:
                forced = torch.randint(0, self.vocab, (self.logits.shape[0], n),
                                       device=self.device)
            else:
                forced, source = source[:, :n], source[:, n:]
            self.logits = self.model(forced, self.cache.begin_decode(n), cache=self.cache,
                                     last_only=True)[:, -1]
            self.generated += n

    def decode(self, steps, graph=True, warmup=2, variant=None, steady=True):
        """Times `steps` greedy decode steps after `warmup` untimed ones (a CUDA graph's capture)
        and, under a budget and `steady`, after the stepper's first compression (eager; the later
        ones replay a graph of it), so that the timed steps are the steady state of a long
        generation, at most divide_length steps later; returns their milliseconds and whether
        each one compressed the cache. Each (graph, variant) has its own stepper: an A/B's two
        settings of a switch step the same cache through two graphs, each captured under its
        setting."""
        key = (graph, variant)
        if key not in self.steppers:
            self.steppers[key] = gkv_ext.DecodeStepper(self.model, self.cache, cuda_graph=graph)
            self.warm_compression[key] = self.policy.budget is None
        stepper = self.steppers[key]
        replays, done = stepper.replays, 0

        def step():
            nonlocal done
            compresses = self.cache.decode_compresses(1)
            self.logits = stepper.step(self.logits.argmax(-1))
            done += 1
            return compresses

        for _ in range(warmup):
            self.warm_compression[key] |= step()
        while steady and not self.warm_compression[key]:
            self.warm_compression[key] = step()
        timer = Timer(self.device)
        timer.mark()
        compressed = []
        for _ in range(steps):
            compressed.append(step())
            timer.mark()
        self.generated += done
        self.replayed = (stepper.replays - replays) / done
        return timer.intervals(), compressed


def cache_bytes(cache, layers):
    return sum(t.numel() * t.element_size() for l in range(layers)
               for t in (cache.keys(l), cache.values(l), cache.positions(l), cache.scores(l)))


def measure_point(run, steps, bw, slot_bytes, graph=True, variant=None, steady=True):
    times, compressed = run.decode(steps, graph, variant=variant, steady=steady)
    plain = [t for t, c in zip(times, compressed) if not c]
    median = statistics.median(plain)
    excess = sum(t - median for t, c in zip(times, compressed) if c)
    step = sum(times) / len(times)
    live, batch = run.cache.length, run.logits.shape[0]
    floor = (step_weight_bytes(run.model, batch) + live * batch * slot_bytes) / bw / 1e6
    return dict(step_ms=step, tokens_per_s=run.logits.shape[0] / step * 1e3,
                plain_step_ms=median, compress_share=excess / sum(times), live_slots=live,
                kv_mb=cache_bytes(run.cache, run.model.config.num_layers) / 2**20,
                floor_ms=floor, vs_floor=step / floor, replayed=run.replayed,
                allocated_mb=torch.cuda.memory_allocated() / 2**20 if run.device.type == "cuda" else None)


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def ab_turns(args):
    """The switch settings each measurement is taken under, and how many turns of them."""
    return ([False, True], args.ab_rounds) if args.ab else ([None], 1)


def switched(name, on):
    """The A/B switch `name` set to `on` for a block; nothing when no switch is compared."""
    return gkv_ext.switches(**{name: on}) if name else contextlib.nullcontext()


def timed_turns(run, args, steps, bw, slot_bytes, graph=True, steady=True):
    """Measures the run's current point --ab-rounds times with the switch off, then on (once,
    with no switch); yields (round, setting, measure_point's row) as each is taken."""
    variants, rounds = ab_turns(args)
    for r in range(rounds):
        for on in variants:
            with switched(args.ab, on):
                yield r, on, measure_point(run, steps, bw, slot_bytes, graph=graph, variant=on,
                                           steady=steady)


def timed_tokens(args, steps):
    """Tokens that timed_turns decodes at one point short of a compression: each turn's steps
    and two untimed ones."""
    variants, rounds = ab_turns(args)
    return len(variants) * rounds * (steps + 2)


def turn_tokens(args, steps):
    """timed_tokens plus a compression's worth of room per setting: what a Run needs beyond the
    points it is filled to."""
    return timed_tokens(args, steps) + len(ab_turns(args)[0]) * args.divide


def bench_engine(model, args, device, bw):
    """One row per (batch, policy, point, mode). With --ab SWITCH, each point is timed with the
    switch off and on in turn, --ab-rounds times, so that both see the same machine state; both
    step the same cache (one fill, half the memory of two runs: an A/B fits at the largest
    batch), each through a stepper captured under its setting."""
    slot_bytes = kv_bytes_per_slot(model.config, model.config.dtype)
    rows = []
    configs = [("FullKV", policies.FullKV())] + [(f"G-KV@{b}", policies.GKV(b)) for b in args.budgets]
    jobs = [(B, name, policy) for B in args.batches for name, policy in configs]
    for B, name, policy in tqdm(jobs, desc="engine", unit="run"):
        # G-KV's cache is flat once it holds the budget: the first two points show it.
        points = args.points if policy.budget is None else args.points[:2]
        run = None
        try:
            run = Run(model, policy, B, args.prompt,
                      max(points) + len(args.modes) * turn_tokens(args, args.steps), device)
            for g in points:
                run.fill_to(g)
                for mode in args.modes:
                    for r, on, timed in timed_turns(run, args, args.steps, bw, slot_bytes,
                                                    graph=mode == "graph"):
                        ab = dict(switch_on=on, round=r) if args.ab else {}
                        rows.append(dict(batch=B, policy=name, mode=mode, generated=g, **ab,
                                         **timed))
        except RuntimeError as e:
            if not is_oom(e):
                raise
            rows.append(dict(batch=B, policy=name, mode=None, generated=None, oom=True))
        run = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ab_summary(engine_rows):
    """Per (batch, policy, mode, point) of an --ab run: the median over the rounds of the step
    time and its multiple of the floor, with the switch off and on, and on / off."""
    groups = {}
    for r in engine_rows:
        if not r.get("oom"):
            key = (r["batch"], r["policy"], r["mode"], r["generated"])
            groups.setdefault(key, {}).setdefault(r["switch_on"], []).append(r)
    out = []
    for (batch, policy, mode, generated), by_switch in groups.items():
        med = {on: {k: statistics.median(r[k] for r in rs) for k in ("step_ms", "vs_floor")}
               for on, rs in by_switch.items()}
        out.append(dict(batch=batch, policy=policy, mode=mode, generated=generated,
                        off_ms=med[False]["step_ms"], on_ms=med[True]["step_ms"],
                        off_vs_floor=med[False]["vs_floor"], on_vs_floor=med[True]["vs_floor"],
                        on_over_off=med[True]["step_ms"] / med[False]["step_ms"]))
    return out


def bench_transformers(hf, args, device):
    rows = []
    for B in tqdm(args.batches, desc="transformers", unit="batch"):
        ids = torch.randint(0, hf.config.vocab_size, (B, args.prompt),
                            generator=torch.Generator().manual_seed(1)).to(device)

        def gen(n):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync(device)
            return (time.perf_counter() - t0) * 1e3

        gen(2)  # warm-up
        # The first token comes from the prefill: the difference leaves the decode steps only.
        step = (gen(args.hf_steps + 1) - gen(1)) / args.hf_steps
        rows.append(dict(batch=B, step_ms=step, tokens_per_s=B / step * 1e3))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fill_chunk(args):
    """Tokens per forward when the equal-memory runs prefill and fill a large batch's cache."""
    return max(1, args.divide // 16)


def largest_fitting(fits, upper):
    """The largest batch below `upper` (a batch known not to fit) for which fits(B) holds, with
    fits true up to some batch and false above it: steps down by 1/8 until a batch fits, then
    bisects to the exact batch (FullKV's tokens/s grows almost in proportion to its batch, so a
    batch found short of the largest would flatter G-KV's ratio). 0 when not even B=1 fits."""
    hi, lo = upper, upper * 7 // 8
    while lo >= 1 and not fits(lo):
        hi, lo = lo, lo * 7 // 8
    if lo < 1:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batch(model, name, policy, args, device):
    """The largest batch whose cache, fill and decode step fit for --max-new generated tokens (the
    allocations are real). A batch whose K and V alone exceed the free memory cannot fit, which
    bounds the search: a few probes, not a doubling from B=1."""
    slots = (args.prompt + args.max_new + 1 if policy.budget is None
             else policy.budget + policy.divide_length)
    free = torch.cuda.mem_get_info(device)[0]
    # Under a budget the probe fills past the first compression (teacher-forced chunks, far
    # cheaper than decoding there one step at a time), so that its scratch is probed too.
    fill = (args.divide if policy.budget is None
            else max(args.divide, policy.budget + policy.divide_length - args.prompt))

    def fits(B):
        started, ok = time.perf_counter(), False
        try:
            run = Run(model, policy, B, args.prompt, args.max_new, device, chunk=fill_chunk(args))
            run.fill_to(fill, fill_chunk(args))
            run.decode(2)
            ok = True
        except RuntimeError as e:
            if not is_oom(e):
                raise
        finally:
            run = None
            torch.cuda.empty_cache()
        # A probe of a large batch takes tens of seconds: each one is a progress line.
        print(f"  probe: {name} at B={B}: {'fits' if ok else 'out of memory'} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return ok

    kv_only = slots * kv_bytes_per_slot(model.config, model.config.dtype)
    return largest_fitting(fits, free // kv_only + 1)


def steps_to_first_compression(cache):
    """Decode steps from the cache's state up to and including its first compressing one."""
    k = 1
    while not cache.decode_compresses(k):
        k += 1
    return k


def equal_memory_points(run, args):
    """(generated lengths to time, whether each is timed in the steady state, the generated length
    of the first compression or None). FullKV: 0 and --points. Under a budget: 0 and the last
    point whose --steps timed steps end before the first compression, where the step grows with
    the cache as FullKV's does, then one steady point, timed over at least divide_length steps
    so that its compression is counted (see bench_equal_memory)."""
    if run.policy.budget is None:
        points = sorted({0, *args.points})
        return points, [True] * len(points), None
    first = run.generated + steps_to_first_compression(run.cache) - 1
    if first >= args.max_new:
        raise ValueError(f"--max-new {args.max_new}: budget {run.policy.budget} first compresses "
                         f"at {first} generated tokens, past the generation the rows compare")
    last_before = first - timed_tokens(args, args.steps)
    growing = [0, last_before] if last_before > 0 else [0] if last_before == 0 else []
    return growing + [args.points[min(1, len(args.points) - 1)]], \
        [False] * len(growing) + [True], first


def equal_memory_curve(timed_at, steps_ms, first, total):
    """The step time over generated lengths 0..total that an equal-memory row is rated by, as
    (lengths, step ms), linear in between. `timed_at` are the middles of the points' timed
    steps; the curve is flat before the first. Without a budget the last segment is interpolated
    to `total` (the last point's steps run past it). Under a budget (`first` given) the last
    point is the steady one: its step holds from the first compression on, as the cache's live
    length cycles between budget and budget + divide_length."""
    xs, ys = list(timed_at), list(steps_ms)
    if first is not None:
        *ys, steady = ys
        xs, ys = xs[:-1] + [first, total], ys + [steady, steady]
    elif xs[-1] != total:
        (x0, y0), (x1, y1) = (xs[-2], ys[-2]), (xs[-1], ys[-1])
        xs[-1], ys[-1] = total, y0 + (y1 - y0) * (total - x0) / (x1 - x0)
    return [0] + xs, ys[:1] + ys


def equal_memory_mean_step(timed_at, steps_ms, first, total):
    """Mean step over generated lengths 0..total of equal_memory_curve (trapezoids)."""
    xs, ys = equal_memory_curve(timed_at, steps_ms, first, total)
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1)) / total


def equal_memory_configs(args):
    """(index in --memory-batches, name, policy) of each policy in --memory-policies."""
    budget = max(args.budgets)
    configs = [("fullkv", "FullKV", policies.FullKV()),
               ("gkv", f"G-KV@{budget}", policies.GKV(budget))]
    return [(i, name, policy) for i, (key, name, policy) in enumerate(configs)
            if key in args.memory_policies]


def search_equal_memory(model, args, device):
    """The equal-memory batch search alone (--only search): each policy's largest batch, without
    the fill and the timed steps (FullKV's fill to 16K tokens takes minutes)."""
    out = []
    for _, name, policy in equal_memory_configs(args):
        started = time.perf_counter()
        out.append(dict(policy=name, batch=largest_batch(model, name, policy, args, device),
                        search_s=time.perf_counter() - started))
        print(f"largest batch for {args.max_new} generated tokens: {name} at B={out[-1]['batch']} "
              f"(search took {out[-1]['search_s']:.0f} s)", flush=True)
    return out


def bench_equal_memory(model, args, device, bw, out):
    """Appends each policy's row to `out` as soon as it is measured (and prints it): a run cut
    short keeps FullKV's row, whose teacher-forced fill to 16K tokens takes minutes. With --ab
    SWITCH each point is timed with the switch off and on in turn (one cache, --ab-rounds turns),
    and each policy has a row per setting, of its medians over the rounds."""
    slot_bytes = kv_bytes_per_slot(model.config, model.config.dtype)
    for i, name, policy in equal_memory_configs(args):
        started = time.perf_counter()
        B = (args.memory_batches[i] if args.memory_batches
             else largest_batch(model, name, policy, args, device))
        steady_steps = args.steps if policy.budget is None else max(args.steps, args.divide)
        variants, _ = ab_turns(args)
        while True:  # the probe fills one chunk; the long fill may still need a smaller batch
            try:
                run = Run(model, policy, B, args.prompt,
                          args.max_new + turn_tokens(args, steady_steps), device,
                          chunk=fill_chunk(args))
                points, steady, first = equal_memory_points(run, args)
                steps_at = [steady_steps if at else args.steps for at in steady]
                # Each point stands for the middle of the steps it times.
                timed_at = [g + timed_tokens(args, n) / 2 for g, n in zip(points, steps_at)]
                measured = {on: [] for on in variants}  # per setting, per point, per round
                for g, at_steady, n in tqdm(list(zip(points, steady, steps_at)),
                                            desc=f"{name} at B={B}", unit="point"):
                    run.fill_to(g, chunk=fill_chunk(args))
                    for on in variants:
                        measured[on].append([])
                    for _, on, timed in timed_turns(run, args, n, bw, slot_bytes,
                                                    steady=at_steady):
                        measured[on][-1].append(timed)
                break
            except RuntimeError as e:
                if not is_oom(e) or B <= 1:
                    raise
                B = B * 7 // 8
            finally:
                run = None
                torch.cuda.empty_cache()
        for on, per_point in measured.items():
            def median(key):
                return [statistics.median(m[key] for m in turns) for turns in per_point]
            steps = median("step_ms")
            mean = equal_memory_mean_step(timed_at, steps, first, args.max_new)
            # Under a budget the steady point's plain steps and compression share tell where the
            # mean goes.
            parts = ({} if policy.budget is None else
                     dict(steady_step_ms=steps[-1], plain_step_ms=median("plain_step_ms")[-1],
                          compress_share=median("compress_share")[-1],
                          first_compression=first))
            setting = {} if on is None else dict(switch_on=on)
            out.append(dict(policy=name, batch=B, mean_step_ms=mean, tokens_per_s=B / mean * 1e3,
                            points=points, timed_at=timed_at, step_ms=steps, **setting,
                            **parts))
            detail = (f" (steady {steps[-1]:.2f} ms: plain steps {parts['plain_step_ms']:.2f} ms, "
                      f"compression {100 * parts['compress_share']:.1f}%; first compression at "
                      f"{first} generated)" if parts else "")
            label = "" if on is None else f", {args.ab} {'on' if on else 'off'}"
            print(f"equal memory: {name} at B={B}{label}: {mean:.2f} ms per step over the "
                  f"generation{detail}, {out[-1]['tokens_per_s']:.0f} tokens/s (search and fill "
                  f"included, this row took {time.perf_counter() - started:.0f} s)", flush=True)
    return out


def print_tables(result):
    print(f"\n{result['device']}, copy bandwidth {result['copy_gbps']:.0f} GB/s; model "
          f"{result['shape']} with random {result['dtype']} weights ({result['weight_gb']:.2f} GB); "
          f"prompt {result['prompt']}")
    print("\nDecode step of our engine (mean over the timed steps; floor = (weights read + live KV) / copy bandwidth)")
    ab = result.get("ab_switch")
    print(f"{'B':>4} {'policy':>11} {'mode':>6} {'generated':>9} {'live':>6} {'step ms':>8} "
          f"{'floor ms':>8} {'x floor':>7} {'tok/s':>9} {'KV MiB':>8} {'compress':>8}"
          + (f" {ab + ' / round':>20}" if ab else ""))
    for r in result["engine"]:
        if r.get("oom"):
            print(f"{r['batch']:>4} {r['policy']:>11} {'out of memory':>27}")
            continue
        turn = f"{'on' if r['switch_on'] else 'off'} / {r['round']}" if ab else ""
        print(f"{r['batch']:>4} {r['policy']:>11} {r['mode']:>6} {r['generated']:>9} {r['live_slots']:>6} "
              f"{r['step_ms']:>8.2f} {r['floor_ms']:>8.2f} {r['vs_floor']:>7.2f} "
              f"{r['tokens_per_s']:>9.0f} {r['kv_mb']:>8.0f} {100 * r['compress_share']:>7.1f}%"
              + (f" {turn:>20}" if ab else ""))
    if result.get("ab"):
        print(f"\nA/B of switch {ab}: off and on timed in turn, {result['ab_rounds']} rounds "
              "(median step over the rounds)")
        print(f"{'B':>4} {'policy':>11} {'mode':>6} {'generated':>9} {'off ms':>8} {'on ms':>8} "
              f"{'on/off':>7} {'off x floor':>11} {'on x floor':>10}")
        for r in result["ab"]:
            print(f"{r['batch']:>4} {r['policy']:>11} {r['mode']:>6} {r['generated']:>9} "
                  f"{r['off_ms']:>8.2f} {r['on_ms']:>8.2f} {r['on_over_off']:>7.3f} "
                  f"{r['off_vs_floor']:>11.2f} {r['on_vs_floor']:>10.2f}")
    if result.get("transformers"):
        print(f"\ntransformers {transformers.__version__} generate (full cache, sdpa), "
              f"first {result['hf_steps']} generated tokens")
        print(f"{'B':>4} {'step ms':>8} {'tok/s':>9} {'ours FullKV tok/s':>18} {'ratio':>6}")
        for r in result["transformers"]:
            ours = [e for e in result["engine"] if e["batch"] == r["batch"]
                    and e["policy"] == "FullKV" and e["mode"] == "graph" and not e.get("oom")]
            mine = ours[0]["tokens_per_s"] if ours else float("nan")
            print(f"{r['batch']:>4} {r['step_ms']:>8.2f} {r['tokens_per_s']:>9.0f} {mine:>18.0f} "
                  f"{mine / r['tokens_per_s']:>6.1f}")
    if result.get("equal_memory"):
        print(f"\nEqual GPU memory: the largest batch for {result['max_new']} generated tokens")
        print(f"{'policy':>11} {'batch':>6} {'mean step ms':>12} {'tok/s':>9}"
              + (f" {ab:>14}" if ab else ""))
        for r in result["equal_memory"]:
            setting = f" {'on' if r['switch_on'] else 'off':>14}" if ab else ""
            print(f"{r['policy']:>11} {r['batch']:>6} {r['mean_step_ms']:>12.2f} "
                  f"{r['tokens_per_s']:>9.0f}{setting}")


def plot(result, path):
    """One panel per batch of the engine section (step time against generated length), and, when
    there are equal-memory rows, one of their step over the generation and one of their
    tokens/s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in result["engine"]})
    memory = result.get("equal_memory") or []
    curves = [r for r in memory if "timed_at" in r]  # earlier runs' rows lack them
    panels = len(batches) + (1 if memory else 0) + (1 if curves else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    names = list(dict.fromkeys(r["policy"] for r in result["engine"]))
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # one color per policy in every panel
    modes = {"graph": "o-", "eager": "s:"}
    ab = result.get("ab_switch")
    # Lines of (label suffix, style, step-time key): each row's step, or with --ab the medians
    # with the switch off and on (on dashed).
    lines = ([(f"{ab} off", "", "off_ms"), (f"{ab} on", "--", "on_ms")] if ab
             else [("", "", "step_ms")])
    for ax, B in zip(axes[0], batches):
        for name in names:
            rows = [r for r in result["engine"] if r["batch"] == B and r["policy"] == name]
            for mode, style in modes.items():
                for suffix, dash, key in lines:
                    pts = [r for r in (result["ab"] if ab else rows)
                           if r["batch"] == B and r["policy"] == name and r["mode"] == mode]
                    if pts:
                        ax.plot([r["generated"] for r in pts], [r[key] for r in pts],
                                style[0] + (dash or style[1:]), color=colors[name],
                                label=f"{name} ({mode}{', ' + suffix if suffix else ''})")
            if rows and all(r.get("oom") for r in rows):
                ax.plot([], [], "x", color=colors[name], label=f"{name}: out of memory")
        hf = [r for r in result.get("transformers", []) if r["batch"] == B]
        if hf:
            ax.axhline(hf[0]["step_ms"], color="gray", ls="--", label="transformers (first tokens)")
        ax.set_title(f"B={B}")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("decode step (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if batches:
        axes[0][0].legend(fontsize=7)
    if curves:
        plot_equal_memory_curves(axes[0][len(batches)], curves, ab, result["max_new"])
    if memory:
        plot_equal_memory(axes[0][-1], memory, ab, result["max_new"])
    fig.suptitle(f"{result['shape']} (random {result['dtype']} weights), {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def equal_memory_label(row, ab, sep="\n"):
    return f"{row['policy']}{sep}B={row['batch']}" + (
        f", {ab} {'on' if row['switch_on'] else 'off'}" if ab else "")


def plot_equal_memory_curves(ax, rows, ab, max_new):
    """Each equal-memory row's step time over the generation (its measured points marked) and
    the mean it is rated by (dashed)."""
    for i, r in enumerate(rows):
        xs, ys = equal_memory_curve(r["timed_at"], r["step_ms"], r.get("first_compression"),
                                    max_new)
        ax.plot(xs, ys, "-", color=f"C{i}", label=equal_memory_label(r, ab, sep=", "))
        ax.plot(r["timed_at"], r["step_ms"], "o", color=f"C{i}", ms=4)
        ax.axhline(r["mean_step_ms"], color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("decode step (ms); dashed: mean")
    ax.set_title("equal GPU memory: step over the generation", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_equal_memory(ax, rows, ab, max_new):
    """Tokens/s of each equal-memory row as a bar, labelled with its batch (and switch setting)."""
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter
    labels = [equal_memory_label(r, ab) for r in rows]
    speeds = [r["tokens_per_s"] for r in rows]
    bars = ax.barh(range(len(rows)), speeds, color=[f"C{i}" for i in range(len(rows))])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in speeds], fontsize=7, padding=2)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(speeds) * 1.25)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel("tokens/s")
    ax.set_title(f"equal GPU memory ({max_new} generated tokens)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    global transformers
    import transformers as _transformers
    transformers = _transformers
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes, any device")
    ap.add_argument("--shape", choices=list(SHAPES), default=None)
    ap.add_argument("--batches", type=ints, default=None)
    ap.add_argument("--budgets", type=ints, default=None)
    ap.add_argument("--points", type=ints, default=None, help="generated lengths to measure at")
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--max-new", type=int, default=None, help="generated tokens of the equal-memory runs")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per point")
    ap.add_argument("--hf-steps", type=int, default=None)
    ap.add_argument("--modes", default="graph,eager",
                    help="decode step modes of the engine section: graph (CUDA graph replay), eager")
    ap.add_argument("--memory-batches", type=ints, default=None,
                    help="FULLKV,GKV: the equal-memory batches (e.g. found by an earlier run); "
                         "skips the search")
    ap.add_argument("--memory-policies", default="fullkv,gkv",
                    help="which rows the equal-memory section measures (one row can take most of "
                         "a 10-minute call: FullKV's fill to 16K tokens)")
    ap.add_argument("--only", default="engine,transformers,memory",
                    help="sections to run, of engine, transformers, memory and search (the "
                         "equal-memory batch search alone, CUDA only)")
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], default=None,
                    help="torch's preferred BLAS library for the GEMMs (default: torch's choice)")
    ap.add_argument("--ab", choices=["chained_launch", "decode_linear", "tuned_linear"],
                    default=None,
                    help="the engine and equal-memory sections time each batch and policy with "
                         "this switch (gkv_ext.switches) off and on, in turn, and print both")
    ap.add_argument("--ab-rounds", type=int, default=3, help="turns of off and on with --ab")
    ap.add_argument("--out", default=None, help="writes OUT.json and OUT.png")
    args = ap.parse_args(argv)
    if args.ab_rounds < 1:
        ap.error(f"--ab-rounds must be >= 1, got {args.ab_rounds}")
    args.memory_policies = args.memory_policies.split(",")
    if not set(args.memory_policies) <= {"fullkv", "gkv"}:
        ap.error(f"--memory-policies takes fullkv and/or gkv, got {','.join(args.memory_policies)}")
    if args.memory_batches and len(args.memory_batches) != 2:
        ap.error(f"--memory-batches takes two batch sizes (FullKV,G-KV), got {args.memory_batches}")
    # `timeout` stops a long run with SIGTERM: exit through the sections' finally, which saves.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = torch.device("cuda" if torch.cuda.is_available() and gkv_ext.built_with_cuda else "cpu")
    if args.blas and device.type == "cuda":
        torch.backends.cuda.preferred_blas_library(args.blas)
    quick = args.quick or device.type != "cuda"
    defaults = dict(shape="tiny", batches=[1, 4], budgets=[32, 64], points=[64, 256], prompt=48,
                    max_new=256, steps=32, hf_steps=16) if quick else \
        dict(shape="qwen2.5-7b", batches=[1, 16, 64], budgets=[512, 1024, 2048],
             points=[1024, 4096, 8192, 16384], prompt=512, max_new=16384, steps=128, hf_steps=64)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if ("memory" in args.only.split(",") and "fullkv" in args.memory_policies
            and max(args.points) != args.max_new):
        ap.error(f"the equal-memory section integrates FullKV's step up to --max-new "
                 f"{args.max_new}: the last of --points must be it, got {max(args.points)}")
    args.divide = policies.GKV(max(args.budgets)).divide_length
    args.modes = args.modes.split(",")
    only = set(args.only.split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    hf, model = build_models(args.shape, device, dtype)
    bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                  copy_gbps=bw, blas=args.blas, shape=args.shape,
                  dtype=str(dtype).replace("torch.", ""),
                  weight_gb=weight_bytes(model) / 1e9, prompt=args.prompt, max_new=args.max_new,
                  hf_steps=args.hf_steps, torch=torch.__version__,
                  transformers_version=transformers.__version__)
    result["engine"] = []
    if args.ab:
        result.update(ab_switch=args.ab, ab_rounds=args.ab_rounds)
    sections = [("engine", lambda: bench_engine(model, args, device, bw)),
                ("transformers", lambda: bench_transformers(hf, args, device))]
    # The batch search allocates until the device is full: on CUDA only, or with given batches.
    if device.type == "cuda" or args.memory_batches:
        result["equal_memory"] = []
        sections.append(("equal_memory", lambda: bench_equal_memory(
            model, args, device, bw, result["equal_memory"])))
    if device.type == "cuda":
        sections.append(("batch_search", lambda: search_equal_memory(model, args, device)))

    def save():  # after every section, so a long run that stops keeps what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".json").write_text(json.dumps(result, indent=1))
            if result["engine"] or result.get("equal_memory"):
                plot(result, args.out + ".png")

    for key, section in sections:
        if key.split("_")[-1] not in only:
            continue
        try:
            with torch.no_grad():
                result[key] = section()
            if key == "engine" and args.ab:
                result["ab"] = ab_summary(result["engine"])
        finally:
            save()
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
