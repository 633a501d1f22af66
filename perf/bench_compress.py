"""Online cache write, side by side in one run (any SM90+ GPU): the cache-write kernel
(``PagedKVCache.write(backend="kernel")``), the PyTorch reference path (``backend="reference"``)
and a device-to-device copy of a large buffer (the bandwidth ceiling).

GB/s counts the bytes that must move: the bf16 K and V read, the packed rows and scales written.
"GPU us" is the kernel's time per call with launches queued ahead (``time_gpu``: what a CUDA
graph or a host running ahead sees), launched as a programmatic dependent as it ships; "no-PDL
us" the same kernel launched plainly, which waits for the kernel before it to complete before
it starts (the calls are timed in alternating rounds, the best median kept); "host us" is the
Python + launch time of one eager ``PagedKVCache.write`` call, which bounds the rate of a host
that waits on nothing else.
Medians. Writes perf/results/compress-<gpu>.md. ``--sweep`` times the kernel's tuning knobs
(values per thread, CTAs per SM) instead.

    python perf/bench_compress.py [--out-dir D] [--sweep]
"""

from __future__ import annotations

import os

import torch

from fa4_tq import PagedKVCache
from fa4_tq.benchmark import bench_parser, copy_bandwidth, require_gpu, time_cuda, time_gpu, time_host, write_results
from fa4_tq.codec import row_bytes
from fa4_tq.kernels.launch import write_packed

TOKENS = (1, 16, 256, 1024, 4096, 16384, 65536)
PAIRS = ((4, 4), (2, 2), (8, 8), (3, 3))
HEADS, D, PAGE = 8, 128, 64


def _problem(kb, vb, t, gen):
    pages = -(-t // PAGE) + 1
    cache = PagedKVCache(1, pages, PAGE, HEADS, D, k_bits=kb, v_bits=vb, device="cuda")
    k = torch.randn(t, HEADS, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(t, HEADS, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    slots = torch.randperm(pages * PAGE, device="cuda", generator=gen)[:t].to(torch.int32)
    moved = 2 * k.numel() * 2 + t * HEADS * (row_bytes(D, kb) + row_bytes(D, vb) + 2 * 2)
    return cache, k, v, slots, moved


def run(reps: int):
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kb, vb in PAIRS:
        for t in TOKENS:
            cache, k, v, slots, moved = _problem(kb, vb, t, gen)
            write = lambda: cache.write(0, k, v, slots, check_indices=False, backend="kernel")
            plain = lambda: write_packed(k, v, slots, *cache.layer(0), pdl=False)
            ours = nopdl = float("inf")
            for _ in range(2):
                ours = min(ours, time_gpu(write, reps=reps))
                nopdl = min(nopdl, time_gpu(plain, reps=reps))
            host = time_host(write, reps=reps)
            ref = time_cuda(lambda: cache.write(0, k, v, slots, check_indices=False, backend="reference"),
                            reps=max(3, reps // 4))
            gbs = moved / (ours * 1e6)
            row = dict(kb=kb, vb=vb, t=t, ours_us=ours * 1e3, gbs=gbs, pct=100 * gbs / copy,
                       nopdl_us=nopdl * 1e3, host_us=host * 1e3, ref_us=ref * 1e3)
            rows.append(row)
            print(_fmt(row), flush=True)
    return copy, rows


def sweep(reps: int):
    """GPU time of the kernel's knobs at 4K and 64K tokens (printed, not written)."""
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s")
    print("| K/V bits | tokens | per_lane | ctas_per_sm | GPU us | % of copy |")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kb, vb in ((4, 4), (8, 8)):
        for t in (4096, 65536):
            cache, k, v, slots, moved = _problem(kb, vb, t, gen)
            kc, vc = cache.layer(0)
            for per_lane in (32, 64):
                for per_sm in (3, 4, 6):
                    us = 1e3 * time_gpu(lambda: write_packed(k, v, slots, kc, vc, per_lane=per_lane,
                                                             ctas_per_sm=per_sm), reps=reps)
                    print(f"| K{kb}V{vb} | {t} | {per_lane} | {per_sm} | {us:.1f} | "
                          f"{100 * moved / (us * 1e3) / copy:.0f}% |", flush=True)


HEADER = ("| K/V bits | tokens | GPU us | GB/s | % of copy | no-PDL us | PDL speedup | host us per call "
          "| reference us | GPU speedup over reference |")


def _fmt(r):
    return (f"| K{r['kb']}V{r['vb']} | {r['t']} | {r['ours_us']:.1f} | {r['gbs']:.0f} | {r['pct']:.0f}% "
            f"| {r['nopdl_us']:.1f} | {r['nopdl_us'] / r['ours_us']:.2f}x "
            f"| {r['host_us']:.1f} | {r['ref_us']:.1f} | {r['ref_us'] / r['ours_us']:.0f}x |")


def main(argv=None):
    ap = bench_parser(__doc__, 40, os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--sweep", action="store_true", help="time the kernel's tuning knobs instead")
    args = ap.parse_args(argv)
    require_gpu("bench_compress")
    if args.sweep:
        return sweep(args.reps)
    print(HEADER)
    copy, rows = run(args.reps)
    write_results(args.out_dir, "compress", "Cache write",
                  f"`python perf/bench_compress.py` ({HEADS} KV heads, head_dim {D}, page size {PAGE}, random "
                  f"slots; medians of {args.reps} timings, see the script's docstring). Device-to-device copy bandwidth "
                  f"measured in the same run: {copy:.0f} GB/s.", HEADER, [_fmt(r) for r in rows])


if __name__ == "__main__":
    main()
