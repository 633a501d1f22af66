"""A/B of the decode kernel (``fa4_tq/kernels/decode.py``) in one run: the default against
variants with switches set, on the same inputs, through ``fa4_tq.flash_attn_with_kvcache``.

A variant is ``--set "label:attr=value[,attr=value]"`` (Python literals): ``PackedDecode`` class
attributes (``paired_2bit_lookups``, ``fast_page_divmod``, ...), ``combine_in_kernel`` for
``fa4_tq.decode.DECODE_COMBINE_IN_KERNEL`` (the kernel merging its own splits, one launch), and
``head_major_pages=True``: the same codes stored with each page's rows head-major
(``[kv_heads, page_size, bytes]``, seen through a strided view the kernel reads unchanged), so a
CTA reads its head's rows contiguously rather than 64 of every 512 bytes (K4V4); docs/FORMAT.md
does not allow that layout, so this variant calls the kernel past the input checks (its host
time is not comparable). It was level on the kernel of 2026-11-23 (perf/results/decode-*.md);
the kernel is faster now.
Per shape (64 query heads, 8 KV heads, head_dim 128, pages of 128, full contexts, the default
split count) every variant runs once and its output and LSE are compared bit for bit with the
default's (the switches change instructions, not values: "yes" is expected); then each is timed
in ``--rounds`` alternating rounds, ``time_gpu`` (GPU time, calls queued back to back) and
``time_host`` (host time a call), medians of the rounds. Correctness against the reference is
tests/test_gpu_decode.py's job, not this script's.

    python scripts/ab_decode.py --set "in-kernel combine:combine_in_kernel=True" \\
        --set "paired:paired_2bit_lookups=True" --set "divmod:fast_page_divmod=True"
    python scripts/ab_decode.py --shapes "2,2,8,32768,1;4,4,1,32768,1" --set "all:paired_2bit_lookups=True,\\
fast_page_divmod=True,combine_in_kernel=True"
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_mla import parse_switches  # noqa: E402  (the same "label:attr=value" syntax)

SHAPES = (  # (K bits, V bits, batch, context, seqlen_q)
    (4, 4, 1, 32768, 1), (2, 2, 1, 32768, 1), (4, 4, 8, 16384, 1), (4, 4, 8, 32768, 1), (4, 3, 8, 32768, 1),
    (2, 2, 8, 32768, 1), (2, 4, 8, 32768, 1), (4, 2, 8, 32768, 1), (8, 2, 8, 32768, 1), (4, 4, 8, 32768, 4),
    (4, 4, 32, 16384, 1),
)
HEADS, KV_HEADS, HEAD_DIM, PAGE = 64, 8, 128, 128


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    """``"4,4,1,32768,1;2,2,8,16384,1"`` -> [(k_bits, v_bits, batch, context, seqlen_q), ...]."""
    out = []
    for item in spec.split(";"):
        fields = tuple(int(x) for x in item.split(","))
        if len(fields) != 5:
            raise ValueError(f"--shapes wants 'k_bits,v_bits,batch,context,seqlen_q[;...]', got {item!r}")
        out.append(fields)
    return out


def variant_call(switches: dict):
    """``call(q, layer, table, used)`` running ``flash_attn_with_kvcache`` with ``switches`` set
    (a ``PackedDecode`` subclass for the class attributes; the module flag for the combine)."""
    import fa4_tq.decode as dec
    import fa4_tq.kernels.decode as dk
    from fa4_tq import flash_attn_with_kvcache
    from fa4_tq.interface import _Problem

    attrs = {k: v for k, v in switches.items() if k not in ("combine_in_kernel", "head_major_pages")}
    for name in attrs:
        if not hasattr(dk.PackedDecode, name):
            raise ValueError(f"--set: PackedDecode has no switch {name!r}")
    kernel = type("PackedDecode", (dk.PackedDecode,), attrs) if attrs else dk.PackedDecode
    base = dk.PackedDecode

    def call(q, layer, table, used):
        dk.PackedDecode, dec.DECODE_COMBINE_IN_KERNEL = kernel, switches.get("combine_in_kernel", False)
        try:
            if switches.get("head_major_pages"):
                return dec._run_decode_kernel(_Problem(q, *head_major(layer), q.shape[0], q.shape[-1] ** -0.5, True,
                                                       (None, None), seqused_k=used, page_table=table), None, True)
            return flash_attn_with_kvcache(q, layer, table, used, check_indices=False, return_lse=True)
        finally:
            dk.PackedDecode, dec.DECODE_COMBINE_IN_KERNEL = base, False
    return call


_head_major: dict = {}


def head_major(layer):
    """``layer``'s K and V with each page's data rows stored head-major, as a view of the usual
    shape ``[pages, page_size, kv_heads, bytes]`` (made once per layer)."""
    import dataclasses

    key = tuple(p.data.data_ptr() for p in layer)
    if key not in _head_major:
        _head_major.clear()
        _head_major[key] = tuple(
            dataclasses.replace(p, data=p.data.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)) for p in layer)
    return _head_major[key]


def ab_rows(shape, variants: dict, gen, rounds: int, reps: int) -> list[str]:
    """One shape, every variant: its table rows."""
    import fa4_tq.decode as dec
    from fa4_tq import PagedKVCache
    from fa4_tq.benchmark import time_gpu, time_host
    from fa4_tq.interface import _Problem

    kb, vb, batch, ctx, seqlen_q = shape
    npages = batch * ctx // PAGE
    cache = PagedKVCache(1, npages, PAGE, KV_HEADS, HEAD_DIM, k_bits=kb, v_bits=vb, device="cuda")
    slots = torch.arange(npages * PAGE, device="cuda", dtype=torch.int32)
    for s in range(0, slots.numel(), 1 << 18):
        n = min(1 << 18, slots.numel() - s)
        kv = torch.randn(2, n, KV_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        cache.write(0, kv[0], kv[1], slots[s:s + n], check_indices=False)
    table = torch.randperm(npages, device="cuda", generator=gen).int().view(batch, -1)
    used = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    layer = cache.layer(0)
    q = torch.randn(batch, seqlen_q, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    if not dec.decode_kernel_runs(_Problem(q, *layer, batch, 1.0, True, (None, None))):
        raise ValueError(f"K{kb}V{vb} seqlen_q {seqlen_q}: the decode kernel does not run this shape")
    splits = dec.choose_decode_splits(q, *layer, table)
    calls = {label: variant_call(sw) for label, sw in variants.items()}
    outs = {label: call(q, layer, table, used) for label, call in calls.items()}
    o0, l0 = outs["main"]
    times = {label: ([], []) for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            times[label][0].append(time_gpu(lambda: call(q, layer, table, used), reps=reps) * 1e3)
            times[label][1].append(time_host(lambda: call(q, layer, table, used), reps=reps) * 1e3)
    med = {label: [sorted(t)[len(t) // 2] for t in v] for label, v in times.items()}
    rows = []
    for label in calls:
        same = torch.equal(outs[label][0], o0) and torch.equal(outs[label][1], l0)
        rows.append(f"| K{kb}V{vb} | {batch} | {ctx} | {seqlen_q} | {splits} | {label} | {med[label][0]:.1f} | "
                    f"{med['main'][0] / med[label][0]:.3f}x | {med[label][1]:.1f} | "
                    f"{med['main'][1] / med[label][1]:.3f}x | {'yes' if same else 'NO'} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", type=parse_switches, default=[], metavar="LABEL:ATTR=VALUE,...")
    ap.add_argument("--shapes", type=parse_shapes, default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    variants = {"main": {}, **dict(args.set)}
    if len(variants) != len(args.set) + 1:
        raise ValueError("--set labels must be distinct and not 'main'")

    print(torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes:
        rows += ab_rows(shape, variants, gen, args.rounds, args.reps)
        print("\n".join(rows[-len(variants):]), flush=True)
    print("| K/V | batch | context | q_len | splits | variant | GPU us | vs main | host us | vs main | bit-equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
