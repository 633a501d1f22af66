"""Compile CuTeDSL kernels for a GPU target on a machine that has no GPU.

CuTeDSL lowers to a cubin without a device when the target is named: ``CUTE_DSL_ARCH`` for the
compiler, ``FLASH_ATTENTION_ARCH`` and ``FLASH_ATTENTION_NUM_SMS`` for FA4's kernel selection, and
torch's ``FakeTensorMode`` so tensors have shapes and dtypes but no storage. FA4's interface skips
the launch under fake tensors, so a call compiles exactly the kernel a real call would run.

The variables are read when the stack is imported, so each target runs in its own process:

    python -m fa4_tq.compile_check --arch sm_90a fa4-fwd

prints one ``COMPILED`` line per kernel and exits non-zero on any compile failure. ``--ptxas``
also keeps each kernel's PTX and prints what ``ptxas -v`` says of it (registers, spill bytes,
serialised wgmma): a register check without a GPU, for developers with a CUDA toolkit. CI calls it
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


def run_in_subprocess(arch: str, case: str, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **target_env(arch))
    return subprocess.run(
        [sys.executable, "-m", "fa4_tq.compile_check", "--arch", arch, case, *flags],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


# ----------------------------------------------------------------------------- cases
def _record_compiles(ptx_root: str | None = None) -> list[str]:
    """Wrap cute.compile so each case can report which kernel classes it really compiled; with
    ``ptx_root``, each compile also keeps its PTX in ``<ptx_root>/<n>/`` (for ``--ptxas``)."""
    import cutlass.cute as cute

    seen: list[str] = []
    original = cute.compile

    def compile_and_record(fn, *args, **kwargs):
        owner = getattr(fn, "__self__", fn)  # a kernel object, or a bound method of one
        seen.append(getattr(fn, "__name__", None) if inspect.isfunction(fn) else type(owner).__name__)
        if ptx_root is not None:
            out = os.path.join(ptx_root, str(len(seen)))
            os.makedirs(out, exist_ok=True)
            kwargs["options"] = kwargs.get("options", "") + f" --keep-ptx --dump-dir={out}"
        return original(fn, *args, **kwargs)

    cute.compile = compile_and_record
    import flash_attn.cute.interface as fa_interface

    fa_interface.cute.compile = compile_and_record
    if ptx_root is not None:
        _short_dump_names()
    return seen


def _short_dump_names() -> None:
    """CuTeDSL names a dumped PTX file after the kernel's mangled name, which for our kernels is
    longer than a file name may be, so the dump silently fails; name it ``k.<arch>.ptx`` instead
    (each compile has its own folder). Reaches into a private helper: ``--ptxas`` is a developer
    tool, CI does not use it."""
    from cutlass.base_dsl import compiler

    for obj in vars(compiler).values():
        helper = getattr(obj, "_set_artifact_dump_paths", None) if isinstance(obj, type) else None
        if helper is not None:
            obj._set_artifact_dump_paths = staticmethod(
                lambda option, dump_dir, function_name, arch, ext, full_attr, _h=helper:
                _h(option, dump_dir, "k", arch, ext, full_attr))


def ptxas_report(ptx_root: str, arch: str, labels: list[str]) -> list[str]:
    """``ptxas -v`` on each kept PTX: registers, spill bytes, and whether ptxas had to serialise
    wgmma (``ptxas_summary``), one line per kernel."""
    import glob

    lines = []
    for i, label in enumerate(labels, 1):
        ptx = sorted(glob.glob(os.path.join(ptx_root, str(i), "*.ptx")))
        if not ptx:
            lines.append(f"PTXAS {label}: no PTX kept")
            continue
        res = subprocess.run(["ptxas", f"-arch={arch}", "-v", ptx[0], "-o", os.devnull],
                             capture_output=True, text=True)
        lines.append(f"PTXAS {label}: " + ptxas_summary(res.stdout + res.stderr, res.returncode))
    return lines


def ptxas_summary(text: str, returncode: int = 0) -> str:
    """One line from ``ptxas -v``'s output: registers, spill bytes, and each note saying ptxas
    serialised the kernel's wgmmas (C7519: a wgmma under a predicate traced to the warp index;
    C7520: a wgmma in a divergent path). Serialised wgmmas each wait for the one before."""
    import re

    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    notes = sorted(set(re.findall(r"\((C75\d\d)\)[^\n]*serialized", text)))
    return (f"{max(map(int, regs)) if regs else '?'} registers, spill stores/loads "
            f"{'/'.join(spills[0]) if spills else '?'} bytes"
            + "".join(f", wgmma serialised ({c})" for c in notes)
            + ("" if returncode == 0 else f", ptxas exit {returncode}"))


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


def _fake_packed(lead: tuple, head_dim: int, bits: int, scale_dtype=None):
    """A PackedKV of fake tensors (format v1 layout: scales head-major, token dim padded)."""
    import torch
    from fa4_tq.codec.packed import PackedKV, scales_shape
    from fa4_tq.codec.packing import row_bytes

    scale_dtype = scale_dtype or torch.float16
    data = torch.empty(*lead, row_bytes(head_dim, bits), dtype=torch.uint8, device="cuda")
    shape = scales_shape(lead)
    per16 = 16 // torch.empty((), dtype=scale_dtype).element_size()
    padded = -(-shape[-1] // per16) * per16
    strides = [1]
    for n in reversed((*shape[:-1], padded)[1:]):
        strides.insert(0, strides[0] * n)
    scales = torch.empty_strided(shape, tuple(strides), dtype=scale_dtype, device="cuda")
    return PackedKV(data, scales, bits, head_dim)


def tq_sm90_variants(full: bool):
    """(label, kwargs) of the packed-KV kernel variants CI compiles for SM90: every bit pair at
    head_dim 128 (causal, GQA), plus head_dim 64 and 256, masks, paged, varlen, fp16, and the
    persistent tile scheduler (TMA and cp.async Q, MHA, paged)."""
    from itertools import product

    out = []
    pairs = list(product((2, 3, 4, 8), repeat=2)) if full else [(4, 4), (2, 8), (3, 3), (8, 2)]
    for kb, vb in pairs:
        out.append((f"k{kb}v{vb} d128 causal gqa4", dict(kb=kb, vb=vb)))
    out += [
        ("k4v4 d64 causal", dict(d=64)),
        ("k3v3 d64 non-causal", dict(d=64, kb=3, vb=3, causal=False)),
        ("k4v4 d256 causal", dict(d=256)),
        ("k8v8 d256 causal", dict(d=256, kb=8, vb=8)),
        ("k4v4 d128 window", dict(causal=False, window=(128, 0))),
        ("k4v4 d128 gqa3 (cp.async Q)", dict(h=6, hk=2)),
        ("k4v4 d128 fp16 fp32-scales", dict(dtype="float16", scale_dtype="float32")),
        ("k4v2 d128 paged page=64", dict(vb=2, paged=64)),
        ("k4v4 d128 paged page=128", dict(paged=128)),
        ("k4v4 d128 varlen", dict(varlen=True)),
        ("k4v4 d128 causal persistent", dict(persistent=True)),
        ("k4v4 d128 gqa3 (cp.async Q) persistent", dict(h=6, hk=2, persistent=True)),
        ("k4v4 d128 mha persistent", dict(h=4, hk=4, persistent=True)),
        ("k2v2 d64 non-causal paged page=64 persistent", dict(d=64, kb=2, vb=2, causal=False, paged=64,
                                                              persistent=True)),
    ]
    return out


def _case_tq_sm90(full: bool) -> list[str]:
    import torch
    from fa4_tq.kernels.launch import packed_attention

    done = []
    for label, kw in tq_sm90_variants(full):
        d, kb, vb = kw.get("d", 128), kw.get("kb", 4), kw.get("vb", 4)
        h, hk = kw.get("h", 8), kw.get("hk", 2)
        dtype = getattr(torch, kw.get("dtype", "bfloat16"))
        sdt = getattr(torch, kw.get("scale_dtype", "float16"))
        extra = {}
        if kw.get("paged"):
            ps = kw["paged"]
            q = torch.empty(2, 256, h, d, dtype=dtype, device="cuda")
            k, v = (_fake_packed((16, ps, hk), d, b, sdt) for b in (kb, vb))
            extra = dict(page_table=torch.empty(2, 8, dtype=torch.int32, device="cuda"),
                         seqused_k=torch.empty(2, dtype=torch.int32, device="cuda"))
        elif kw.get("varlen"):
            q = torch.empty(512, h, d, dtype=dtype, device="cuda")
            k, v = (_fake_packed((700, hk), d, b, sdt) for b in (kb, vb))
            extra = dict(cu_seqlens_q=torch.empty(3, dtype=torch.int32, device="cuda"),
                         cu_seqlens_k=torch.empty(3, dtype=torch.int32, device="cuda"))
        else:
            q = torch.empty(2, 256, h, d, dtype=dtype, device="cuda")
            k, v = (_fake_packed((2, 256, hk), d, b, sdt) for b in (kb, vb))
        packed_attention(q, k, v, softmax_scale=d ** -0.5, causal=kw.get("causal", True),
                         window_size=kw.get("window", (None, None)), _persistent=kw.get("persistent", False), **extra)
        done.append(label)
    return done


def tq_sm100_variants():
    """(label, kwargs) of the SM100 packed-KV kernel CI compiles (issue 7): every bit pair at
    head_dim 128 (causal, GQA 4, pages of 64), a subset at head_dim 64, a batch-layout cache
    (one page per sequence), non-causal, and fp16 with float32 scales."""
    from itertools import product

    out = [(f"k{kb}v{vb} d128 causal gqa4 paged", dict(kb=kb, vb=vb)) for kb, vb in product((2, 3, 4, 8), repeat=2)]
    out += [(f"k{kb}v{vb} d64 causal gqa4 paged", dict(d=64, kb=kb, vb=vb)) for kb, vb in ((4, 4), (2, 8), (8, 2), (3, 3))]
    out += [
        ("k3v4 d128 batch layout gqa2", dict(paged=False, kb=3, h=4)),
        ("k4v2 d128 non-causal mha", dict(vb=2, causal=False, h=2)),
        ("k4v4 d128 fp16 fp32-scales", dict(dtype="float16", scale_dtype="float32")),
    ]
    return out


def _case_tq_sm100() -> list[str]:
    import torch
    from fa4_tq.kernels.launch import packed_attention

    done = []
    for label, kw in tq_sm100_variants():
        d, kb, vb = kw.get("d", 128), kw.get("kb", 4), kw.get("vb", 4)
        h, hk = kw.get("h", 8), 2
        dtype = getattr(torch, kw.get("dtype", "bfloat16"))
        sdt = getattr(torch, kw.get("scale_dtype", "float16"))
        q = torch.empty(2, 256, h, d, dtype=dtype, device="cuda")
        if kw.get("paged", True):
            k, v = (_fake_packed((16, 64, hk), d, b, sdt) for b in (kb, vb))
            extra = dict(page_table=torch.empty(2, 8, dtype=torch.int32, device="cuda"),
                         seqused_k=torch.empty(2, dtype=torch.int32, device="cuda"))
        else:
            k, v = (_fake_packed((2, 256, hk), d, b, sdt) for b in (kb, vb))
            extra = {}
        packed_attention(q, k, v, softmax_scale=d ** -0.5, causal=kw.get("causal", True),
                         window_size=(None, None), **extra)
        done.append(label)
    return done


def decode_variants():
    """(label, kwargs) of flash_attn_with_kvcache's split path (fa4_tq.decode) at GQA 8:1, pages of
    64: the non-causal chunk kernel at every bit pair and head_dim 64, the split combine
    (``kernels/combine.py``) on bf16 partials, and the causal tail of a verification step
    (seqlen_q 4) with the LSE returned."""
    from itertools import product

    out = []
    for i, (kb, vb) in enumerate(product((2, 3, 4, 8), repeat=2)):
        out.append((f"k{kb}v{vb} d128 decode chunks", dict(kb=kb, vb=vb)))
        if i == 0:
            out.append(("combine d128 bf16 partials", None))
    out.append(("k4v4 d64 decode chunks", dict(d=64)))
    out.append(("combine d64 bf16 partials", None))
    out.append(("k4v4 d128 verify tail (causal)", dict(sq=4, lse=True)))
    # skip-softmax (kernels/skip_softmax.py): decode at head_dim 64 and verification at 128
    out.append(("k2v2 d64 decode chunks skip-softmax", dict(d=64, kb=2, vb=2, skip=True)))
    out.append(("k4v4 d128 verify chunks + tail skip-softmax", dict(sq=8, lse=True, skip=True)))
    return out


def _case_decode() -> list[str]:
    import torch
    from fa4_tq.decode import _run_split
    from fa4_tq.interface import _Problem

    done = []
    for label, kw in decode_variants():
        done.append(label)
        if kw is None:  # compiled by the call before
            continue
        d, kb, vb, sq = kw.get("d", 128), kw.get("kb", 4), kw.get("vb", 4), kw.get("sq", 1)
        q = torch.empty(2, sq, 16, d, dtype=torch.bfloat16, device="cuda")
        k, v = (_fake_packed((32, 64, 2), d, b) for b in (kb, vb))
        prob = _Problem(q, k, v, 2, d ** -0.5, True, (None, None),
                        seqused_k=torch.empty(2, dtype=torch.int32, device="cuda"),
                        page_table=torch.empty(2, 16, dtype=torch.int32, device="cuda"))
        lam = torch.empty(2, dtype=torch.float32, device="cuda") if kw.get("skip") else None
        _run_split(prob, 4, kw.get("lse", False), lam)
    return done


def decode_kernel_variants():
    """(label, kwargs) of the decode kernel (kernels/decode.py) that flash_attn_with_kvcache runs
    for dense calls of up to 32 query rows per KV head: every K/V pair of 2/3/4/8 bits at head_dim
    128 and GQA 8:1, head_dim 64, verification rows (seqlen_q 2 at GQA 4:1; seqlen_q 4 at GQA 8:1,
    two n-tiles a CTA in two row groups; causal), fp16 with float32 scales; each with the split
    combine (``kernels/combine.py``) over 4 splits, compiled once per output dtype and head_dim."""
    from itertools import product

    out = [(f"k{kb}v{vb} d128 gqa8", dict(kb=kb, vb=vb)) for kb, vb in product((2, 3, 4, 8), repeat=2)]
    out.insert(1, ("combine d128 bfloat16", None))  # compiled by the call before (None: no call of its own)
    out += [
        ("k4v4 d64 gqa8", dict(d=64)),
        ("combine d64 bfloat16", None),
        ("k8v4 d64 gqa8", dict(d=64, kb=8)),
        ("k4v4 d128 verify seqlen_q 2 gqa4 causal", dict(sq=2, group=4, lse=True)),
        ("k4v2 d128 fp16 fp32-scales", dict(vb=2, dtype="float16", scale_dtype="float32")),
        ("combine d128 float16 output", None),
    ]
    # verification rows past 8 a KV head: CTAs of two 8-row n-tiles, in row groups
    out += [(f"k{kb}v{vb} d128 verify seqlen_q 4 gqa8 causal", dict(kb=kb, vb=vb, sq=4))
            for kb, vb in ((4, 4), (2, 2), (8, 8), (2, 8), (8, 2), (3, 3))]
    out += [("k4v4 d64 verify seqlen_q 4 gqa8 causal", dict(d=64, sq=4))]
    # the splits merged in the kernel (``combine_in_kernel``; not the default until GPU-tested)
    out += [(f"{lb} combine in kernel", dict(kw, in_kernel=True)) for lb, kw in (
        ("k4v4 d128 gqa8", {}), ("k2v2 d128 gqa8", dict(kb=2, vb=2)), ("k4v4 d64 gqa8", dict(d=64)),
        ("k4v4 d128 verify seqlen_q 4 gqa8 causal", dict(sq=4, lse=True)),
        ("k4v2 d128 fp16 fp32-scales", dict(vb=2, dtype="float16", scale_dtype="float32")))]
    # switches of PackedDecode that are off by default (``kernel``: its class attributes)
    fast = dict(kernel=dict(fast_page_divmod=True))
    out += [("k4v4 d128 gqa8 fast_page_divmod", fast), ("k2v2 d128 verify seqlen_q 4 gqa8 causal fast_page_divmod",
                                                          dict(fast, kb=2, vb=2, sq=4)),
            ("k4v4 d64 gqa8 fast_page_divmod combine in kernel", dict(fast, d=64, in_kernel=True))]
    paired = dict(kernel=dict(paired_2bit_lookups=True))
    out += [(f"k{kb}v{vb} d128 gqa8 paired_2bit_lookups", dict(paired, kb=kb, vb=vb))
            for kb, vb in ((2, 2), (2, 4), (4, 2), (2, 8), (8, 2), (3, 2), (2, 3))]
    out += [("k2v2 d128 verify seqlen_q 4 gqa8 causal paired_2bit_lookups", dict(paired, kb=2, vb=2, sq=4)),
            ("k2v4 d64 gqa8 paired_2bit_lookups", dict(paired, d=64, kb=2)),
            ("k2v2 d128 fp16 fp32-scales paired_2bit_lookups",
             dict(paired, kb=2, vb=2, dtype="float16", scale_dtype="float32"))]
    return out


def _case_decode_kernel() -> list[str]:
    import torch

    import fa4_tq.kernels.decode
    from fa4_tq.decode import _run_decode_kernel
    from fa4_tq.interface import _Problem

    done = []
    for label, kw in decode_kernel_variants():
        if kw is None:
            done.append(label)
            continue
        d, kb, vb, sq, group = kw.get("d", 128), kw.get("kb", 4), kw.get("vb", 4), kw.get("sq", 1), kw.get("group", 8)
        dtype = getattr(torch, kw.get("dtype", "bfloat16"))
        sdt = getattr(torch, kw.get("scale_dtype", "float16"))
        q = torch.empty(2, sq, 2 * group, d, dtype=dtype, device="cuda")
        k, v = (_fake_packed((32, 64, 2), d, b, sdt) for b in (kb, vb))
        prob = _Problem(q, k, v, 2, d ** -0.5, True, (None, None),
                        seqused_k=torch.empty(2, dtype=torch.int32, device="cuda"),
                        page_table=torch.empty(2, 16, dtype=torch.int32, device="cuda"))
        kernel = fa4_tq.kernels.decode.PackedDecode
        if "kernel" in kw:  # a subclass with the switches set (launch.packed_decode caches per class)
            fa4_tq.kernels.decode.PackedDecode = type("PackedDecode", (kernel,), kw["kernel"])
        try:
            _run_decode_kernel(prob, 4, kw.get("lse", False), kw.get("in_kernel", False))
        finally:
            fa4_tq.kernels.decode.PackedDecode = kernel
        done.append(label)
    return done


def cache_write_variants():
    """(label, kwargs) of the cache-write kernels CI compiles: each K/V width pair on the
    diagonal plus mixed ones at head_dim 128, every head_dim, fp16 with float32 scales."""
    out = [(f"k{kb}v{vb} d128", dict(kb=kb, vb=vb)) for kb, vb in ((2, 2), (3, 3), (4, 4), (8, 8), (4, 2), (8, 3))]
    out += [(f"k4v4 d{d}", dict(d=d)) for d in (64, 256)]
    out += [("k3v8 d512", dict(d=512, kb=3, vb=8)), ("k2v4 d512", dict(d=512, kb=2, vb=4))]
    out += [("k4v4 d128 fp16 fp32-scales int64-slots", dict(dtype="float16", scale_dtype="float32", slots="int64"))]
    return out


def _case_cache_write() -> list[str]:
    import torch
    from fa4_tq.kernels.launch import write_packed

    done = []
    for label, kw in cache_write_variants():
        d, kb, vb = kw.get("d", 128), kw.get("kb", 4), kw.get("vb", 4)
        dtype = getattr(torch, kw.get("dtype", "bfloat16"))
        sdt = getattr(torch, kw.get("scale_dtype", "float16"))
        k = torch.empty(300, 4, d, dtype=dtype, device="cuda")
        slots = torch.empty(300, dtype=getattr(torch, kw.get("slots", "int32")), device="cuda")
        kc, vc = (_fake_packed((16, 64, 4), d, b, sdt) for b in (kb, vb))
        write_packed(k, k, slots, kc, vc)
        done.append(label)
    return done


def mla_variants():
    """(label, kwargs) of the MLA prefill kernels CI compiles (``mla/sm90.py`` for sm_90a, case
    "mla"; ``mla/sm100.py`` for sm_100a, case "mla-sm100"): the bf16 latent and every packed width,
    heads 16/64/128, causal and not, with and without the LSE, float16 and float32 scales."""
    return [
        ("bf16 latent h128 causal lse", dict(bits=None, heads=128, lse=True)),
        ("k2 latent h16 causal", dict(bits=2, heads=16)),
        ("k3 latent h64 causal", dict(bits=3, heads=64)),
        ("k4 latent h128 causal lse", dict(bits=4, heads=128, lse=True)),
        ("k8 latent h128 causal", dict(bits=8, heads=128)),
        ("bf16 latent h16 non-causal", dict(bits=None, heads=16, causal=False)),
        ("k4 latent h64 non-causal fp32-scales", dict(bits=4, heads=64, causal=False, scale_dtype="float32")),
    ]


def mla_sm90_switch_variants():
    """(label, kwargs) of SM90 MLA kernels behind switches that are off by default, compiled so
    that they keep compiling (``kernel``: class attributes of ``mla.sm90.FlashMLAForwardSm90``)."""
    return [("k4 latent h16 causal codes_first=False", dict(bits=4, heads=16, kernel=dict(codes_first=False))),
            ("bf16 latent h16 causal bf16_tma=False", dict(bits=None, heads=16, kernel=dict(bf16_tma=False)))]


def _case_mla(switches: bool = False) -> list[str]:
    import torch

    import mla.sm90
    from mla.launch import mla_attention

    done = []
    for label, kw in mla_variants() + (mla_sm90_switch_variants() if switches else []):
        heads, bits = kw["heads"], kw["bits"]
        kernel = mla.sm90.FlashMLAForwardSm90
        if "kernel" in kw:  # a subclass with the switches set (mla.launch caches per class)
            mla.sm90.FlashMLAForwardSm90 = type("FlashMLAForwardSm90", (kernel,), kw["kernel"])
        qn = torch.empty(300, heads, 512, dtype=torch.bfloat16, device="cuda")
        qp = torch.empty(300, heads, 64, dtype=torch.bfloat16, device="cuda")
        if bits is None:
            latent = torch.empty(32, 64, 1, 512, dtype=torch.bfloat16, device="cuda")
        else:
            latent = _fake_packed((32, 64, 1), 512, bits, getattr(torch, kw.get("scale_dtype", "float16")))
        rope = torch.empty(32, 64, 1, 64, dtype=torch.bfloat16, device="cuda")
        idx = dict(dtype=torch.int32, device="cuda")
        try:
            mla_attention(qn, qp, latent, rope, torch.empty(2, 16, **idx), torch.empty(3, **idx),
                          torch.empty(2, **idx), 200, softmax_scale=576 ** -0.5, causal=kw.get("causal", True),
                          return_lse=kw.get("lse", False))
        finally:
            mla.sm90.FlashMLAForwardSm90 = kernel
        done.append(label)
    return done


CASES: dict[str, Callable[[], list[str]]] = {
    "fa4-fwd": _case_fa4_fwd,
    "tq-sm90": lambda: _case_tq_sm90(full=True),
    "tq-sm90-smoke": lambda: _case_tq_sm90(full=False),
    "cache-write": _case_cache_write,
    "decode": _case_decode,
    "decode-kernel": _case_decode_kernel,
    "tq-sm100": _case_tq_sm100,
    "mla": lambda: _case_mla(switches=True),
    "mla-sm100": _case_mla,  # the same variants, for sm_100a (mla/sm100.py); no SM90 switches
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=ARCHES)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--ptxas", action="store_true",
                    help="also keep each kernel's PTX and report ptxas -v registers and spills (needs ptxas)")
    args = ap.parse_args(argv)
    for key, val in target_env(args.arch).items():
        if os.environ.get(key) != val:  # must be set before the stack is imported
            raise SystemExit(f"set {key}={val} before starting (use run_in_subprocess)")
    from torch._subclasses.fake_tensor import FakeTensorMode

    import torch

    if not torch.cuda.is_available():
        _patch_hardware_info()
    import tempfile

    ptx_root = None
    if args.ptxas:
        ptx_root = tempfile.mkdtemp(prefix="fa4tq-ptx-")
        os.environ["CUTE_DSL_DISABLE_FILE_CACHING"] = "1"  # a cached kernel would keep no PTX
    seen = _record_compiles(ptx_root)
    with FakeTensorMode():
        done = CASES[args.case]()
    if len(seen) < len(done):
        raise SystemExit(f"expected {len(done)} compiles, cute.compile ran {len(seen)} times: {seen}")
    for what, cls in zip(done, seen):
        print(f"COMPILED {args.arch} {args.case}: {what} -> {cls}")
    if ptx_root is not None:
        print("\n".join(ptxas_report(ptx_root, args.arch, done[: len(seen)])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
