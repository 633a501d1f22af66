"""Timing helpers shared by the demo and perf/: CUDA events, warm-up, median of many runs."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (events around each call)."""
    return _median_event_ms(fn, warmup, reps, calls=1, hold_stream=False)


def time_gpu(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30, calls: int = 10) -> float:
    """Median milliseconds of GPU time per ``fn()`` call, host overhead excluded: a sleep kernel
    holds the stream while the host queues ``calls`` calls between two events, so the GPU runs
    them back to back (as in a CUDA graph or a host that runs ahead). ``time_cuda`` measures a
    single eager call instead, host work included when the kernel is shorter than it."""
    return _median_event_ms(fn, warmup, reps, calls=calls, hold_stream=True)


def _median_event_ms(fn, warmup: int, reps: int, *, calls: int, hold_stream: bool) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hold_stream:
            torch.cuda._sleep(20_000_000)  # ~10 ms: far longer than queueing ``calls`` calls takes
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_host(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of host (Python + launch) time per ``fn()`` call, the GPU kept busy
    by a sleep kernel so that no call waits on it."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile_each(launches, note: str = "") -> None:
    """Run each ``(name, fn)`` once between cudaProfilerStart and Stop, synchronising after each,
    for ``ncu --profile-from-start off`` (scripts/profile_*.py); compile and warm up before."""
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in launches:
        fn()
        torch.cuda.synchronize()
        print(f"profiled: {name}{note}", flush=True)
    torch.cuda.profiler.stop()


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted): the bandwidth ceiling the
    memory-bound benchmarks report against, measured in their own run."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_cuda(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() / (ms * 1e6)


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool) -> float:
    """4·b·h·d times the query-key pairs computed (QK^T and PV): sq·sk, or when causal (queries
    aligned to the last keys, as FA4 masks) sq·sk - sq²/2 for sq <= sk (half when equal, FA's
    convention; chunked prefill, sq < sk, counts the cached keys each query sees) and sk²/2 else."""
    pairs = float(seqlen_q) * seqlen_k
    if causal:
        pairs = pairs - seqlen_q * seqlen_q / 2 if seqlen_q <= seqlen_k else seqlen_k * seqlen_k / 2
    return 4.0 * batch * heads * head_dim * pairs


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_results(out_dir: str, name: str, title: str, intro: str, header: str, lines) -> str:
    """``<out_dir>/<name>-<gpu>.md``: a title naming the device, what was run, one markdown table."""
    import os

    gpu = device_name()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{gpu.replace(' ', '_')}.md")
    with open(path, "w") as f:
        f.write(f"# {title}, {gpu}\n\n{intro}\n\n{header}\n|" + "---|" * (header.count("|") - 1) + "\n")
        f.writelines(line + "\n" for line in lines)
    print(f"wrote {path}")
    return path


def bench_parser(doc: str, reps: int, results_dir: str):
    """The arguments every perf/ script takes: ``--reps`` and ``--out-dir``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--reps", type=int, default=reps, help="timed runs per measurement (median)")
    ap.add_argument("--out-dir", default=results_dir, help="where the results .md goes")
    return ap


def require_gpu(script: str) -> str:
    """Exit with a message without CUDA; else print and return the device name."""
    import sys

    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")
    gpu = device_name()
    print(f"device: {gpu}")
    return gpu
