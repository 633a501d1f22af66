#!/usr/bin/env bash
# Correctness, then the perf/ suite, on a Blackwell B200 (SM 10.x). No B200 was available to
# the project: this script has not been run, and no B200 number in the repository comes from it.
#
# Usage, from the repository root on the B200 machine (FA4 stack installed: pip install -e '.[gpu,test]'):
#   bash scripts/bench_b200.sh [--quick]
# Results go to perf/results/<name>-<device>.md (the device name is in each file); logs to
# ${OUT:-/tmp/fa4-tq-b200}. The tests run first and the benchmarks only if they pass: a number
# from a kernel that fails its tests is not a result.
#
# What runs where: the packed-KV attention kernel (fa4_tq/kernels/sm100.py), the MLA prefill
# (mla/sm100.py) and the cache-write kernel have SM100 builds; "auto" does not pick the unverified
# SM100 kernels, so the benchmarks name them (backend="inline", or mla.launch directly).
# Skip-softmax is SM90-only: bench_decode prints no skip-softmax table there.
set -uo pipefail
quick=""
[[ "${1:-}" == "--quick" ]] && quick="--quick"
out=${OUT:-/tmp/fa4-tq-b200}
mkdir -p "$out"

cap=$(python3 -c "import torch; print(torch.cuda.get_device_capability()[0])" 2>/dev/null || echo none)
if [[ "$cap" != "10" ]]; then
    echo "bench_b200.sh: needs a Blackwell (SM 10.x) GPU, found compute capability major '$cap'" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"

# 1. correctness: the SM100 kernels against the float64 reference (tests/test_gpu_sm100.py: the
#    attention kernel and the MLA prefill), the cache-write kernel and the decompress backend; the
#    SM90 kernel tests skip themselves.
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -30
if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
    echo "bench_b200.sh: tests failed, no benchmark run (see $out/gpu-tests.log)" >&2
    exit 1
fi

# 2. the perf/ suite, each script side by side with its baselines in one run, at its default
#    matrix (--quick: each script's short one). On SM100 bench_prefill's "rotation fused" column is
#    the GEMM path (no fused rotation there; its results file says so). perf/accuracy.py is not
#    run: it is a CPU study of the codec (perplexity, needle), the same on any GPU.
rc=0
for name in bench_prefill bench_decode bench_compress bench_mla; do
    args=$quick
    [[ $name == bench_compress ]] && args=""  # it has no --quick
    echo "== perf/$name.py $args"
    python3 "perf/$name.py" $args 2>&1 | tee "$out/$name.log" | grep -v Warning | tail -40
    [[ ${PIPESTATUS[0]} -ne 0 ]] && { echo "perf/$name.py failed" >&2; rc=1; }
done
exit $rc
