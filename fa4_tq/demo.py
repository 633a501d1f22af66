"""``python -m fa4_tq demo``: compress realistic K/V, attend on the packed cache, and show what
the compression buys (error and capacity); on a GPU also the time against FA4 bf16."""

from __future__ import annotations

import argparse
import math

import torch

from . import compress, flash_attn_func
from .benchmark import attention_flops, device_name, time_cuda
from .capacity import H100_80GB_BYTES, LLAMA_31_70B, capacity_rows
from .reference import attention_dense_batched

CONFIGS = [("bf16", None, None), ("K8V8", 8, 8), ("K4V8", 4, 8), ("K4V4", 4, 4), ("K3V3", 3, 3), ("K2V2", 2, 2)]


def realistic_layer(batch, seqlen, heads, kv_heads, d, device, seed=0):
    """Keys with a few heavy channels (x10) and a bias on one of them, as real keys have; values
    with per-channel spreads from a log-normal; Gaussian queries. Scores then have a standard
    deviation of about 3, a peaked but not one-hot softmax, as in trained models."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, seqlen, kv_heads, d, generator=g)
    hot = torch.randperm(d, generator=g)[:4]
    k[..., hot] *= 10.0
    k[..., hot[0]] += 20.0
    v = torch.randn(batch, seqlen, kv_heads, d, generator=g) * torch.exp(0.5 * torch.randn(d, generator=g))
    q = torch.randn(batch, seqlen, heads, d, generator=g)
    return (t.to(device) for t in (q, k, v))


def _exact(q, k, v, causal):
    return attention_dense_batched(q, k, v, causal=causal)[0]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def accuracy_table(seqlen, heads, kv_heads, d, device):
    q, k, v = realistic_layer(1, seqlen, heads, kv_heads, d, device)
    exact = _exact(q, k, v, causal=True)
    qb = q.to(torch.bfloat16)
    rows = []
    for label, kb, vb in CONFIGS:
        if kb is None:
            out = _exact(qb.float(), k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float(), True)
            rows.append((label, 2 * d, 1.0, float("nan"), float("nan"), _rel(out.to(torch.bfloat16), exact)))
            continue
        kp, vp = compress(k, kb, seed=0), compress(v, vb, seed=1)
        out, _ = flash_attn_func(qb, kp, vp, causal=True)
        per_tok = (kp.nbytes + vp.nbytes) / (2 * seqlen * kv_heads)
        rows.append((label, per_tok, 2 * d / per_tok, _rel(kp.decompress(), k), _rel(vp.decompress(), v),
                     _rel(out, exact)))
    return rows


def gpu_timing(seqlen, heads, kv_heads, d):
    from flash_attn.cute import flash_attn_func as fa4

    q, k, v = realistic_layer(1, seqlen, heads, kv_heads, d, "cuda", seed=1)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    kp, vp = compress(k, 4, seed=0), compress(v, 4, seed=1)
    t_fa4 = time_cuda(lambda: fa4(qb, kb, vb, causal=True))
    t_dec = time_cuda(lambda: flash_attn_func(qb, kp, vp, causal=True, backend="decompress"))
    flops = attention_flops(1, heads, seqlen, seqlen, d, True)
    return [("FA4 bf16", t_fa4, flops / t_fa4 / 1e9), ("decompress + FA4 (K4V4)", t_dec, flops / t_dec / 1e9)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fa4_tq demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256, 512))
    ap.add_argument("--context", type=int, default=4096, help="session length for the capacity table")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"fa4-tq demo on {device_name()}: one layer, seqlen {args.seqlen}, {args.heads}/{args.kv_heads} "
          f"heads, head_dim {args.head_dim}, causal; keys with 4 outlier channels (x10) and a bias")
    print("\nK/V compression and attention error (relative L2 vs exact float64 attention on the original K/V)")
    print(f"{'config':6} {'B/token/head':>12} {'vs bf16':>8} {'K rel err':>10} {'V rel err':>10} {'attn rel err':>13}")
    for label, per_tok, ratio, ek, ev, ea in accuracy_table(args.seqlen, args.heads, args.kv_heads, args.head_dim, device):
        fmt = lambda x: "-" if math.isnan(x) else f"{x:.4f}"
        print(f"{label:6} {per_tok:12.1f} {ratio:7.2f}x {fmt(ek):>10} {fmt(ev):>10} {ea:13.4f}")

    spec = LLAMA_31_70B
    fp8_weights = spec.params * 1.0
    budget = 0.90 * H100_80GB_BYTES - fp8_weights  # vLLM's default gpu_memory_utilization=0.9
    seed_budget = 45e9  # the seed article's assumption ("35 GB of weights, ~45 GB for KV")
    print(f"\nKV capacity: {spec.name} ({spec.layers} layers, {spec.kv_heads} KV heads, d={spec.head_dim}), "
          f"sessions of {args.context} tokens")
    print(f"  (a) FP8 weights = {fp8_weights / 1e9:.1f} GB on an 80 GB H100 ({H100_80GB_BYTES / 1e9:.1f} GB), 90% usable "
          f"-> KV budget {budget / 1e9:.1f} GB")
    print(f"  (b) the seed article's budget of {seed_budget / 1e9:.0f} GB (its 35 GB of weights is ~4-bit, not FP8)")
    print(f"{'config':6} {'KiB/token':>10} {'vs bf16':>8} {'(a) tokens':>11} {'(a) sessions':>13} {'(b) tokens':>11} {'(b) sessions':>13}")
    rows_a = capacity_rows(spec, budget, args.context, CONFIGS)
    rows_b = capacity_rows(spec, seed_budget, args.context, CONFIGS)
    for (label, per_tok, ratio, ta, sa), (_, _, _, tb, sb) in zip(rows_a, rows_b):
        print(f"{label:6} {per_tok / 1024:10.1f} {ratio:7.2f}x {ta:11,d} {sa:13.1f} {tb:11,d} {sb:13.1f}")

    if device == "cuda":
        n = max(args.seqlen, 8192)
        print(f"\nGPU time, one causal layer at seqlen {n} (median of 30, CUDA events) on {device_name()}")
        rows = gpu_timing(n, args.heads, args.kv_heads, args.head_dim)
        base = rows[0][1]
        for label, ms, tflops in rows:
            print(f"{label:26} {ms:8.3f} ms {tflops:7.1f} TFLOP/s {base / ms:6.2f}x of FA4 bf16 speed")
    else:
        print("\n(no GPU here: the attention above ran the float32 reference; timings need CUDA)")
    return 0
