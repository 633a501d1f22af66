"""A/B of the decode kernel's split combine in one run: the kernel merging its own splits
(``fa4_tq.decode.DECODE_COMBINE_IN_KERNEL = True``: the last CTA of each row group, one launch a
call) against float32 partials merged by ``kernels/combine.py`` (the default: two launches).

Per shape (64 query heads, 8 KV heads, head_dim 128, pages of 128, full contexts, the default
split count): both ways run once on the same inputs and their outputs and LSE are compared bit
for bit (they share the merge code, so they must be equal); then each is timed in ``--rounds``
alternating rounds, ``time_gpu`` (GPU time, calls queued back to back) and ``time_host`` (host
time a call), and the medians of the rounds are printed with the device name. Correctness
against the reference is tests/test_gpu_decode.py's job, not this script's.

    python scripts/ab_decode_combine.py            # the default shapes
    python scripts/ab_decode_combine.py --shapes 4,4,1,32768,1 --rounds 5
"""

from __future__ import annotations

import argparse

import torch

SHAPES = (  # (K bits, V bits, batch, context, seqlen_q)
    (4, 4, 1, 32768, 1), (2, 2, 1, 32768, 1), (4, 4, 1, 131072, 1), (4, 4, 8, 16384, 1), (4, 4, 8, 32768, 1),
    (4, 3, 8, 32768, 1), (2, 2, 8, 32768, 1), (4, 4, 8, 32768, 4), (4, 4, 32, 16384, 1),
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


def ab_row(kb: int, vb: int, batch: int, ctx: int, seqlen_q: int, gen, rounds: int, reps: int) -> str:
    """One shape both ways: the table row."""
    import fa4_tq.decode as dec
    from fa4_tq import PagedKVCache, flash_attn_with_kvcache
    from fa4_tq.benchmark import time_gpu, time_host

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
    splits = dec.choose_decode_splits(q, *layer, table)

    def call(in_kernel: bool):
        dec.DECODE_COMBINE_IN_KERNEL = in_kernel
        return flash_attn_with_kvcache(q, layer, table, used, check_indices=False, return_lse=True)

    (o_old, l_old), (o_new, l_new) = call(False), call(True)
    same = torch.equal(o_old, o_new) and torch.equal(l_old, l_new)
    times = {False: ([], []), True: ([], [])}
    for _ in range(rounds):
        for in_kernel in (False, True):
            times[in_kernel][0].append(time_gpu(lambda: call(in_kernel), reps=reps) * 1e3)
            times[in_kernel][1].append(time_host(lambda: call(in_kernel), reps=reps) * 1e3)
    med = {k: [sorted(t)[len(t) // 2] for t in v] for k, v in times.items()}
    return (f"| K{kb}V{vb} | {batch} | {ctx} | {seqlen_q} | {splits} | {med[False][0]:.1f} | {med[True][0]:.1f} | "
            f"{med[False][0] / med[True][0]:.3f}x | {med[False][1]:.1f} | {med[True][1]:.1f} | "
            f"{med[False][1] / med[True][1]:.3f}x | {'yes' if same else 'NO'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)

    import fa4_tq.decode as dec

    print(torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes:
        rows.append(ab_row(*shape, gen, args.rounds, args.reps))
        print(rows[-1], flush=True)
    dec.DECODE_COMBINE_IN_KERNEL = False
    print("| K/V | batch | context | q_len | splits | GPU us, combine kernel | in kernel | | "
          "host us, combine kernel | in kernel | | bit-equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
