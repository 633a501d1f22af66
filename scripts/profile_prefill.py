"""One prefill launch of FA4 bf16 and of the inline-dequant kernel, for Nsight Compute.

Everything is compiled and warmed up first; only the launches between cudaProfilerStart/Stop are
profiled, so run it under ``ncu --profile-from-start off``:

    ncu --clock-control none --profile-from-start off --set full -o prof \\
        python scripts/profile_prefill.py --bits 4,4 --bits 2,2
    ncu --import prof.ncu-rep --page details

Kernels are profiled in the order printed (FA4 first, then one launch per ``--bits`` pair and per
``--ablate`` variant).
"""

from __future__ import annotations

import argparse

import torch

from fa4_tq import compress
from fa4_tq.benchmark import profile_each
from fa4_tq.codec import rotate_rounded
from fa4_tq.kernels.launch import packed_attention


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", action="append", default=None, help="K,V bits (repeatable; default 4,4)")
    ap.add_argument("--ablate", action="append", default=[], choices=("no_copy", "no_dequant"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--heads", default="32,4", help="query heads, kv heads")
    ap.add_argument("--no-causal", action="store_true")
    args = ap.parse_args(argv)
    from flash_attn.cute import flash_attn_func as fa4

    pairs = [tuple(int(b) for b in p.split(",")) for p in (args.bits or ["4,4"])]
    h, hk = (int(x) for x in args.heads.split(","))
    d, s, causal = args.head_dim, args.seqlen, not args.no_causal
    batch = max(1, 32768 // s)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, s, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for n in (h, hk, hk))

    launches = [("fa4 bf16", lambda: fa4(q, k, v, causal=causal))]
    for kb, vb in pairs:
        kp, vp = compress(k, kb, seed=1), compress(v, vb, seed=2)
        q_rot = rotate_rounded(q, kp.seed)
        for ab in [None, *args.ablate]:
            launches.append((f"ours K{kb}V{vb}" + (f" {ab}" if ab else ""),
                             lambda kp=kp, vp=vp, q_rot=q_rot, ab=ab: packed_attention(
                                 q_rot, kp, vp, softmax_scale=d ** -0.5, causal=causal, window_size=(None, None),
                                 return_lse=False, rotation="none", _ablate=ab)))
    for _, fn in launches:  # compile + warm up outside the profiled range
        fn(), fn()
    profile_each(launches, f"  (b={batch} s={s} h={h}/{hk} d={d} causal={causal})")


if __name__ == "__main__":
    main()
