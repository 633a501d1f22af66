"""Compile CuTeDSL kernels for a GPU target on a machine that has no GPU.

CuTeDSL lowers to a cubin without a device when the target is named: ``CUTE_DSL_ARCH`` for the
compiler, ``FLASH_ATTENTION_ARCH`` and ``FLASH_ATTENTION_NUM_SMS`` for FA4's kernel selection, and
torch's ``FakeTensorMode`` so tensors have shapes and dtypes but no storage. FA4's interface skips
the launch under fake tensors, so a call compiles exactly the kernel a real call would run.

The variables are read when the stack is imported, so each target runs in its own process:

    python -m fa4_tq.compile_check --arch sm_90a fa4-fwd

prints one ``COMPILED`` line per kernel and exits non-zero on any compile failure. CI calls it
through ``tests/test_compile.py``; the kernel issues add their own cases to ``CASES``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from typing import Callable

ARCHES = ("sm_90a", "sm_100a")


def target_env(arch: str, num_sms: int = 132) -> dict[str, str]:
    """The environment that makes CuTeDSL and FA4 compile for ``arch`` without a GPU."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    return {
        "CUTE_DSL_ARCH": arch,
        "FLASH_ATTENTION_ARCH": arch,
        "FLASH_ATTENTION_NUM_SMS": str(num_sms),
    }


def run_in_subprocess(arch: str, case: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **target_env(arch))
    return subprocess.run(
        [sys.executable, "-m", "fa4_tq.compile_check", "--arch", arch, case],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


# ----------------------------------------------------------------------------- cases
def _record_compiles() -> list[str]:
    """Wrap cute.compile so each case can report which kernel classes it really compiled."""
    import cutlass.cute as cute

    seen: list[str] = []
    original = cute.compile

    def compile_and_record(fn, *args, **kwargs):
        owner = getattr(fn, "__self__", fn)  # a kernel object, or a bound method of one
        seen.append(getattr(fn, "__name__", None) if inspect.isfunction(fn) else type(owner).__name__)
        return original(fn, *args, **kwargs)

    cute.compile = compile_and_record
    import flash_attn.cute.interface as fa_interface

    fa_interface.cute.compile = compile_and_record
    return seen


class _TargetHardwareInfo:
    """Stand-in for cutlass.utils.HardwareInfo on a machine with no GPU driver.

    FA4's persistent tile schedulers ask the live device for its SM count while tracing (SM100
    non-causal, for one); with no driver that call fails. The answer only sizes the grid, so the
    target's count (FLASH_ATTENTION_NUM_SMS) is the right one. docs/UPSTREAM.md asks FA4 to read
    its own ``FLASH_ATTENTION_NUM_SMS`` there, which would remove this shim.
    """

    def __init__(self, device_id: int = 0):
        self.num_sms = int(os.environ["FLASH_ATTENTION_NUM_SMS"])

    def get_device_multiprocessor_count(self) -> int:
        return self.num_sms

    def get_max_active_clusters(self, cluster_size: int) -> int:
        return self.num_sms // cluster_size


def _patch_hardware_info() -> None:
    import cutlass.utils
    import cutlass.utils.hardware_info
    import flash_attn.cute.tile_scheduler as tile_scheduler

    cutlass.utils.HardwareInfo = _TargetHardwareInfo
    cutlass.utils.hardware_info.HardwareInfo = _TargetHardwareInfo
    tile_scheduler.HardwareInfo = _TargetHardwareInfo


def _case_fa4_fwd() -> list[str]:
    """FA4's own forward: bf16, hdim 64/128, causal and not, GQA, paged (page = tile)."""
    import torch
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    done = []
    for d, causal in ((128, True), (128, False), (64, True)):
        q = torch.empty(2, 256, 8, d, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 256, 2, d, dtype=torch.bfloat16, device="cuda")
        out, _ = flash_attn_func(q, k, k, causal=causal)
        assert tuple(out.shape) == tuple(q.shape)
        done.append(f"flash_attn_func d={d} causal={causal}")
    q = torch.empty(2, 128, 8, 128, dtype=torch.bfloat16, device="cuda")
    pages = torch.empty(16, 128, 2, 128, dtype=torch.bfloat16, device="cuda")
    table = torch.empty(2, 8, dtype=torch.int32, device="cuda")
    used = torch.empty(2, dtype=torch.int32, device="cuda")
    flash_attn_varlen_func(q, pages, pages, seqused_k=used, page_table=table, causal=True)
    done.append("flash_attn_varlen_func paged page=128 causal")
    return done


CASES: dict[str, Callable[[], list[str]]] = {"fa4-fwd": _case_fa4_fwd}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=ARCHES)
    ap.add_argument("case", choices=sorted(CASES))
    args = ap.parse_args(argv)
    for key, val in target_env(args.arch).items():
        if os.environ.get(key) != val:  # must be set before the stack is imported
            raise SystemExit(f"set {key}={val} before starting (use run_in_subprocess)")
    from torch._subclasses.fake_tensor import FakeTensorMode

    import torch

    if not torch.cuda.is_available():
        _patch_hardware_info()
    seen = _record_compiles()
    with FakeTensorMode():
        done = CASES[args.case]()
    if len(seen) < len(done):
        raise SystemExit(f"expected {len(done)} compiles, cute.compile ran {len(seen)} times: {seen}")
    for what, cls in zip(done, seen):
        print(f"COMPILED {args.arch} {args.case}: {what} -> {cls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
