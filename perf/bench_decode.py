"""Decode and verification on a paged cache, side by side in one run (any SM90 GPU):
``fa4_tq.flash_attn_with_kvcache`` on the packed cache, FA4 bf16 on a bf16 paged cache
(``flash_attn.cute.flash_attn_varlen_func``), torch SDPA bf16 on contiguous K/V, and
"decompress + FA4" (decode the pages the table names to bf16, then FA4), plus a device-to-device
copy of a large buffer (the bandwidth ceiling).

GQA 8:1 (64 query heads, 8 KV heads), head_dim 128, pages of 128 tokens, every sequence at the
full context. "GB/s" counts the bytes each kernel must read: the packed rows and scales of K and
V for ours, bf16 K and V for the baselines (q and o are negligible). Times are GPU time per call
with launches queued ahead (``time_gpu``), medians. "vs best bf16" is the faster of FA4 and SDPA
divided by ours. FA4 has no split-KV on SM90 (its interface asserts so), SDPA picks its own
backend. "kernel" says which of our kernels ran: "decode" (kernels/decode.py, dense calls of <= 32
query rows per KV head at 2/4/8 bits, and 3-bit at head_dim 128) or "prefill" (the packed-KV FA4
subclass over split launches); where it is "decode", "prefill-kernel path" times the path it
replaced on the same call. Writes perf/results/decode-<gpu>.md.

Skip-softmax has its own table: on i.i.d. random data no block is skippable, so it runs on
``fa4_tq.skip_softmax.peaked_attention_inputs`` (LLM-like peaked attention: recent tokens and a
sink dominate; synthetic, not a model's) at K4V4, dense and skipping kernels side by side, at the
documented default ``SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR`` and at 10x it. It reports the share of
KV blocks skipped, the speedup over the dense kernel on the same data, the relative error of the
output against the dense kernel, and the largest mass bound ``eps`` of any row. "skip host us" is
the host's time per skipping call (``time_host``: Python, the small torch ops of the split and the
launches, with the GPU kept busy): where it exceeds "skip us", an eager caller waits on the host;
over ~1000 us it would also outrun the ~10 ms sleep that ``time_gpu`` queues 10 calls behind.

    python perf/bench_decode.py [--quick] [--reps N] [--out-dir D]
"""

from __future__ import annotations

import os
from itertools import product

import torch
import torch.nn.functional as F

from fa4_tq import PagedKVCache, flash_attn_with_kvcache
from fa4_tq.benchmark import bench_parser, copy_bandwidth, require_gpu, time_gpu, time_host, write_results
from fa4_tq.codec import row_bytes
from fa4_tq.decode import SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR
from fa4_tq.skip_softmax import peaked_attention_inputs

HEADS, KV_HEADS, D, PAGE = 64, 8, 128, 128
BATCHES = (1, 8, 32, 128)
CONTEXTS = (4096, 16384, 32768, 131072)
MAX_TOKENS = 1 << 21  # batch x context cap: the bf16 baselines hold ~3 copies of the cache


class Setup:
    """One (batch, context) shape: packed caches per bit pair on demand, bf16 pages, contiguous
    bf16 K/V for SDPA. Contents are random (timing does not depend on them)."""

    def __init__(self, batch: int, context: int, gen: torch.Generator):
        self.batch, self.context, self.gen = batch, context, gen
        self.pages_per_seq = context // PAGE
        self.num_pages = batch * self.pages_per_seq
        perm = torch.randperm(self.num_pages, device="cuda", generator=gen).to(torch.int32)
        self.table = perm.view(batch, self.pages_per_seq)
        self.used = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self._packed = {}
        self.kv_bf16 = torch.randn(2, self.num_pages, PAGE, KV_HEADS, D, device="cuda", generator=gen,
                                   dtype=torch.bfloat16)

    def packed(self, kb: int, vb: int):
        if (kb, vb) not in self._packed:
            self._packed.clear()  # one packed cache alive at a time
            cache = PagedKVCache(1, self.num_pages, PAGE, KV_HEADS, D, k_bits=kb, v_bits=vb, device="cuda")
            slots = torch.arange(self.num_pages * PAGE, device="cuda", dtype=torch.int32)
            step = 1 << 18
            for s in range(0, slots.numel(), step):  # chunks: the bf16 input stays small
                sl = slots[s:s + step]
                kv = self.kv_bf16.view(2, -1, KV_HEADS, D)[:, s:s + step]
                cache.write(0, kv[0], kv[1], sl, check_indices=False)
            self._packed[(kb, vb)] = cache.layer(0)
        return self._packed[(kb, vb)]

    def q(self, seqlen_q: int) -> torch.Tensor:
        return torch.randn(self.batch, seqlen_q, HEADS, D, device="cuda", generator=self.gen, dtype=torch.bfloat16)


def packed_bytes(tokens: int, kb: int, vb: int) -> int:
    return tokens * KV_HEADS * (row_bytes(D, kb) + row_bytes(D, vb) + 2 * 2)  # fp16 scales


def bf16_bytes(tokens: int) -> int:
    return tokens * KV_HEADS * D * 2 * 2


def time_baselines(s: Setup, q: torch.Tensor, reps: int) -> dict:
    from flash_attn.cute import flash_attn_varlen_func as fa4_varlen

    causal = q.shape[1] > 1
    kp, vp = s.kv_bf16[0], s.kv_bf16[1]
    fa4 = time_gpu(lambda: fa4_varlen(q, kp, vp, seqused_k=s.used, page_table=s.table, causal=causal), reps=reps)
    # SDPA on contiguous [batch, kv_heads, context, d] K/V (what a non-paged engine would hold)
    k_c = kp.view(s.batch, s.context, KV_HEADS, D).transpose(1, 2)
    v_c = vp.view(s.batch, s.context, KV_HEADS, D).transpose(1, 2)
    qt = q.transpose(1, 2)
    mask = None
    if causal:  # bottom-right: query i sees keys < context - seqlen_q + i + 1
        sq = q.shape[1]
        cols = torch.arange(s.context, device="cuda")
        mask = cols.view(1, -1) <= (s.context - sq + torch.arange(sq, device="cuda")).view(-1, 1)
    sdpa = time_gpu(lambda: F.scaled_dot_product_attention(qt, k_c, v_c, attn_mask=mask, enable_gqa=True), reps=reps)
    return dict(fa4=fa4, sdpa=sdpa)


def _on_sm90() -> bool:
    """Skip-softmax and the tile ablation exist in the SM90 kernel only."""
    from fa4_tq.kernels.launch import device_arch

    return device_arch() // 10 == 9


def time_ours(s: Setup, q: torch.Tensor, kb: int, vb: int, reps: int, decompress: bool) -> dict:
    from fa4_tq.decode import _run_split, choose_decode_splits, choose_num_splits, decode_kernel_runs
    from fa4_tq.interface import _Problem

    cache = s.packed(kb, vb)
    run = lambda backend: flash_attn_with_kvcache(q, cache, s.table, s.used, check_indices=False, backend=backend)
    prob = _Problem(q, *cache, s.batch, D ** -0.5, q.shape[1] > 1, (None, None), seqused_k=s.used, page_table=s.table)
    kernel = decode_kernel_runs(prob)
    splits = choose_decode_splits(q, *cache, s.table) if kernel else choose_num_splits(q, *cache, s.table)
    r = dict(ours=time_gpu(lambda: run("inline"), reps=reps), splits=splits, kernel="decode" if kernel else "prefill")
    if kernel:  # the path it replaced: the packed-KV prefill kernel over split launches
        r["prefill_path"] = time_gpu(lambda: _run_split(prob, None, False), reps=reps)
    if decompress:
        r["decompress"] = time_gpu(lambda: run("decompress"), reps=max(3, reps // 4))
    return r


HEADER = ("| K/V bits | batch | context | q_len | kernel | splits | ours us | ours GB/s | % of copy | FA4 bf16 us "
          "| SDPA bf16 us | decompress+FA4 us | bf16 GB/s (best) | vs best bf16 | prefill-kernel path us |")


def _fmt(r: dict, copy: float) -> str:
    tokens = r["batch"] * r["context"]
    gbs = packed_bytes(tokens, r["kb"], r["vb"]) / (r["ours"] * 1e6)
    best = min(r["fa4"], r["sdpa"])
    dec = f"{r['decompress'] * 1e3:.0f}" if "decompress" in r else "-"
    prefill = f"{r['prefill_path'] * 1e3:.1f}" if "prefill_path" in r else "-"
    return (f"| K{r['kb']}V{r['vb']} | {r['batch']} | {r['context']} | {r['q_len']} | {r['kernel']} | {r['splits']} "
            f"| {r['ours'] * 1e3:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% | {r['fa4'] * 1e3:.1f} "
            f"| {r['sdpa'] * 1e3:.1f} | {dec} | {bf16_bytes(tokens) / (best * 1e6):.0f} "
            f"| {best / r['ours']:.2f}x | {prefill} |")


def plan(quick: bool):
    """(batch, context, q_len, bit pairs, with decompress) in run order, grouped by shape."""
    pairs_all = list(product((2, 3, 4, 8), repeat=2))
    if quick:
        return [(8, 32768, q_len, [(4, 4)], False) for q_len in (1, 4, 8)] + [
            (32, 16384, q_len, [(4, 4)], False) for q_len in (1, 4, 8)]
    out = [(8, 32768, 1, pairs_all, True)]
    for batch, ctx in product(BATCHES, CONTEXTS):
        if batch * ctx > MAX_TOKENS or (batch, ctx) == (8, 32768):
            continue
        out.append((batch, ctx, 1, [(4, 4), (2, 2)], False))
    for batch, ctx in ((8, 32768), (32, 16384)):
        for q_len in (4, 8):
            out.append((batch, ctx, q_len, [(4, 4)], False))
    return out


SKIP_HEADER = ("| K/V bits | batch | context | q_len | scale factor | splits | dense us | skip us | skip host us "
               "| speedup | blocks skipped | rel err vs dense | max eps |")


def skip_rows(batch: int, context: int, q_lens, reps: int, gen: torch.Generator) -> list[str]:
    """Dense and skipping kernel on one peaked K4V4 cache (module docstring)."""
    from fa4_tq.decode import choose_num_splits

    rows = []
    q_all, raw = peaked_attention_inputs([context] * batch, max(q_lens), HEADS, KV_HEADS, D, generator=gen)
    cache = PagedKVCache(1, batch * context // PAGE, PAGE, KV_HEADS, D, k_bits=4, v_bits=4, device="cuda")
    perm = torch.randperm(batch * context // PAGE, device="cuda", generator=gen).to(torch.int32)
    table = perm.view(batch, context // PAGE)
    used = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    for b, (k, v) in enumerate(raw):
        slots = (table[b].long().view(-1, 1) * PAGE + torch.arange(PAGE, device="cuda")).view(-1)
        cache.write(0, k.to(torch.bfloat16), v.to(torch.bfloat16), slots, check_indices=False)
    del raw
    layer = cache.layer(0)
    for q_len in q_lens:
        # the last q_len queries: the peaked keys sit just before the newest max(q_lens) tokens
        q = q_all[:, -q_len:].to(torch.bfloat16).contiguous()
        run = lambda **kw: flash_attn_with_kvcache(q, layer, table, used, check_indices=False, backend="inline", **kw)
        auto = choose_num_splits(q, *layer, table)
        for splits in (None, 1) if auto > 1 else (None,):  # split chunks vote against their own running max
            dense_out, _ = run(num_splits=splits)
            dense_t = time_gpu(lambda: run(num_splits=splits), reps=reps)
            n_splits = auto if splits is None else splits
            for factor in (SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR, 10 * SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR):
                kw = dict(num_splits=splits, skip_softmax_threshold_scale_factor=factor)
                out, _, st = run(return_skip_stats=True, **kw)
                t = time_gpu(lambda: run(**kw), reps=reps)
                host = time_host(lambda: run(**kw), reps=reps)  # see the module docstring
                err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
                rows.append(f"| K4V4 | {batch} | {context} | {q_len} | {factor:g} | {n_splits} "
                            f"| {dense_t * 1e3:.1f} | {t * 1e3:.1f} | {host * 1e3:.1f} | {dense_t / t:.2f}x "
                            f"| {float(st.skipped.sum() / st.blocks.sum()):.0%} | {err:.1e} | {float(st.eps.max()):.3f} |")
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = bench_parser(__doc__, 20, os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="decode and verification at two shapes, K4V4 only")
    ap.add_argument("--skip-only", action="store_true", help="only the skip-softmax table")
    args = ap.parse_args(argv)
    gpu = require_gpu("bench_decode")
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy:.0f} GB/s")
    if not args.skip_only:
        print(HEADER, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines, setup = [], None
    for batch, ctx, q_len, pairs, decompress in ([] if args.skip_only else plan(args.quick)):
        if setup is None or (setup.batch, setup.context) != (batch, ctx):
            setup = None
            torch.cuda.empty_cache()
            setup = Setup(batch, ctx, gen)
        q = setup.q(q_len)
        base = time_baselines(setup, q, args.reps)
        for kb, vb in pairs:
            r = dict(kb=kb, vb=vb, batch=batch, context=ctx, q_len=q_len, **base,
                     **time_ours(setup, q, kb, vb, args.reps, decompress))
            lines.append(_fmt(r, copy))
            print(lines[-1], flush=True)
    setup = None
    torch.cuda.empty_cache()
    print(SKIP_HEADER, flush=True)
    skip_lines = []
    skip_shapes = ((8, 32768),) if args.quick else ((8, 32768), (32, 16384), (1, 131072))
    if not _on_sm90():
        print("skip-softmax: the kernel has it on SM90 only; no skip-softmax table on this GPU", flush=True)
        skip_shapes = ()
    for batch, ctx in skip_shapes:
        skip_lines += skip_rows(batch, ctx, (1, 4, 8), args.reps, gen)
        torch.cuda.empty_cache()
    if not args.skip_only:
        write_results(args.out_dir, "decode", "Decode and verification",
                      f"`python perf/bench_decode.py{' --quick' if args.quick else ''}` on {gpu} ({HEADS}/{KV_HEADS} "
                      f"heads, head_dim {D}, pages of {PAGE}; medians of {args.reps} timings, see the script's "
                      f"docstring). Device-to-device copy bandwidth measured in the same run: {copy:.0f} GB/s.",
                      HEADER, lines)
    if skip_lines:
        write_results(args.out_dir, "decode-skip-softmax", "Skip-softmax on decode and verification",
                      f"`python perf/bench_decode.py{' --quick' if args.quick else ''}"
                      f"{' --skip-only' if args.skip_only else ''}` on {gpu}: peaked synthetic attention "
                      f"({HEADS}/{KV_HEADS} heads, head_dim {D}, pages of {PAGE}, K4V4), dense and skipping "
                      f"packed-KV kernel on the same cache, medians of {args.reps} timings; see the script's "
                      f"docstring.", SKIP_HEADER, skip_lines)


if __name__ == "__main__":
    main()
