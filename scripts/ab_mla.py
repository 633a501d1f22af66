"""A/B of the SM90 MLA kernel in one run: the working tree's ``mla/sm90.py`` against another version
of the file and/or class-attribute switches of it, on the same inputs.

Each variant runs once on NaN-poisoned outputs (out and LSE compared bit for bit with the first
variant, else the outputs' relative difference is printed; all checked finite), then every
variant is timed in alternating rounds (``time_gpu``: medians of ``--reps`` timings of 10 calls
queued back to back), best round kept. The bf16 latent is timed once per shape for the "vs bf16"
column. Correctness against the reference is tests/test_gpu_mla.py's job, not this script's.
The device's copy of the tree has no git history: write the other version first, e.g.
``git show fe94c77:mla/sm90.py > .scratch/sm90_old.py``.

    python scripts/ab_mla.py --old .scratch/sm90_old.py --set "loads in the conversion:codes_first=False"

It measured the ring and the conversion-cost tables (twenty-fourth session) and the whole-line
code loads table (twenty-fifth) of perf/results/mla-*.md, on an H100.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_switches(spec: str) -> tuple[str, dict]:
    """``"label:attr=value,attr=value"`` -> (label, {attr: value}); values are Python literals
    (tuples included: ``"both:codes_first=False,bf16_tma=False"``)."""
    label, _, body = spec.partition(":")
    try:
        call = ast.parse(f"f({body})", mode="eval").body
        if not label or not body.strip() or call.args or any(k.arg is None for k in call.keywords):
            raise SyntaxError
        return label, {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        raise ValueError(f"--set wants 'label:attr=value[,attr=value]' (Python literals), got {spec!r}") from None


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"128x8192,16x1024"`` -> [(heads, tokens), ...]; tokens a multiple of the page size."""
    out = []
    for item in spec.split(","):
        heads, _, tokens = item.partition("x")
        out.append((int(heads), int(tokens)))
    return out


def load_class(path: str):
    """``FlashMLAForwardSm90`` of another copy of ``mla/sm90.py`` (imported under its own name)."""
    spec = importlib.util.spec_from_file_location("mla._sm90_ab_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FlashMLAForwardSm90


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="another copy of mla/sm90.py: the baseline (first) variant")
    ap.add_argument("--set", action="append", default=[], metavar="LABEL:ATTR=VALUE[,...]",
                    help="a variant: the tree's kernel class with these class attributes (repeatable)")
    ap.add_argument("--shapes", default="128x8192,128x2048,16x8192", help="heads x tokens, comma-separated")
    ap.add_argument("--bits", default="4,2,3", help="packed latent widths, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    switches = [parse_switches(s) for s in args.set]
    shapes = parse_shapes(args.shapes)
    widths = [int(b) for b in args.bits.split(",")]

    sys.path.insert(0, os.path.join(ROOT, "perf"))
    import mla.sm90 as sm90
    from bench_mla import SCALE, causal_flops, problem  # perf/bench_mla.py: the grid's inputs and FLOP count

    from fa4_tq.benchmark import require_gpu, time_gpu

    tree = sm90.FlashMLAForwardSm90
    for label, attrs in switches:
        unknown = [a for a in attrs if not hasattr(tree, a)]
        if unknown:  # a subclass would carry it and change nothing
            sys.exit(f"--set {label}: mla/sm90.py's kernel class has no attribute {', '.join(unknown)}")
    gpu = require_gpu("ab_mla")
    variants = {}
    if args.old:
        variants["old"] = load_class(args.old)
    variants["tree"] = tree
    for label, attrs in switches:
        variants[label] = type(f"FlashMLAForwardSm90_{len(variants)}", (tree,), attrs)
    names = list(variants)

    def use(name):  # mla.launch reads the class at each call (and caches a compile per class)
        sm90.FlashMLAForwardSm90 = variants[name]

    gen = torch.Generator(device="cuda").manual_seed(0)
    header = ("| heads | L | latent | " + " | ".join(f"{n} ms (TFLOP/s, vs bf16)" for n in names) + " | "
              + " | ".join(f"{n} vs {names[0]}" for n in names[1:]) + " | outputs vs the first |")
    lines = []
    for heads, tokens in shapes:
        flops = causal_flops(heads, tokens)
        bf16_ms = None
        for bits in [None] + widths:
            inputs, _, _ = problem(heads, tokens, bits, gen)
            q_nope, q_pe, latent, rope, table, cu, used = inputs
            run_names = ["tree"] if bits is None else names

            def call(out, lse=None):
                from mla.launch import mla_attention

                return mla_attention(q_nope, q_pe, latent, rope, table, cu, used, tokens, softmax_scale=SCALE,
                                     causal=True, return_lse=lse is not None, out=out, lse=lse)

            results = {}
            for name in run_names:
                use(name)
                out = torch.full_like(q_nope, float("nan"))
                lse = torch.full((heads, tokens), float("nan"), device="cuda")
                call(out, lse)
                torch.cuda.synchronize()
                results[name] = (out, lse)
            times = {name: math.inf for name in run_names}
            for _ in range(args.rounds):
                for name in run_names:
                    use(name)
                    out = torch.empty_like(q_nope)
                    times[name] = min(times[name], time_gpu(lambda: call(out), reps=args.reps, warmup=2))
            if bits is None:
                bf16_ms = times["tree"]
                print(f"{heads} heads, {tokens} tokens, bf16 latent: {bf16_ms:.3f} ms, "
                      f"{flops / bf16_ms / 1e9:.0f} TFLOP/s", flush=True)
                continue
            o0, l0 = results[names[0]]
            equal = all(torch.equal(o0, o) and torch.equal(l0, lse) for o, lse in results.values())
            finite = all(bool(torch.isfinite(o).all()) for o, _ in results.values())
            # a variant that sums in another order (other block sizes) differs by roundings only
            diff = max(float((o.float() - o0.float()).norm() / o0.float().norm()) for o, _ in results.values())
            cells = " | ".join(f"{times[n]:.3f} ({flops / times[n] / 1e9:.0f}, {bf16_ms / times[n]:.2f}x)"
                               for n in names)
            ratios = " | ".join(f"{times[names[0]] / times[n]:.3f}x" for n in names[1:])
            same = "bit-equal" if equal else f"rel diff {diff:.1e}"
            lines.append(f"| {heads} | {tokens} | {bits}-bit | {cells} | {ratios} | {same}, finite {finite} |")
            print(lines[-1], flush=True)
            inputs = latent = results = None  # free this cache before the next one is built
            torch.cuda.empty_cache()
    print(f"\n{gpu}; variants: " + "; ".join(
        f"{label}: {attrs}" for label, attrs in switches) + ("" if not args.old else f"; old: {args.old}"))
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
