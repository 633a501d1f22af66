"""One cache-write launch (``PagedKVCache.write``, K and V together) per ``--bits`` pair, for Nsight Compute.

Everything is compiled and warmed up first; only the launches between cudaProfilerStart/Stop are
profiled, so run it under ``ncu --profile-from-start off``:

    ncu --clock-control none --profile-from-start off --set full -o prof \\
        python scripts/profile_cache_write.py --tokens 65536 --bits 4,4
    ncu --import prof.ncu-rep --page details

The problem is bench_compress's: 8 KV heads, head_dim 128 (``--head-dim``), pages of 64, random slots.
"""

from __future__ import annotations

import argparse

import torch

from fa4_tq import PagedKVCache
from fa4_tq.benchmark import profile_each


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", action="append", default=None, help="K,V bits (repeatable; default 4,4)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args(argv)
    pairs = [tuple(int(b) for b in p.split(",")) for p in (args.bits or ["4,4"])]
    t, d, h, page = args.tokens, args.head_dim, args.heads, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    runs = []
    for kb, vb in pairs:
        pages = -(-t // page) + 1
        cache = PagedKVCache(1, pages, page, h, d, k_bits=kb, v_bits=vb, device="cuda")
        k, v = (torch.randn(t, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        slots = torch.randperm(pages * page, device="cuda", generator=g)[:t].to(torch.int32)
        write = lambda c=cache, k=k, v=v, s=slots: c.write(0, k, v, s, backend="kernel")
        write()  # compile, warm up
        runs.append((f"K{kb}V{vb}", write))
    profile_each(runs, f" at {t} tokens")


if __name__ == "__main__":
    main()
