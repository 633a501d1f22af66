"""Prefill on the packed cache, side by side in one run (H100/H200; any SM90 GPU):

- FA4 bf16: ``flash_attn.cute.flash_attn_func`` on the original bf16 K/V (the ceiling);
- decompress + FA4: ``fa4_tq.flash_attn_func(backend="decompress")`` (decode to a bf16 scratch,
  FA4, rotate back), end to end;
- ours: the inline-dequant kernel with the query rotation and output un-rotation fused in (what
  users run: the TFLOP/s and the ratio to FA4), and end to end through ``fa4_tq.flash_attn_func``
  (what the speedup over decompress + FA4 compares). "rotation" columns: what the rotations add
  to the kernel alone (``rotation="none"``, pre-rotated q, rotated output), fused and as two
  bf16 GEMMs around it.

TFLOP/s count 4·b·h·sq·sk·d, halved when causal. Times are medians of CUDA-event timings: the
kernels' (FA4, ours, the kernel alone, the rotation GEMMs) of back-to-back calls, GPU time only
(``benchmark.time_gpu``), the two end-to-end columns of one eager call each, host work included
(``benchmark.time_cuda``).
``--ablate`` adds kernel variants that drop a stage of the load (results wrong, timing only):
the gap between them and the full kernel says where the time goes.

    python perf/bench_prefill.py              # default matrix
    python perf/bench_prefill.py --full       # every bit pair x head_dim x seqlen x mask x GQA
    python perf/bench_prefill.py --quick      # every bit pair at one shape (hd128 s8K causal GQA 8:1)
    python perf/bench_prefill.py --rotation   # K4V4 GQA 8:1 at seqlen 1K/4K and 1K chunks on 16K: what the rotations cost
    python perf/bench_prefill.py --scheduler  # K4V4 GQA 8:1/2:1/3:1, MHA, 1K-8K: persistent vs one tile a CTA
    python perf/bench_prefill.py --out-dir D  # where prefill-<gpu>.md goes (default perf/results)
"""

from __future__ import annotations

import itertools
import os

import torch

from fa4_tq import compress, flash_attn_func
from fa4_tq.benchmark import attention_flops, bench_parser, require_gpu, time_cuda, time_gpu, write_results
from fa4_tq.codec import rotate_rounded, unrotate_rounded
from fa4_tq.kernels.launch import packed_attention

BITS = (2, 3, 4, 8)
HEADS = {"gqa8": (32, 4), "mha": (32, 32), "gqa2": (32, 16), "gqa3": (24, 8)}  # gqa3: Q by cp.async
LAYOUTS = ("gqa8", "mha")  # the main tables' head layouts; --scheduler also times gqa2 and gqa3


def _configs(full: bool, quick: bool = False, rotation: bool = False):
    """(kbits, vbits, head_dim, seqlen, causal, heads) tuples; seqlen is an int (queries = keys) or
    (seqlen_q, seqlen_k) for a chunk of queries after cached keys (chunked prefill)."""
    if rotation:  # where the rotations weigh most: short sequences; and the serving case, a 1K chunk on 16K keys
        return ([(4, 4, d, s, c, "gqa8") for d, s, c in itertools.product((128, 64), (1024, 4096), (True, False))]
                + [(4, 4, d, (1024, 16384), True, "gqa8") for d in (128, 64)])
    if quick:
        return [(kb, vb, 128, 8192, True, "gqa8") for kb, vb in itertools.product(BITS, BITS)]
    if full:
        return list(itertools.product(BITS, BITS, (64, 128), (1024, 2048, 4096, 8192, 16384, 32768),
                                      (True, False), LAYOUTS))
    out = [(kb, vb, 128, 8192, True, "gqa8") for kb, vb in itertools.product(BITS, BITS)]
    for d, s, causal, heads in itertools.product((128, 64), (1024, 4096, 16384), (True, False), LAYOUTS):
        out.append((4, 4, d, s, causal, heads))
    out.append((4, 4, 128, 32768, True, "gqa8"))
    out.append((2, 2, 128, 32768, True, "gqa8"))
    return out


def _seqlens(s):
    return s if isinstance(s, tuple) else (s, s)


def _inputs(kb, vb, d, s, heads, gen):
    h, hk = HEADS[heads]
    sq, sk = _seqlens(s)
    batch = max(1, 32768 // sq)  # ~32K query tokens per call: fills the GPU at every length
    q = torch.randn(batch, sq, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(batch, sk, hk, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, sk, hk, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    return batch, q, k, v, compress(k, kb, seed=1), compress(v, vb, seed=2)


def run(configs, ablate: bool, reps: int):
    from flash_attn.cute import flash_attn_func as fa4

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kb, vb, d, s, causal, heads in configs:
        batch, q, k, v, kp, vp = _inputs(kb, vb, d, s, heads, gen)
        flops = attention_flops(batch, HEADS[heads][0], *_seqlens(s), d, causal)
        q_rot = rotate_rounded(q, kp.seed)
        kern = lambda ab=None, x=q_rot, rot="none": packed_attention(
            x, kp, vp, softmax_scale=d ** -0.5, causal=causal, window_size=(None, None), return_lse=False,
            rotation=rot, _ablate=ab)
        # kernels: GPU time of back-to-back calls (time_gpu); one eager call each (time_cuda)
        # left the GPU idle between calls and moved the rotation column by +-10 points run to run.
        # ours and the kernel alone (the rotation column) alternate, 3 rounds, best median each.
        t = {"fa4": time_gpu(lambda: fa4(q, k, v, causal=causal), reps=reps)}
        for _ in range(3):
            for name, fn in (("ours", lambda: kern(x=q, rot="fused")), ("kernel", kern)):
                t[name] = min(t.get(name, float("inf")), time_gpu(fn, reps=reps))
        t.update({
            "ours_e2e": time_cuda(lambda: flash_attn_func(q, kp, vp, causal=causal, backend="inline"), reps=reps),
            "decomp": time_cuda(lambda: flash_attn_func(q, kp, vp, causal=causal, backend="decompress"), reps=reps),
            # R_k q and R_v^T o as two bf16 GEMMs (the unfused alternative)
            "rot": time_gpu(lambda: (rotate_rounded(q, kp.seed), unrotate_rounded(q_rot, vp.seed)), reps=reps),
        })
        if ablate:
            for ab in ("no_copy", "no_dequant"):
                t[ab] = time_gpu(lambda: kern(ab), reps=reps)
        row = dict(kb=kb, vb=vb, d=d, s=s, causal=causal, heads=heads, batch=batch,
                   **{f"tf_{n}": flops / (ms * 1e9) for n, ms in t.items()}, **{f"ms_{n}": ms for n, ms in t.items()})
        rows.append(row)
        print(_fmt(row, ablate), flush=True)
        q = k = v = kp = vp = q_rot = None  # free this problem before the next (not del: the lambdas name them)
    return rows


SCHEDULER_CONFIGS = [(128, 1024, True, "gqa8"), (128, 1024, True, "mha"), (128, 1024, True, "gqa2"),
                     (128, 1024, True, "gqa3"), (64, 1024, True, "mha"), (128, 4096, True, "mha"),
                     (128, 1024, False, "gqa8"), (128, 2048, True, "gqa8"), (128, 4096, True, "gqa8"),
                     (64, 1024, True, "gqa8"), (64, 4096, True, "gqa8"), (128, 4096, False, "gqa8"),
                     (128, 8192, True, "gqa8")]
SCHEDULER_HEADER = ("| hd | seqlen | causal | heads | batch | one tile a CTA ms | persistent ms | persistent speedup "
                    "| rotation fused: + (one tile) | rotation fused: + (persistent) | outputs equal |")


def run_scheduler(reps: int):
    """K4V4 (GQA 8:1, 2:1, 3:1, MHA), ours with the fused rotation: FA4's one tile a CTA against the
    persistent scheduler (``fa4_tq/kernels/scheduler.py``), each also as the kernel alone (``rotation="none"``),
    alternating, 3 rounds, best median; outputs and LSE compared bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for d, s, causal, heads in SCHEDULER_CONFIGS:
        batch, q, _, _, kp, vp = _inputs(4, 4, d, s, heads, gen)
        call = lambda per, rot: packed_attention(q, kp, vp, softmax_scale=d ** -0.5, causal=causal,
                                                 window_size=(None, None), rotation=rot, _persistent=per)
        equal = all(torch.equal(a, b) for rot in ("fused", "none")
                    for a, b in zip(call(False, rot), call(True, rot)))
        t = {}
        for _ in range(3):
            for per, rot in itertools.product((False, True), ("fused", "none")):
                t[per, rot] = min(t.get((per, rot), float("inf")), time_gpu(lambda: call(per, rot), reps=reps))
        h, hk = HEADS[heads]
        line = (f"| {d} | {s} | {'yes' if causal else 'no'} | {h}/{hk} | {batch} "
                f"| {t[False, 'fused']:.3f} | {t[True, 'fused']:.3f} | {t[False, 'fused'] / t[True, 'fused']:.3f}x "
                f"| {100 * (t[False, 'fused'] / t[False, 'none'] - 1):.1f}% "
                f"| {100 * (t[True, 'fused'] / t[True, 'none'] - 1):.1f}% | {equal} |")
        rows.append(line)
        print(line, flush=True)
        q = kp = vp = None
    return rows


HEADER = ("| K/V bits | hd | seqlen | causal | heads | FA4 bf16 TFLOP/s | ours TFLOP/s | ours/FA4 "
          "| ours e2e ms | decompress+FA4 ms | e2e speedup | rotation fused: + | rotation as GEMMs: + |")


def _fmt(r, ablate):
    sq, sk = _seqlens(r["s"])
    line = (f"| K{r['kb']}V{r['vb']} | {r['d']} | {sq if sq == sk else f'{sq} on {sk}'} | {'yes' if r['causal'] else 'no'} | {r['heads']} "
            f"| {r['tf_fa4']:.0f} | {r['tf_ours']:.0f} | {r['tf_ours'] / r['tf_fa4']:.3f} "
            f"| {r['ms_ours_e2e']:.3f} | {r['ms_decomp']:.3f} | {r['ms_decomp'] / r['ms_ours_e2e']:.2f}x "
            f"| {100 * (r['ms_ours'] - r['ms_kernel']) / r['ms_kernel']:.1f}% "
            f"| {100 * r['ms_rot'] / r['ms_kernel']:.1f}% |")
    if ablate:
        line += f" {r['tf_no_copy']:.0f} | {r['tf_no_dequant']:.0f} |"
    return line


def main(argv=None):
    ap = bench_parser(__doc__, 30, os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--full", action="store_true", help="the whole matrix (long)")
    ap.add_argument("--quick", action="store_true", help="only every bit pair at hd128 s8K causal GQA 8:1")
    ap.add_argument("--ablate", action="store_true", help="also time kernel variants without a load stage")
    ap.add_argument("--rotation", action="store_true",
                    help="only K4V4 GQA 8:1 at seqlen 1K/4K and 1K queries on 16K keys (rotation cost)")
    ap.add_argument("--scheduler", action="store_true", help="only persistent vs one tile a CTA (SM90)")
    args = ap.parse_args(argv)
    gpu = require_gpu("bench_prefill")
    if args.scheduler:
        if torch.cuda.get_device_capability()[0] != 9:
            ap.error("--scheduler compares the SM90 kernel's tile schedulers")
        print(SCHEDULER_HEADER)
        rows = run_scheduler(args.reps)
        write_results(args.out_dir, "prefill-scheduler", "Prefill tile scheduler",
                      f"`python perf/bench_prefill.py --scheduler` on {gpu} (K4V4, heads as q/kv, ~32K query tokens "
                      f"per call; median of {args.reps} timings of 10 back-to-back calls, best of 3 "
                      f"alternating rounds)", SCHEDULER_HEADER, rows)
        return
    if args.ablate and torch.cuda.get_device_capability()[0] != 9:
        ap.error("--ablate times variants of the SM90 kernel only")
    # SM 10.x has no fused rotation (fa4_tq/kernels/sm100.py): "ours" there rotates with the GEMMs
    rot_note = "" if torch.cuda.get_device_capability()[0] == 9 else (
        "; on this GPU the kernel has no fused rotation: the 'rotation fused' column is the GEMM path")
    head = HEADER + (" no-copy TFLOP/s | no-dequant TFLOP/s |" if args.ablate else "")
    print(head)
    rows = run(_configs(args.full, args.quick, args.rotation), args.ablate, args.reps)
    flags = "".join(f" --{n}" for n in ("full", "quick", "ablate", "rotation") if getattr(args, n))
    write_results(args.out_dir, "prefill", "Prefill",
                  f"`python perf/bench_prefill.py{flags}` on {gpu} (median of {args.reps} CUDA-event timings, the "
                  f"kernels' of 10 back-to-back calls each, ours and the kernel alone best of 3 alternating rounds; "
                  f"~32K query tokens per call; GQA 8:1 = 32/4 heads, MHA = 32/32{rot_note})", head,
                  [_fmt(r, args.ablate) for r in rows])


if __name__ == "__main__":
    main()
