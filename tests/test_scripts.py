"""The B200 script (scripts/bench_b200.sh) cannot run here, so check on the CPU what can be checked:
it parses, every perf script it names exists, and each accepts the flags the script passes it.
(It once called ``perf/bench_prefill``, a file that does not exist.)"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_b200.sh")


def _benchmarks() -> list[str]:
    text = open(SCRIPT).read()
    loop = re.search(r"^for name in ([\w ]+); do$", text, re.M)
    assert loop, "bench_b200.sh: the loop over the perf scripts is not where this test looks"
    return loop.group(1).split()


def _module(folder: str, name: str):
    """``<folder>/<name>.py`` as a module (perf/ and scripts/ are not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_prefill():
    return _module("perf", "bench_prefill")


def test_b200_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_b200_script_runs_every_gpu_benchmark():
    gpu_benchmarks = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "perf")) if f.startswith("bench_"))
    assert sorted(_benchmarks()) == gpu_benchmarks


@pytest.mark.parametrize("name", _benchmarks())
def test_each_benchmark_takes_the_flags_the_script_passes(name):
    path = os.path.join(ROOT, "perf", f"{name}.py")
    assert os.path.exists(path), path
    res = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    no_quick = re.search(rf'\[\[ \$name == {name} \]\] && args=""', open(SCRIPT).read())
    if not no_quick:  # the script passes --quick to it
        assert "--quick" in res.stdout, f"bench_b200.sh passes --quick to {name}.py, which does not take it"


def test_prefill_matrix_keeps_its_head_layouts():
    """``--scheduler``'s extra layouts (GQA 2:1, 3:1) must not leak into the main and ``--full``
    matrices, which iterate over layouts (they once iterated over every entry of ``HEADS``)."""
    bench = _bench_prefill()
    for full in (False, True):
        assert {c[-1] for c in bench._configs(full)} == set(bench.LAYOUTS) == {"gqa8", "mha"}
    assert {c[-1] for c in bench.SCHEDULER_CONFIGS} == set(bench.HEADS)


def test_rotation_matrix_has_chunked_prefill_rows():
    """``--rotation`` times 1K query chunks on 16K cached keys (the serving case) beside the square
    shapes; its table names them "1024 on 16384"."""
    bench = _bench_prefill()
    chunked = [c for c in bench._configs(False, rotation=True) if isinstance(c[3], tuple)]
    assert {c[2] for c in chunked} == {64, 128} and all(c[3] == (1024, 16384) and c[4] for c in chunked)
    row = dict(kb=4, vb=4, d=128, s=(1024, 16384), causal=True, heads="gqa8", batch=32,
               **{f"tf_{n}": 1.0 for n in ("fa4", "ours")},
               **{f"ms_{n}": 1.0 for n in ("ours_e2e", "decomp", "ours", "kernel", "rot")})
    assert "| 1024 on 16384 |" in bench._fmt(row, ablate=False)


def test_attention_flops_counts_the_pairs_a_causal_mask_keeps():
    """Causal masks align the queries to the last keys (FA4's convention): a chunk of sq queries on
    sk keys computes ~sq*sk - sq^2/2 pairs, not half of sq*sk. Against a brute-force count."""
    import torch

    from fa4_tq.benchmark import attention_flops

    for sq, sk in ((64, 64), (16, 256), (256, 16), (1, 100)):
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        pairs = int((j <= i + sk - sq).sum())
        got = attention_flops(1, 1, sq, sk, 1, True) / 4
        assert abs(got - pairs) <= min(sq, sk) / 2 + 1, (sq, sk, got, pairs)  # the diagonal, half counted
        assert attention_flops(2, 3, sq, sk, 5, False) == 4 * 2 * 3 * 5 * sq * sk


def test_ab_mla_parses_its_variants():
    """``scripts/ab_mla.py --set`` makes a variant from class attributes given as Python literals;
    a malformed one is refused before any GPU time is spent."""
    ab = _module("scripts", "ab_mla")
    label, attrs = ab.parse_switches("16 rows:wg2_rows=16,pv_converts=True")
    assert (label, attrs) == ("16 rows", {"wg2_rows": 16, "pv_converts": True})
    assert ab.parse_switches("ring:ring=(32, 4)") == ("ring", {"ring": (32, 4)})
    assert ab.parse_shapes("128x8192,16x1024") == [(128, 8192), (16, 1024)]
    for bad in ("wg2_rows=16", "label:", "label:wg2_rows", "label:1x=2", "label:a=b", "label:a=1,2"):
        with pytest.raises(ValueError):
            ab.parse_switches(bad)
    script = os.path.join(ROOT, "scripts", "ab_mla.py")
    res = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "--old" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([sys.executable, script, "--set", "typo:codes_frist=False"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "no attribute codes_frist" in res.stderr, res.stderr[-2000:]
