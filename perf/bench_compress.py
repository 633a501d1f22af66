"""Online cache write, side by side in one run (any SM90+ GPU): the cache-write kernel
(``PagedKVCache.write(backend="kernel")``), the PyTorch reference path (``backend="reference"``)
and a device-to-device copy of a large buffer (the bandwidth ceiling).

GB/s counts the bytes that must move: the bf16 K and V read, the packed rows and scales written.
Times are medians of CUDA-event timings. Writes perf/results/compress-<gpu>.md.

    python perf/bench_compress.py [--out-dir D]
"""

from __future__ import annotations

import os

import torch

from fa4_tq import PagedKVCache
from fa4_tq.benchmark import bench_parser, require_gpu, time_cuda, write_results
from fa4_tq.codec import row_bytes

TOKENS = (1, 16, 256, 1024, 4096, 16384, 65536)
PAIRS = ((4, 4), (2, 2), (8, 8), (3, 3))
HEADS, D, PAGE = 8, 128, 64


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_cuda(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() / (ms * 1e6)


def run(reps: int):
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kb, vb in PAIRS:
        for t in TOKENS:
            pages = -(-t // PAGE) + 1
            cache = PagedKVCache(1, pages, PAGE, HEADS, D, k_bits=kb, v_bits=vb, device="cuda")
            k = torch.randn(t, HEADS, D, device="cuda", generator=gen, dtype=torch.bfloat16)
            v = torch.randn(t, HEADS, D, device="cuda", generator=gen, dtype=torch.bfloat16)
            slots = torch.randperm(pages * PAGE, device="cuda", generator=gen)[:t].to(torch.int32)
            moved = 2 * k.numel() * 2 + t * HEADS * (row_bytes(D, kb) + row_bytes(D, vb) + 2 * 2)
            ours = time_cuda(lambda: cache.write(0, k, v, slots, check_indices=False, backend="kernel"), reps=reps)
            ref = time_cuda(lambda: cache.write(0, k, v, slots, check_indices=False, backend="reference"),
                            reps=max(3, reps // 4))
            gbs = moved / (ours * 1e6)
            row = dict(kb=kb, vb=vb, t=t, ours_us=ours * 1e3, gbs=gbs, pct=100 * gbs / copy, ref_us=ref * 1e3)
            rows.append(row)
            print(_fmt(row), flush=True)
    return copy, rows


HEADER = "| K/V bits | tokens | kernel us | kernel GB/s | % of copy | reference us | kernel speedup |"


def _fmt(r):
    return (f"| K{r['kb']}V{r['vb']} | {r['t']} | {r['ours_us']:.1f} | {r['gbs']:.0f} | {r['pct']:.0f}% "
            f"| {r['ref_us']:.1f} | {r['ref_us'] / r['ours_us']:.1f}x |")


def main(argv=None):
    ap = bench_parser(__doc__, 40, os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    require_gpu("bench_compress")
    print(HEADER)
    copy, rows = run(args.reps)
    write_results(args.out_dir, "compress", "Cache write",
                  f"`python perf/bench_compress.py` ({HEADS} KV heads, head_dim {D}, page size {PAGE}, random "
                  f"slots; median of {args.reps} CUDA-event timings). Device-to-device copy bandwidth "
                  f"measured in the same run: {copy:.0f} GB/s.", HEADER, [_fmt(r) for r in rows])


if __name__ == "__main__":
    main()
