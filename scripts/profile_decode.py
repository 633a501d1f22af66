"""Decode launches of the packed-KV kernel, timed with its load-stage ablations, and profiled.

One unsplit decode step (``--batch`` sequences at ``--context`` tokens, GQA 8:1, head_dim 128,
pages of 128, q_len 1: one kernel launch) per ``--bits`` pair, run as it ships and with the
ablations of ``packed_attention`` (``no_copy``: no packed loads; ``no_dequant``: no conversion;
the 128-row tile of prefill, whose second warpgroup works on padding rows). The ablated outputs
are wrong; only their times matter: when taking the conversion out does not make a launch
faster, the conversion is not what bounds it. ``--time`` prints medians of CUDA-event timings;
without it, each variant runs once between cudaProfilerStart/Stop, for Nsight Compute:

    python scripts/profile_decode.py --time --bits 4,4 --bits 2,2
    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats -o prof \\
        python scripts/profile_decode.py --bits 4,4
"""

from __future__ import annotations

import argparse

import torch

from fa4_tq import PagedKVCache
from fa4_tq.benchmark import profile_each, time_gpu
from fa4_tq.kernels.launch import packed_attention

HEADS, KV_HEADS, D, PAGE = 64, 8, 128, 128
VARIANTS = {
    "as shipped": {},
    "no_dequant": dict(_ablate="no_dequant"),
    "no_copy": dict(_ablate="no_copy"),
    "128-row tile": dict(_tiles=(128, 128)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", action="append", default=None, help="K,V bits (repeatable; default 4,4)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--time", action="store_true", help="print timings instead of profiling")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    pairs = [tuple(int(b) for b in p.split(",")) for p in (args.bits or ["4,4"])]
    b, ctx = args.batch, args.context
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = b * ctx // PAGE
    table = torch.randperm(pages, device="cuda", generator=g).to(torch.int32).view(b, -1)
    used = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 1, HEADS, D, device="cuda", generator=g, dtype=torch.bfloat16)
    launches = []
    for kb, vb in pairs:
        cache = PagedKVCache(1, pages, PAGE, KV_HEADS, D, k_bits=kb, v_bits=vb, device="cuda")
        slots = torch.arange(pages * PAGE, device="cuda", dtype=torch.int32)
        for s in range(0, slots.numel(), 1 << 18):
            kv = torch.randn(2, min(1 << 18, slots.numel() - s), KV_HEADS, D, device="cuda", generator=g,
                             dtype=torch.bfloat16)
            cache.write(0, kv[0], kv[1], slots[s:s + (1 << 18)], check_indices=False)
        k, v = cache.layer(0)
        for name, knobs in VARIANTS.items():
            launches.append((f"K{kb}V{vb} {name}", lambda k=k, v=v, knobs=knobs: packed_attention(
                q, k, v, softmax_scale=D ** -0.5, causal=True, window_size=(None, None), seqused_k=used,
                page_table=table, return_lse=False, **knobs)))
    for _, fn in launches:  # compile + warm up
        fn()
    torch.cuda.synchronize()
    if args.time:
        print(f"{torch.cuda.get_device_name()}: batch {b}, context {ctx}, {HEADS}/{KV_HEADS} heads, q_len 1, unsplit")
        print("| variant | us | vs as shipped |\n| --- | --- | --- |")
        base = None
        for name, fn in launches:
            t = time_gpu(fn, reps=args.reps)
            base = t if name.endswith("as shipped") else base
            print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} |", flush=True)
        return
    profile_each(launches)


if __name__ == "__main__":
    main()
