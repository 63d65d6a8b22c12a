"""Where a decode step's GPU time goes: kernels of one step, grouped by name.

  python scripts/profile_decode.py --batch 64 --policy gkv --budget 2048 --generated 2000

Builds the Qwen2.5-7B-shaped model of bench_generate.py (random bf16 weights), brings a batch to
--generated tokens by teacher forcing, then profiles --steps eager decode steps that do not
compress (a CUDA graph replays the same kernels with the same arguments; --graph replays them)
with torch.profiler.
Prints, per kernel name: calls per step, microseconds per call and milliseconds per step, largest
first; with --compress, the steps profiled are compressing ones instead.
Our decode kernels are launched chained (programmatic dependent launch): each is counted from its
early start, so its time overlaps its predecessor's and the per-kernel times add up to more than
the step. GKV_CHAINED_LAUNCH=0 launches them plainly, for times that add up.
"""
import argparse
import collections

import torch
import transformers

import bench_generate  # scripts/ is on the path when a script runs
from gkv_ext import policies


def add_kernels(prof, totals):
    """Adds the profiled kernels to totals: name -> [calls, microseconds]; returns the
    microseconds from the first kernel's start to the last one's end (busy time plus gaps)."""
    start, end = float("inf"), 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            row = totals[event.name]
            row[0] += 1
            row[1] += event.device_time_total
            start = min(start, event.time_range.start)
            end = max(end, event.time_range.end)
    return end - start


def kernel_table(totals, steps):
    return sorted(((name, calls / steps, us / calls, us / steps / 1e3)
                   for name, (calls, us) in totals.items()), key=lambda r: -r[3])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--policy", choices=["gkv", "fullkv"], default="gkv")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--generated", type=int, default=2000)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--compress", action="store_true", help="profile compressing steps")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--graph", action="store_true",
                    help="replay the decode step from a CUDA graph, as the benchmark does")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    bench_generate.transformers = transformers
    device = torch.device("cuda")
    _, model = bench_generate.build_models("qwen2.5-7b", device, torch.bfloat16)
    policy = policies.GKV(args.budget) if args.policy == "gkv" else policies.FullKV()
    D = policy.divide_length
    extra = (args.steps + 2) * (D if args.compress else 1)
    with torch.no_grad():
        run = bench_generate.Run(model, policy, args.batch, args.prompt, args.generated + extra,
                                 device, chunk=D // 16)
        run.fill_to(args.generated, chunk=D // 16)
        stepper = bench_generate.gkv_ext.DecodeStepper(model, run.cache, cuda_graph=args.graph)
        logits = run.logits

        def step_to_wanted():
            """Steps (unprofiled) until the next step is of the wanted kind."""
            nonlocal logits
            while run.cache.decode_compresses(1) != args.compress:
                logits = stepper.step(logits.argmax(-1))

        step_to_wanted()
        logits = stepper.step(logits.argmax(-1))  # warm-up: first launches, allocator
        totals = collections.defaultdict(lambda: [0, 0.0])
        span_us = 0.0
        for _ in range(args.steps):  # one profiler session per step: only wanted steps count
            step_to_wanted()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                logits = stepper.step(logits.argmax(-1))
                torch.cuda.synchronize()
            span_us += add_kernels(prof, totals)
    rows = kernel_table(totals, args.steps)
    total = sum(r[3] for r in rows)
    print(f"{torch.cuda.get_device_name()}: B={args.batch}, {args.policy}"
          f"{'@' + str(args.budget) if args.policy == 'gkv' else ''}, {args.generated} generated, "
          f"cache length {run.cache.length}; {'compressing' if args.compress else 'plain'} steps")
    print(f"kernels per step {sum(r[1] for r in rows):.0f}, GPU time per step {total:.3f} ms, "
          f"first kernel start to last kernel end {span_us / args.steps / 1e3:.3f} ms")
    print("| kernel | calls/step | us/call | ms/step | share |\n|---|---|---|---|---|")
    for name, calls, us, ms in rows[:args.top]:
        print(f"| {name[:90]} | {calls:.1f} | {us:.1f} | {ms:.3f} | {100 * ms / total:.1f}% |")


if __name__ == "__main__":
    main()
