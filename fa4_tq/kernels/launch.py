"""Torch side of the packed-KV kernels: pick the kernel class and tiles, compile once, launch.

Mirrors what ``flash_attn.cute.interface._flash_attn_fwd`` does for FA4's own kernels (same
tensor conversion, same compile options, same handling of fake tensors: under torch's
``FakeTensorMode`` the kernel is compiled and not launched, which is how CI compiles for GPUs it
does not have).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..codec import PackedKV
from .staging import choose_staging, lookup_table

SUPPORTED_HEAD_DIMS = (64, 128, 256)

_compile_cache: dict = {}


def device_arch() -> int:
    """Compute capability as FA4 selects it (``FLASH_ATTENTION_ARCH`` overrides, for CPU compiles)."""
    from flash_attn.cute.interface import _get_device_arch

    return _get_device_arch()


@functools.lru_cache(maxsize=None)
def sm90_tile_n(head_dim: int, k_bits: int, v_bits: int) -> int:
    """KV rows per tile, for every tile_m (``sm90_config``). FA4 uses 128x128 at head_dim 128; at
    64 it uses 192x128, whose third consumer warpgroup leaves the producer 32 registers, too few
    to dequantise, so we keep 128 rows of queries; at 256 tile_n 64 (FA4: 80) so that 128 producer
    threads split each row evenly in two, and 32 where even one staging slot of 64 rows does not
    fit beside FA4's tiles (K8V8)."""
    for tile_n in ((128,) if head_dim <= 128 else (64, 32)):
        try:
            choose_staging(128, tile_n, head_dim, k_bits, v_bits)
            return tile_n
        except ValueError:
            continue
    raise ValueError(f"no SM90 tile fits head_dim {head_dim} at K{k_bits}V{v_bits}")


@functools.lru_cache(maxsize=None)
def sm90_config(head_dim: int, k_bits: int, v_bits: int, rows: int, batch_layout: bool) -> tuple[int, int]:
    """(tile_m, tile_n) of the SM90 kernel for ``rows`` packed query rows per (sequence, head).
    Decode and verification (batch layout, rows <= 64), with or without skip-softmax, take a
    64-row tile and one consumer warpgroup: on the 128-row tile the second warpgroup's rows are
    all padding, yet it still computes QK^T and takes turns with the first at the tensor cores
    (perf/results/decode-*.md measures both). Everything else: 128 rows. tile_n: ``sm90_tile_n``."""
    return (64 if batch_layout and rows <= 64 else 128), sm90_tile_n(head_dim, k_bits, v_bits)


# Longest key range for which the SM90 kernel walks tiles persistently: causal, and otherwise (no
# mask, a local window).
# H100, K4V4, GQA 8:1, ~32K query tokens, fused rotation, outputs equal bit for bit, three runs
# (perf/results/prefill-*.md; the third with the serpentine order of scheduler.py): hd128 causal
# 1.10/1.11/1.11x at 1K, 1.05/1.03/1.06x at 2K, 1.02/1.02/1.02x at 4K, 0.98/0.99/0.96x at 8K;
# hd64 causal 1.06x at 1K, 0.99/1.01x at 4K. Without a mask all tiles cost the same and the gain is
# a tile's start and end alone: 1.05/1.04/1.04x at 1K, but 4K 0.997x and 0.955x, so 1K there.
PERSISTENT_MAX_SEQLEN_K = 4096
PERSISTENT_MAX_SEQLEN_K_FULL = 1024
# Any pack-GQA group that divides the 128-row tile (Q and O by TMA) runs persistent, MHA included.
# FA4's static order lost with few m_blocks a head (MHA 0.86-0.92x, GQA 3:1 0.88x at 1K causal: a
# CTA kept drawing the same m_blocks); scheduler.py's serpentine order measured MHA 1.03-1.06x
# (hd64/128 1K causal; 4K 1.01x) and GQA 2:1 1.09x, outputs equal, once (H100), and the whole
# tests/test_gpu_inline.py passed with every such group persistent (H100, 2026-12-07). MHA
# without a mask (<= 1K keys) was not timed persistent; GQA 8:1 there measured 1.04x.


def sm90_persistent(seqlen_k: int, tile_m: int, skip_softmax: bool, group: int, causal: bool) -> bool:
    """Whether the SM90 kernel walks tiles persistently (``scheduler.py``): prefill tiles (128 rows)
    over short key ranges (``PERSISTENT_MAX_SEQLEN_K``, or ``..._FULL`` unless causal), where a
    tile's fixed start and end costs are a large share of it, for pack-GQA groups (1 = MHA) that
    divide the tile (Q and O by TMA). GQA 3:1 (Q by cp.async) measured 1.05x persistent and equal
    in its own test, but the whole GPU test file has not run such groups persistent, so it keeps one
    tile a CTA, as do decode-sized 64-row tiles and skip-softmax (not measured persistent)."""
    longest = PERSISTENT_MAX_SEQLEN_K if causal else PERSISTENT_MAX_SEQLEN_K_FULL
    return (tile_m == 128 and not skip_softmax and seqlen_k <= longest
            and tile_m % group == 0)


def _target_sms(arch: int) -> int:
    from flash_attn.cute.cute_dsl_utils import get_num_sms_for_selection

    return get_num_sms_for_selection(torch.cuda.current_device() if torch.cuda.is_available() else 0, arch)


def _kernel_class(arch: int):
    if arch // 10 == 9:
        from .sm90 import FlashAttentionForwardSm90TQ

        return FlashAttentionForwardSm90TQ
    if arch // 10 == 10:
        from .sm100 import FlashAttentionForwardSm100TQ

        return FlashAttentionForwardSm100TQ
    raise NotImplementedError(
        f"no packed-KV kernel for compute capability {arch // 10}.{arch % 10} yet: use "
        f"backend='decompress' (SM90 and SM100 are supported)"
    )


ROTATIONS = ("fused", "gemm", "none")


def packed_attention(
    q: torch.Tensor,
    k: PackedKV,
    v: PackedKV,
    *,
    softmax_scale: float,
    causal: bool,
    window_size: tuple,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    return_lse: bool = True,
    rotation: str = "fused",
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    skip_log2_threshold: Optional[torch.Tensor] = None,
    skip_stats: Optional[torch.Tensor] = None,
    _ablate: Optional[str] = None,
    _tiles: Optional[tuple] = None,
    _persistent: Optional[bool] = None,
):
    """Attention of ``q`` on packed K/V. Returns ``(out, lse)`` with FA4's layouts, ``out`` in
    q's dtype. ``out``/``lse`` may be given (contiguous, of those shapes): the kernel writes into
    them (split-KV writes its partial results into slices of one buffer this way).

    ``rotation``: "fused" (the kernel rotates q and un-rotates the output itself), "gemm" (one
    bf16 GEMM each around the kernel, ``rotate_rounded``/``unrotate_rounded``), "none" (``q`` is
    already ``R_k q`` and the output stays rotated: the kernel alone, for tests and benchmarks).
    ``skip_log2_threshold`` (float32 ``[batch]``, log2 of each entry's lambda; -inf skips
    nothing) turns skip-softmax on (``kernels/skip_softmax.py``); the kernel then writes
    ``skip_stats`` (int32 ``[batch, tile heads, 2 * m_blocks, 2]``: skipped and visited blocks of
    each 64-row warpgroup of each tile; tile heads are the KV heads with pack-GQA, else the query
    heads). Batch layout only (no ``cu_seqlens``).
    ``_tiles=(tile_m, tile_n)`` replaces ``sm90_config``'s choice (tests, perf/bench_decode.py).
    ``_persistent`` replaces ``sm90_persistent``'s choice of the tile scheduler (tests, benchmarks).
    Inputs are assumed validated by ``fa4_tq.interface``.
    """
    skip = skip_log2_threshold is not None
    if skip and (skip_stats is None or cu_seqlens_q is not None):
        raise ValueError("skip-softmax needs skip_stats and the batch layout (no cu_seqlens_q)")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    from flash_attn.cute.testing import is_fake_mode

    if rotation == "fused" and device_arch() // 10 == 10:
        rotation = "gemm"  # the SM100 kernel has no fused rotation (sm100.py)
    if rotation == "gemm":
        from ..codec import rotate_rounded, unrotate_rounded

        if is_fake_mode():  # compiling: the GEMMs do not run on fake tensors, and shapes are all that matter
            return packed_attention(
                q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, page_table=page_table,
                return_lse=return_lse, rotation="none", out=out, lse=lse, skip_log2_threshold=skip_log2_threshold,
                skip_stats=skip_stats, _ablate=_ablate, _tiles=_tiles, _persistent=_persistent)
        o_rot, lse = packed_attention(
            rotate_rounded(q, k.seed), k, v, softmax_scale=softmax_scale, causal=causal,
            window_size=window_size, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_k=seqused_k, page_table=page_table, return_lse=return_lse, rotation="none", lse=lse,
            skip_log2_threshold=skip_log2_threshold, skip_stats=skip_stats, _ablate=_ablate,
            _tiles=_tiles, _persistent=_persistent,
        )
        o = unrotate_rounded(o_rot, v.seed)
        return (out.copy_(o) if out is not None else o), lse
    q_rot = q  # rotated by the kernel ("fused") or by the caller ("none")
    fused = rotation == "fused"
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.interface import _resolve_causal_local_window

    from .scheduler import persistent_scheduler, tile_scheduler

    head_dim = q_rot.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"the packed-KV kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, got {head_dim}: "
            f"use backend='decompress'"
        )
    arch = device_arch()
    cls = _kernel_class(arch)
    num_head, num_head_kv = q_rot.shape[-2], k.shape[-2]
    qhead_per_kvhead = num_head // num_head_kv
    pack_gqa = qhead_per_kvhead > 1  # FA4's default
    causal, local, wl, wr = _resolve_causal_local_window(causal, window_size[0], window_size[1])

    if cu_seqlens_q is None:
        batch, seqlen_q = q_rot.shape[:2]
        lse_shape = (batch, num_head, seqlen_q)
    else:
        lse_shape = (num_head, q_rot.shape[0])
    if out is None:
        out = torch.empty(q_rot.shape, dtype=q_rot.dtype, device=q_rot.device)
    if lse is None and return_lse:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q_rot.device)
    if out.shape != q_rot.shape or out.dtype != q_rot.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q_rot.dtype} tensor of shape {tuple(q_rot.shape)}")
    if lse is not None and (lse.shape != lse_shape or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {lse_shape}")
    k_table, v_table = _codebook_tables(k.bits, v.bits, q_rot.device)
    if arch // 10 == 10:
        if _ablate is not None or _tiles is not None:
            raise NotImplementedError("load-stage ablations exist in the SM90 kernel only")
        return _packed_attention_sm100(
            cls, arch, q_rot, k, v, softmax_scale, qhead_per_kvhead, pack_gqa, (causal, local, wl, wr),
            cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, out, lse, k_table, v_table, skip)
    rows = q_rot.shape[1] * (qhead_per_kvhead if pack_gqa else 1)  # query rows per (sequence, head) tile
    tile_m, tile_n = _tiles or sm90_config(head_dim, k.bits, v.bits, rows, cu_seqlens_q is None)
    if _persistent and cu_seqlens_q is not None:
        raise ValueError("the persistent tile scheduler runs the batch layout only (FA4 schedules varlen itself)")
    if _persistent is None:  # batch layout only: k is (batch, seqlen_k, ...) or pages of a page table
        seqlen_k = k.shape[1] * (page_table.shape[1] if page_table is not None else 1)
        persistent = (cu_seqlens_q is None and cu_seqlens_k is None
                      and sm90_persistent(seqlen_k, tile_m, skip, qhead_per_kvhead, causal))
    else:
        persistent = _persistent
    if is_fake_mode():  # compile only: the sign vectors' shapes are all that matter
        k_signs, v_signs = (torch.empty(head_dim, dtype=torch.float32, device=q_rot.device) for _ in range(2))
    else:
        k_signs, v_signs = (_signs_on(head_dim, p.seed, q_rot.device) for p in (k, v))

    key = (
        arch, cls.__name__, q_rot.dtype, head_dim, qhead_per_kvhead, k.bits, v.bits,
        k.scales.dtype, v.scales.dtype, causal, local, wl is None, wr is None, pack_gqa,
        cu_seqlens_q is None, cu_seqlens_k is None, seqused_k is None, page_table is None,
        lse is None, tile_m, tile_n, fused, skip, _ablate, zero_strides(q_rot), persistent,
    )
    if key not in _compile_cache:
        dtype = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[q_rot.dtype]
        kernel = cls(
            dtype, head_dim, qhead_per_kvhead, k_bits=k.bits, v_bits=v.bits, is_causal=causal,
            is_local=local, pack_gqa=pack_gqa, tile_m=tile_m, tile_n=tile_n, fuse_rotation=fused,
            skip_softmax=skip, persistent=persistent, ablate=_ablate,
        )
        small = dict(assumed_align=4, leading_dim=0)
        args = [
            to_cute_tensor(q_rot),
            to_cute_tensor(k.data), to_cute_tensor(v.data),
            to_cute_tensor(k.scales, assumed_align=2), to_cute_tensor(v.scales, assumed_align=2),
            to_cute_tensor(k_table, assumed_align=16), to_cute_tensor(v_table, assumed_align=16),
            to_cute_tensor(k_signs, assumed_align=16, leading_dim=0),
            to_cute_tensor(v_signs, assumed_align=16, leading_dim=0),
            to_cute_tensor(out), to_cute_tensor(lse, assumed_align=4) if lse is not None else None,
            softmax_scale,
            to_cute_tensor(cu_seqlens_q, **small) if cu_seqlens_q is not None else None,
            to_cute_tensor(cu_seqlens_k, **small) if cu_seqlens_k is not None else None,
            to_cute_tensor(seqused_k, **small) if seqused_k is not None else None,
            to_cute_tensor(page_table, assumed_align=4, leading_dim=1) if page_table is not None else None,
            wl, wr,
            to_cute_tensor(skip_log2_threshold, **small) if skip else None,
            to_cute_tensor(skip_stats, assumed_align=4) if skip else None,
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        ]
        with tile_scheduler(persistent_scheduler(_target_sms(arch)) if persistent else None):
            _compile_cache[key] = cute.compile(kernel, *args, options="--enable-tvm-ffi")
    if not is_fake_mode():
        _compile_cache[key](
            q_rot, k.data, v.data, k.scales, v.scales, k_table, v_table, k_signs, v_signs, out, lse,
            softmax_scale, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, wl, wr,
            skip_log2_threshold, skip_stats,
        )
    return out, lse


def _codebook_tables(k_bits: int, v_bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 codebooks every packed-KV launch passes (``staging.lookup_table``); empty
    tensors of their shape when compiling under fake tensors."""
    from flash_attn.cute.testing import is_fake_mode

    if is_fake_mode():
        return tuple(torch.empty(1 << b, dtype=torch.float32, device=device) for b in (k_bits, v_bits))
    return lookup_table(k_bits, device), lookup_table(v_bits, device)


def _packed_attention_sm100(cls, arch, q, k, v, softmax_scale, qhead_per_kvhead, pack_gqa, window, cu_seqlens_q,
                            cu_seqlens_k, seqused_k, page_table, out, lse, k_table, v_table, skip):
    """``packed_attention`` on SM100 (``sm100.py``; compile-checked, never run here), from the
    point where the shared preparation is done (``q`` already rotated: ``packed_attention`` turns
    "fused" into "gemm" there): paged K/V, a contiguous cache presented as one page per sequence."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.testing import is_fake_mode

    if skip or cu_seqlens_k is not None:
        raise NotImplementedError(
            "the SM100 packed-KV kernel takes paged or batch-layout K/V without skip-softmax: use "
            "backend='decompress' for varlen K/V and skip-softmax on SM100")
    d = q.shape[-1]
    if d not in (64, 128):
        raise ValueError(f"the SM100 packed-KV kernel supports head_dim 64 and 128, got {d}: use backend='decompress'")
    causal, local, wl, wr = window
    kd, vd, ks, vs = k.data, v.data, k.scales, v.scales
    if page_table is None:  # batch layout [b, s, h, nb] / scales [b, h, s]: one page per sequence
        b = kd.shape[0]
        page_table = torch.arange(b, dtype=torch.int32, device=q.device).view(b, 1)
        if seqused_k is None:
            seqused_k = torch.full((b,), kd.shape[1], dtype=torch.int32, device=q.device)
    key = (arch, cls.__name__, q.dtype, d, qhead_per_kvhead, k.bits, v.bits, k.scales.dtype, v.scales.dtype,
           causal, local, wl is None, wr is None, pack_gqa, cu_seqlens_q is None, lse is None, zero_strides(q))
    if key not in _compile_cache:
        dtype = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[q.dtype]
        kernel = cls(dtype, d, qhead_per_kvhead, k_bits=k.bits, v_bits=v.bits, is_causal=causal, is_local=local,
                     pack_gqa=pack_gqa, is_varlen_q=cu_seqlens_q is not None)
        small = dict(assumed_align=4, leading_dim=0)
        args = [
            to_cute_tensor(q), to_cute_tensor(kd), to_cute_tensor(vd),
            to_cute_tensor(ks, assumed_align=2), to_cute_tensor(vs, assumed_align=2),
            to_cute_tensor(k_table, assumed_align=16), to_cute_tensor(v_table, assumed_align=16),
            to_cute_tensor(out), to_cute_tensor(lse, assumed_align=4) if lse is not None else None,
            softmax_scale,
            to_cute_tensor(cu_seqlens_q, **small) if cu_seqlens_q is not None else None,
            to_cute_tensor(seqused_k, **small),
            to_cute_tensor(page_table, assumed_align=4, leading_dim=1),
            wl, wr,
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        ]
        _compile_cache[key] = cute.compile(kernel, *args, options="--enable-tvm-ffi")
    if not is_fake_mode():
        _compile_cache[key](q, kd, vd, ks, vs, k_table, v_table, out, lse, softmax_scale, cu_seqlens_q,
                            seqused_k, page_table, wl, wr)
    return out, lse


def packed_decode(q: torch.Tensor, k: PackedKV, v: PackedKV, page_table: torch.Tensor, seqused_k: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, num_splits: int, *, softmax_scale: float, causal: bool,
                  pdl: bool = True, combine_in_kernel: bool = False) -> None:
    """The decode kernel (``kernels/decode.py``) on paged K/V: ``q [batch, seqlen_q, heads, d]``
    (as given: the kernel rotates it by K's R) into ``out [batch, seqlen_q, heads, d]`` (q's dtype,
    un-rotated by V's R) and ``lse [batch, heads, seqlen_q]`` (float32) over ``num_splits`` KV
    splits: float32 partials merged by ``kernels/combine.py`` (``split_combine``), or, with
    ``combine_in_kernel``, merged by the kernel's last CTA of each row group (one launch). Inputs
    are assumed validated (``fa4_tq.decode``). ``pdl``: programmatic dependent launches."""
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.testing import is_fake_mode

    from .decode import PackedDecode, row_groups

    batch, seqlen_q, heads, d = q.shape
    group = heads // k.shape[2]
    k_table, v_table = _codebook_tables(k.bits, v.bits, q.device)
    if is_fake_mode():  # compile only: the sign vectors' shapes are all that matter
        k_signs, v_signs = (torch.empty(d, dtype=torch.float32, device=q.device) for _ in range(2))
    else:
        k_signs, v_signs = (_signs_on(d, p.seed, q.device) for p in (k, v))
    f32 = dict(dtype=torch.float32, device=q.device)
    out_part = torch.empty(num_splits, batch, seqlen_q, heads, d, **f32)
    lse_part = torch.empty(num_splits, batch, heads, seqlen_q, **f32)
    if combine_in_kernel:
        tickets = split_tickets(q.device, batch * k.shape[2] * row_groups(seqlen_q * group))
    else:  # not read: no stream lookup on this path
        tickets = torch.zeros(1, dtype=torch.int32, device=q.device) if is_fake_mode() else _unread_ticket(q.device)
    # the class too: a subclass with other switches (compile_check, tests, scripts) is another kernel
    key = ("decode", PackedDecode, device_arch(), q.dtype, d, k.bits, v.bits, k.scales.dtype, v.scales.dtype,
           seqlen_q, group, bool(causal), pdl, combine_in_kernel)
    args = (q, k.data, v.data, k.scales, v.scales, k_table, v_table, k_signs, v_signs, page_table, seqused_k,
            out_part, lse_part, out, lse, tickets)
    if key not in _compile_cache:
        small = dict(assumed_align=4, leading_dim=0)
        cargs = [to_cute_tensor(q), to_cute_tensor(k.data), to_cute_tensor(v.data),
                 to_cute_tensor(k.scales, assumed_align=2), to_cute_tensor(v.scales, assumed_align=2),
                 to_cute_tensor(k_table, **small), to_cute_tensor(v_table, **small),
                 to_cute_tensor(k_signs, assumed_align=16), to_cute_tensor(v_signs, assumed_align=16),
                 to_cute_tensor(page_table, assumed_align=4, leading_dim=1), to_cute_tensor(seqused_k, **small),
                 to_cute_tensor(out_part, assumed_align=16), to_cute_tensor(lse_part, assumed_align=4),
                 to_cute_tensor(out, assumed_align=16), to_cute_tensor(lse, assumed_align=4),
                 to_cute_tensor(tickets, **small),
                 softmax_scale, cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)]
        kernel = PackedDecode(d, k.bits, v.bits, seqlen_q, group, causal, pdl, combine_in_kernel)
        _compile_cache[key] = cute.compile(kernel, *cargs, options="--enable-tvm-ffi")
    if not is_fake_mode() and batch:
        _compile_cache[key](*args, softmax_scale)
    if not combine_in_kernel:
        split_combine(out_part, lse_part, out, lse, pdl=pdl)


# (device index, stream) -> int32 zeros: the decode kernel's split tickets (``split_tickets``)
_tickets: dict = {}


@functools.lru_cache(maxsize=None)
def _unread_ticket(device: torch.device) -> torch.Tensor:
    """The decode kernel's ticket argument where it combines no splits (it is not read)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def split_tickets(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 counters, zero, for the decode kernel's in-launch combine. Each launch leaves
    them zero (the last CTA of a row group resets its counter), so one buffer per stream serves
    every call on that stream in turn; launches on different streams may overlap, so they get
    different buffers. Under CUDA-graph capture a fresh buffer is made (its zeroing is captured
    too), so a graph owns its own and eager calls never share it."""
    from flash_attn.cute.testing import is_fake_mode

    if is_fake_mode() or torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    buf = _tickets.get(key)
    if buf is None or buf.numel() < n:
        # replaced on this stream, after the launches that used the old one (stream order)
        buf = _tickets[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def split_combine(out_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                  pdl: bool = True) -> None:
    """``kernels/combine.py``: the partials ``out_part [S, B, Q, H, D]`` (float32 from the decode
    kernel, q's dtype from the split launches of the packed-KV kernel) and ``lse_part [S, B, H,
    Q]`` merged into ``out [B, Q, H, D]`` (q's dtype, contiguous) and
    ``lse [B, H, Q]`` (float32). ``pdl``: a programmatic dependent launch."""
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.testing import is_fake_mode

    from .combine import SplitCombine

    key = ("combine", device_arch(), out_part.dtype, out.dtype, out.shape[-1], pdl)
    if key not in _compile_cache:
        cargs = [to_cute_tensor(out_part, assumed_align=16), to_cute_tensor(lse_part, assumed_align=4),
                 to_cute_tensor(out, assumed_align=16), to_cute_tensor(lse, assumed_align=4),
                 cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)]
        _compile_cache[key] = cute.compile(SplitCombine(out.shape[-1], pdl), *cargs, options="--enable-tvm-ffi")
    if not is_fake_mode() and out.numel():
        _compile_cache[key](out_part, lse_part, out, lse)


@functools.lru_cache(maxsize=None)
def _signs_on(d: int, seed: int, device: torch.device) -> torch.Tensor:
    """R's float32 sign vector on ``device``, made once (like ``staging.lookup_table``)."""
    from ..codec.rotation import sign_vector

    return sign_vector(d, seed, device)


# ----------------------------------------------------------------------------- cache write
@functools.lru_cache(maxsize=None)
def _write_constants_on(bits: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    """``cache_write.write_constants`` (search table and R's sign masks) on ``device``, made once."""
    from ..codec.rotation import sign_vector
    from .cache_write import write_constants

    return write_constants(bits, d, sign_vector(d, seed).tolist()).to(device)


def write_packed(k: torch.Tensor, v: Optional[torch.Tensor], slot_mapping: torch.Tensor, k_dst: PackedKV,
                 v_dst: Optional[PackedKV] = None, *, per_lane: Optional[int] = None, ctas_per_sm: Optional[int] = None,
                 pdl: bool = True):
    """Compress ``k, v[T, H, d]`` into the paged ``k_dst``/``v_dst`` (data ``[P, S, H, nb]``,
    scales ``[P, H, S]``) at ``slot_mapping[T]`` (-1 skips), one kernel launch for both;
    ``v=None`` writes ``k`` alone (``compress_into``).

    Inputs are assumed validated by the caller (``PagedKVCache.write``, ``compress_into``); rows
    that are not 16-byte aligned are copied to a contiguous buffer first. ``per_lane`` (values
    per thread) and ``ctas_per_sm`` (the grid, in CTAs per SM) are tuning knobs for perf/; ``pdl``
    launches it as a programmatic dependent of the kernel before it (``CacheWrite``)."""
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.testing import is_fake_mode

    from .cache_write import CTAS_PER_SM, CacheWrite, constant_words

    ctas_per_sm = ctas_per_sm or CTAS_PER_SM

    sides = [(k, k_dst)] + ([] if v is None else [(v, v_dst)])
    d = k.shape[-1]
    pages, page_size = k_dst.data.shape[:2]
    if pages * page_size >= 2 ** 31:
        raise ValueError(f"a cache of {pages * page_size} slots needs 64-bit slot arithmetic (at most 2**31 - 1)")
    if is_fake_mode():
        consts = [torch.empty(constant_words(dst.bits, d), dtype=torch.int32, device=k.device) for _, dst in sides]
    else:
        consts = [_write_constants_on(dst.bits, d, dst.seed, k.device) for _, dst in sides]
    if not is_fake_mode():
        sides = [(x if _rows_aligned(x) else x.contiguous(), dst) for x, dst in sides]
    (k, k_dst), (v, v_dst) = sides[0], sides[-1]
    kconst, vconst = consts[0], consts[-1]
    sms = _sm_count(k.device)
    key = ("cache_write", device_arch(), k.dtype, d, k_dst.bits,
           None if len(sides) == 1 else v_dst.bits, k_dst.scales.dtype, v_dst.scales.dtype,
           slot_mapping.dtype, sms * ctas_per_sm, per_lane, pdl, zero_strides(k, v))
    args = (k, v, slot_mapping, k_dst.data, v_dst.data, k_dst.scales, v_dst.scales, kconst, vconst)
    if key not in _compile_cache:
        cargs = [to_cute_tensor(k), to_cute_tensor(v), to_cute_tensor(slot_mapping, assumed_align=4, leading_dim=0)]
        cargs += [to_cute_tensor(t, assumed_align=16) for t in (k_dst.data, v_dst.data)]
        cargs += [to_cute_tensor(t, assumed_align=2) for t in (k_dst.scales, v_dst.scales)]
        cargs += [to_cute_tensor(t, assumed_align=16) for t in (kconst, vconst)]
        cargs.append(cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        kernel = CacheWrite(d, k_dst.bits, None if len(sides) == 1 else v_dst.bits, sms, ctas_per_sm, per_lane, pdl)
        _compile_cache[key] = cute.compile(kernel, *cargs, options="--enable-tvm-ffi")
    if not is_fake_mode() and k.shape[0]:
        _compile_cache[key](*args)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    """SMs of ``device`` (132, an H100 SXM's, when compiling without a GPU)."""
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def zero_strides(*tensors: torch.Tensor) -> tuple:
    """Which dims have stride 0, for a compile key: a broadcast dim (the split path repeats q with
    stride 0 at batch 1) is compiled in as a constant, and that kernel rejects any other stride."""
    return tuple(tuple(s == 0 for s in t.stride()) for t in tensors)


def _rows_aligned(x: torch.Tensor) -> bool:
    """Last dim contiguous and every (token, head) row starting on 16 bytes."""
    per16 = 16 // x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(s % per16 == 0 for s in x.stride()[:-1]))
