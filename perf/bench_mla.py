"""MLA prefill side by side in one run (an SM90 or SM100 GPU): ``mla.flash_mla_prefill`` on a bf16
latent cache and on packed latents (2/4/8-bit), against a plain PyTorch bf16 implementation
(``mla.reference.attention_bf16``: bf16 matmuls, float32 softmax) on a contiguous bf16 latent.
On SM 10.x the kernel is ``mla/sm100.py`` and its bf16-latent row is FA4's own 2-CTA MLA forward
on its paged cp.async path (no B200 number has been measured by the project).

One sequence of L tokens prefilled from scratch (causal), pages of 64, 16 or 128 query heads
sharing the latent. TFLOP/s counts 2 * (576 + 512) FLOPs per visible (query, key, head) triple,
L * (L + 1) / 2 pairs per head when causal. Our times are medians of GPU time per call over 10
calls queued back to back (``time_gpu``: a sleep kernel holds the stream while the host queues
them, so Python and launch time are left out, which at 1K tokens would dominate an eager call;
back to back, so the GPU runs at its sustained clock: one call after each sleep measured 10%
faster on the bf16 latent) to the kernel on its prepared inputs (``mla.launch.mla_attention``;
the packed path's q rotation and output un-rotation, two bf16 GEMMs, are timed the same way as
"rot ms"). The PyTorch baseline is timed eagerly (``time_cuda``), one call a timing: it runs
0.4-750 ms. Writes perf/results/mla-<gpu>.md.

    python perf/bench_mla.py [--quick] [--reps N] [--out-dir D]
"""

from __future__ import annotations

import os

import torch

import mla
from fa4_tq.benchmark import bench_parser, require_gpu, time_cuda, time_gpu, write_results
from fa4_tq.codec import rotate_rounded, unrotate_rounded
from mla.launch import mla_attention
from mla.reference import attention_bf16

PAGE = 64
SCALE = 576 ** -0.5
HEADER = ("| heads | L | latent | ms | TFLOP/s | vs bf16 latent | PyTorch bf16 ms | PyTorch TFLOP/s | "
          "speedup vs PyTorch | rot ms |")


def causal_flops(heads: int, L: int) -> float:
    """The docstring's count: 2 * (576 + 512) FLOPs per visible (query, key, head), L (L + 1) / 2
    pairs a head."""
    return 2 * (576 + 512) * heads * L * (L + 1) / 2


def problem(heads: int, L: int, bits, gen):
    pages = L // PAGE
    cache = mla.MLACache(1, pages, PAGE, bits=bits, device="cuda")
    c_kv = torch.randn(L, 512, device="cuda", generator=gen).to(torch.bfloat16)
    k_pe = torch.randn(L, 64, device="cuda", generator=gen).to(torch.bfloat16)
    cache.write(0, c_kv, k_pe, torch.arange(L, dtype=torch.int32, device="cuda"))
    latent, rope = cache.layer(0)
    q_nope = (torch.randn(L, heads, 512, device="cuda", generator=gen) / 8).to(torch.bfloat16)
    q_pe = torch.randn(L, heads, 64, device="cuda", generator=gen).to(torch.bfloat16)
    idx = dict(dtype=torch.int32, device="cuda")
    table = torch.arange(pages, **idx).view(1, pages)
    return (q_nope, q_pe, latent, rope, table, torch.tensor([0, L], **idx), torch.tensor([L], **idx)), c_kv, k_pe


def main(argv=None):
    ap = bench_parser(__doc__, 10, os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="128 heads at 8K only")
    args = ap.parse_args(argv)
    gpu = require_gpu("bench_mla")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(128, 8192)] if args.quick else [(h, L) for h in (16, 128) for L in (1024, 2048, 4096, 8192, 16384)]
    lines = []
    print(HEADER, flush=True)
    for heads, L in shapes:
        flops = causal_flops(heads, L)
        base_ms = None
        bf16_ms = None
        for bits in (None, 4, 2, 8):
            a, c_kv, k_pe = problem(heads, L, bits, gen)
            q_nope, q_pe, latent, rope, table, cu, used = a
            out = torch.empty_like(q_nope)
            run = lambda: mla_attention(q_nope, q_pe, latent, rope, table, cu, used, L, softmax_scale=SCALE,
                                        causal=True, return_lse=False, out=out)
            ms = time_gpu(run, reps=args.reps, warmup=2, calls=10)
            rot = "-"
            if bits is None:
                bf16_ms = ms
                q = torch.cat([q_nope, q_pe], -1)
                k = torch.cat([c_kv, k_pe], -1)
                reps = max(2, min(args.reps, 3 if heads * L * L > 2 ** 33 else args.reps))
                base_ms = time_cuda(lambda: attention_bf16(q, k, c_kv, softmax_scale=SCALE, causal=True),
                                    reps=reps, warmup=1)
            else:
                seed = latent.seed
                rot = f"{time_gpu(lambda: unrotate_rounded(rotate_rounded(q_nope, seed), seed), reps=args.reps, calls=10):.3f}"
            line = (f"| {heads} | {L} | {'bf16' if bits is None else f'{bits}-bit'} | {ms:.3f} | "
                    f"{flops / ms / 1e9:.0f} | {bf16_ms / ms:.2f}x | {base_ms:.3f} | {flops / base_ms / 1e9:.0f} | "
                    f"{base_ms / ms:.2f}x | {rot} |")
            lines.append(line)
            print(line, flush=True)
            a = latent = out = None  # free this cache before the next one is built
            torch.cuda.empty_cache()
    write_results(args.out_dir, "mla", "MLA prefill",
                  f"`python perf/bench_mla.py{' --quick' if args.quick else ''}` on {gpu} (one causal sequence of L "
                  f"tokens, pages of {PAGE}, latent 512 + RoPE 64; GPU time of 10 calls back to back, medians of {args.reps} timings, see the "
                  f"script's docstring).", HEADER, lines)


if __name__ == "__main__":
    main()
