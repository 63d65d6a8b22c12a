"""Times gkv::decode_attention (with and without score emission) against torch SDPA and against
the device's copy bandwidth. bf16, Hq = 28, Hkv = 4, d = 128 (DeepSeek-R1-Distill-Qwen-7B).

    PYTHONPATH=$PWD python scripts/bench_decode_attention.py [--batches 1 8 32 64] [--slots ...]

Prints one row per (B, C): microseconds (median of CUDA-event timings) and the K/V read rate.
"""
import argparse

import torch
import torch.nn.functional as F

from gkv_ext import ops


def time_us(fn, iters=50):
    for _ in range(5):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    stop = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for a, b in zip(start, stop):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in zip(start, stop))[iters // 2] * 1e3


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = time_us(lambda: y.copy_(x))
    return 2 * x.numel() / us * 1e-3  # GB/s, read + write


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--slots", type=int, nargs="+", default=[2048, 8192, 32768])
    args = parser.parse_args()
    Hq, Hkv, d, dt = 28, 4, 128, torch.bfloat16
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s")
    print(f"{'B':>3} {'C':>6} {'gkv us':>8} {'emit us':>8} {'sdpa us':>8} {'gkv GB/s':>9} "
          f"{'% copy':>6} {'emit +%':>7} {'vs sdpa':>7}")
    for B in args.batches:
        for C in args.slots:
            q = torch.randn(B, Hq, d, device="cuda", dtype=dt)
            k = torch.randn(B, Hkv, C, d, device="cuda", dtype=dt)
            v = torch.randn(B, Hkv, C, d, device="cuda", dtype=dt)
            pos = torch.arange(C, device="cuda", dtype=torch.int32).expand(B, Hkv, C).contiguous()
            acc = torch.zeros(B, Hkv, C, device="cuda")
            scale = d ** -0.5
            t_gkv = time_us(lambda: ops.decode_attention(q, k, v, pos, C, scale))
            t_emit = time_us(lambda: ops.decode_attention(q, k, v, pos, C, scale, acc))
            q4 = q.unsqueeze(2)
            t_sdpa = time_us(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale,
                                                                     enable_gqa=True))
            rate = 2 * k.numel() * k.element_size() / t_gkv * 1e-3
            print(f"{B:>3} {C:>6} {t_gkv:>8.1f} {t_emit:>8.1f} {t_sdpa:>8.1f} {rate:>9.0f} "
                  f"{100 * rate / copy:>6.0f} {100 * (t_emit / t_gkv - 1):>7.1f} "
                  f"{t_sdpa / t_gkv:>7.2f}")
            del q, k, v, pos, acc


if __name__ == "__main__":
    main()
