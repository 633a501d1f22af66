"""Decode and speculative verification on a paged packed cache: ``flash_attn_with_kvcache``.

A decode step reads a sequence's whole context for a handful of query rows: it is bound by the
bytes read (and, here, by their dequantisation), and a small batch has too few (sequence, KV
head) tiles to occupy the GPU.

Dense calls of at most 32 query rows per KV head (seqlen_q x GQA) at 2/4/8 bits and head_dim
64/128, or with 3-bit codes at head_dim 128, run the decode kernel (``kernels/decode.py``,
``decode_kernel_runs``): swap-AB ``mma.sync`` with the codes dequantised into registers (byte
tables in shared memory), q's rotation and the output's un-rotation inside the kernel, split-KV
inside the kernel, a combine kernel of ours across splits (``kernels/combine.py``: a
programmatic dependent launch, which FA4's combine is not; the split launches below use it too).
Everything else (more rows, 3-bit codes at head_dim 64, skip-softmax) runs the packed-KV prefill
kernel as below. Two things address the small batch there, neither of which changes FA4's kernel:

- pack-GQA: the ``seqlen_q x heads/kv_heads`` query rows of one KV head share one 128-row tile
  (FA4's ``PackGQA``), so each packed K/V tile is read and dequantised once for all of them.
- split-KV as a virtual batch: each sequence's context is cut on page boundaries into chunks;
  every (chunk, sequence) pair is one entry of a virtual batch (its slice of the page table, its
  own ``seqused_k``), the packed-KV kernel runs once over all of them, and ``kernels/combine.py``
  merges the partial outputs (in q's dtype, read as they are) by their log-sum-exp. FA4's SM90
  forward has no split-KV (b36 runs one split and its ``mma`` loop ignores the split index);
  adding one in the subclass would mean copying that loop, the virtual batch needs nothing from
  the kernel (docs/UPSTREAM.md).

Causal verification (``seqlen_q = K > 1``): query ``i`` sees the keys up to ``L - K + i``. A
chunk that ends on or before key ``L - K`` is seen whole by every query, so the chunks of the
page-aligned prefix run non-causally; the remainder, from the page that holds key ``L - K`` to
the end (at most ``page_size + K - 1`` keys), runs as a second, causal launch, where FA4's
bottom-right alignment is exactly the verification mask. Its result is one more partial.

The partial outputs are stored in q's dtype (the kernel's output type), so a split result carries
one more bf16/fp16 rounding than an unsplit one; the device tests bound it like the rest.

Skip-softmax (``skip_softmax_threshold`` or ``skip_softmax_threshold_scale_factor``): the kernel
skips a KV block's exp, row sum and P.V for a consumer warpgroup's 64 query rows when all of them
agree that ``exp(block_max - running_max) < lambda`` (``kernels/skip_softmax.py``; semantics and
bound in ``fa4_tq/skip_softmax.py``, which is also the CPU backend). Each split chunk runs its own
online softmax, so its first block is never skipped; the bound on the dropped softmax mass,
``eps = skipped * tile_n * lambda`` per row, holds across chunks all the same.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import validation as V
from .codec import PackedKV
from .interface import _resolve_backend, _run_resolved, _varlen_problem
from .skip_softmax import SkipStats, skip_softmax_attention

__all__ = ["flash_attn_with_kvcache", "choose_num_splits", "plan_num_splits", "choose_decode_splits",
           "plan_decode_splits", "MAX_SEQLEN_Q", "MAX_SPLITS", "SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR"]

MAX_SEQLEN_Q = 16  # decode (1) and verification of up to 16 draft tokens
MAX_SPLITS = 128  # FA4's num_splits_heuristic stops at 128 (the combine takes any count)
SM90_TILE_M = 128  # query rows per tile of the packed-KV kernel (pack-GQA fills them)
ROWS_PER_VOTE = 64  # skip-softmax votes per consumer warpgroup (64 of the tile's rows)
# The documented skip-softmax setting: lambda = 0.1 / seqlen_k. It bounds the dropped softmax mass
# of a row by about 10% in the worst case (eps <= factor * (1 + tile_n / seqlen_k)); on peaked,
# LLM-like attention the dropped mass is far below that. At this value the greedy accept/reject
# decisions of verification batches are tested not to change (tests/test_skip_softmax.py on the
# CPU, tests/test_gpu_decode.py on the device). Ecosystem defaults are larger (vLLM's example:
# 20 for decode) and calibrated per model: this one is chosen for its bound, not for speed.
SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR = 0.1


def flash_attn_with_kvcache(
    q: torch.Tensor,
    cache: Sequence[PackedKV],
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    num_splits: Optional[int] = None,
    skip_softmax_threshold=None,
    skip_softmax_threshold_scale_factor: Optional[float] = None,
    return_lse: bool = False,
    return_skip_stats: bool = False,
    backend: str = "auto",
    check_indices: bool = True,
):
    """Attention of ``seqlen_q`` (1 to 16) new query tokens per sequence on a paged packed cache.

    q: ``[batch, seqlen_q, heads, head_dim]`` bf16/fp16, the newest ``seqlen_q`` tokens of each
    sequence (their K/V already written to the cache, e.g. by ``PagedKVCache.write``).
    cache: ``(k_pages, v_pages)`` as ``PagedKVCache.layer(i)`` returns them, pages
    ``[num_pages, page_size, kv_heads, head_dim]``.
    page_table: int32 ``[batch, max_pages]``; seqused_k: int32 ``[batch]``, each sequence's key
    count including the new tokens (ragged).
    causal: the new tokens attend causally among themselves (bottom-right aligned: query ``i``
    sees keys ``< seqused_k - seqlen_q + i + 1``), as speculative verification needs.
    num_splits: KV chunks per sequence (partials merged by LSE; with causal verification the
    last few keys are one more, causal, chunk); None chooses from the grid size (FA4's
    heuristic: enough (sequence, KV head, chunk) tiles to fill the SMs); 1 = one launch.
    skip_softmax_threshold: lambda of skip-softmax (module docstring), a float in [0, 1) or a
    float tensor ``[batch]`` (one per sequence); None (default) is dense attention, 0 runs the
    skipping kernel without skipping. skip_softmax_threshold_scale_factor: the same as
    ``lambda = factor / seqused_k`` per sequence (FlashInfer's and TensorRT-LLM's knob);
    ``SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR`` is the documented value. Give at most one of the two.
    return_skip_stats: also return a ``fa4_tq.skip_softmax.SkipStats`` (skipped and visited
    blocks and the mass bound ``eps`` per (sequence, KV head, 64-row vote group), summed over
    the split chunks).
    backend: as in ``flash_attn_func``; "inline" is the packed-KV kernel with split-KV. With
    skip-softmax, "reference" is the float64 oracle ``fa4_tq.skip_softmax`` (unsplit) and
    "decompress" is refused (FA4's bf16 kernel does not skip).
    check_indices: check seqused_k and the page ids on the host (a device sync); pass False
    inside CUDA graphs when the caller guarantees them.

    Returns ``(out, lse)``: ``out`` like ``q``, ``lse`` float32 ``[batch, heads, seqlen_q]`` or
    None unless ``return_lse``; ``(out, lse, stats)`` with ``return_skip_stats``.
    """
    if not isinstance(cache, (tuple, list)) or len(cache) != 2:
        raise TypeError(
            "cache must be the pair (k_pages, v_pages) of PackedKV pages that "
            "PagedKVCache.layer(layer) returns"
        )
    k, v = cache
    V.check_query(q)
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seqlen_q, heads, head_dim], got {q.dim()} dims")
    seqlen_q = q.shape[1]
    if not 1 <= seqlen_q <= MAX_SEQLEN_Q:
        raise ValueError(
            f"seqlen_q must be 1 to {MAX_SEQLEN_Q} (decode or verification), got {seqlen_q}: "
            f"for prefill use fa4_tq.flash_attn_varlen_func"
        )
    if page_table is None or seqused_k is None:
        raise ValueError("flash_attn_with_kvcache needs page_table [batch, max_pages] and seqused_k [batch]")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    causal = bool(causal)
    prob = _varlen_problem(
        q, k, v, None, None, seqlen_q, None, seqused_k, page_table, softmax_scale, causal,
        (None, None), check_indices, min_seqused_k=seqlen_q if causal else 1,
        min_seqused_why=" (with causal=True the new tokens' keys are in the cache)" if causal else "",
    )
    lam = _skip_lambda(skip_softmax_threshold, skip_softmax_threshold_scale_factor, prob.seqused_k,
                       q.shape[0], check_indices)
    if return_skip_stats and lam is None:
        raise ValueError("return_skip_stats needs skip_softmax_threshold or skip_softmax_threshold_scale_factor")
    resolved = _resolve_backend(backend, prob)
    if lam is None:
        if resolved != "inline":
            return _run_resolved(prob, return_lse, resolved)
        if decode_kernel_runs(prob):
            return _run_decode_kernel(prob, num_splits, return_lse)
        return _run_split(prob, num_splits, return_lse)
    if resolved == "decompress":
        raise ValueError(
            "skip-softmax runs in the packed-KV kernel (backend='inline', SM90) or the float64 "
            "oracle (backend='reference'); backend='decompress' (FA4's bf16 kernel) does not skip"
            + ("" if backend == "decompress" else ": 'auto' chose it because the kernel cannot run this call")
        )
    if resolved == "reference":
        from .kernels.launch import sm90_tile_n

        out, lse, stats = skip_softmax_attention(
            q, k, v, prob.page_table, prob.seqused_k, threshold=lam.double(), causal=causal,
            softmax_scale=prob.softmax_scale, tile_n=sm90_tile_n(q.shape[-1], k.bits, v.bits),
            rows_per_vote=ROWS_PER_VOTE)
        out, lse = out.to(q.dtype), lse.float() if return_lse else None
    else:
        out, lse, stats = _run_split(prob, num_splits, return_lse, lam, return_skip_stats)
    return (out, lse, stats) if return_skip_stats else (out, lse)


def _skip_lambda(threshold, scale_factor, seqused_k: torch.Tensor, batch: int, check: bool) -> Optional[torch.Tensor]:
    """Each sequence's skip-softmax lambda, float32 ``[batch]`` on the device (None: dense)."""
    if threshold is not None and scale_factor is not None:
        raise ValueError("give skip_softmax_threshold or skip_softmax_threshold_scale_factor, not both")
    if scale_factor is not None:
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or not (
                0 <= scale_factor < math.inf):
            raise ValueError(f"skip_softmax_threshold_scale_factor must be a finite float >= 0, got {scale_factor!r}")
        return scale_factor / seqused_k.float().clamp_min(1)
    if threshold is None:
        return None
    if isinstance(threshold, torch.Tensor):
        if threshold.shape != (batch,) or not threshold.is_floating_point() or threshold.device != seqused_k.device:
            raise ValueError(
                f"skip_softmax_threshold as a tensor must be floating point [batch] = [{batch}] on "
                f"{seqused_k.device}, got {threshold.dtype} {tuple(threshold.shape)} on {threshold.device}")
        if check and not bool(((threshold >= 0) & (threshold < 1)).all()):
            raise ValueError("skip_softmax_threshold values must be in [0, 1)")
        return threshold.float()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(
            f"skip_softmax_threshold must be a float in [0, 1) or a [batch] tensor, got {threshold!r} "
            f"(for lambda = factor / seqlen_k pass skip_softmax_threshold_scale_factor)")
    return torch.full((batch,), float(threshold), dtype=torch.float32, device=seqused_k.device)


def choose_num_splits(q: torch.Tensor, k: PackedKV, v: PackedKV, page_table: torch.Tensor) -> int:
    """What ``num_splits=None`` becomes for this call on this GPU (``plan_num_splits`` with the
    kernel's tile and the device's SM count)."""
    from .kernels.launch import _sm_count, sm90_tile_n

    batch, seqlen_q, heads, d = q.shape
    kv_heads, page_size = k.shape[2], k.shape[1]
    tile_n = sm90_tile_n(d, k.bits, v.bits)
    return plan_num_splits(batch, kv_heads, seqlen_q * (heads // kv_heads), page_table.shape[1], page_size,
                           _sm_count(q.device), tile_n)


def plan_num_splits(batch: int, kv_heads: int, rows_per_kv_head: int, max_pages: int, page_size: int,
                    num_sms: int, tile_n: int = 128) -> int:
    """KV chunks per sequence: FA4's ``num_splits_heuristic`` over the packed-KV kernel's tiles
    (one 128-row tile per (sequence, KV head) with pack-GQA), never more chunks than pages."""
    from flash_attn.cute.interface import num_splits_heuristic

    tiles = batch * kv_heads * math.ceil(rows_per_kv_head / SM90_TILE_M)
    n_blocks = math.ceil(max_pages * page_size / tile_n)
    return max(1, min(num_splits_heuristic(tiles, num_sms, n_blocks, MAX_SPLITS), max_pages))


def decode_kernel_runs(prob) -> bool:
    """Whether a dense call runs the decode kernel (``kernels/decode.py``: SM90, head_dim 64/128,
    2/4/8-bit K and V, 3-bit at head_dim 128, seqlen_q x GQA <= 32 rows per KV head) rather than
    the packed-KV prefill kernel over split launches (everything else, and skip-softmax)."""
    from .kernels import decode as decode_kernel
    from .kernels.launch import device_arch

    q, k, v = prob.q, prob.k, prob.v
    rows = q.shape[1] * (q.shape[2] // k.shape[2])
    return device_arch() // 10 == 9 and decode_kernel.supports(q.shape[-1], k.bits, v.bits, rows, k.shape[1])


DECODE_MIN_KEYS_PER_SPLIT = 512  # no split gets fewer keys: 16 blocks of 32, one or more a warp


def plan_decode_splits(batch: int, kv_heads: int, max_keys: int, num_sms: int, ctas_per_sm: int,
                       row_groups: int = 1) -> int:
    """KV splits of the decode kernel: one CTA per (split, KV head and row group, sequence); as
    many splits as fit one wave of ``ctas_per_sm`` CTAs per SM (a second, partial wave would leave
    most SMs idle while it runs), none shorter than ``DECODE_MIN_KEYS_PER_SPLIT`` keys."""
    fit = ctas_per_sm * num_sms // (batch * kv_heads * row_groups)
    return max(1, min(fit, max_keys // DECODE_MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def choose_decode_splits(q: torch.Tensor, k: PackedKV, v: PackedKV, page_table: torch.Tensor) -> int:
    """What ``num_splits=None`` becomes for a call the decode kernel runs (``plan_decode_splits``
    with the cache's KV heads and page size, the kernel's row groups, the device's SM count and
    the CTAs per SM that this kernel variant's shared memory and registers allow)."""
    from .kernels.decode import n_tiles, resident_ctas, row_groups
    from .kernels.launch import _sm_count

    rows = q.shape[1] * (q.shape[2] // k.shape[2])
    return plan_decode_splits(q.shape[0], k.shape[2], page_table.shape[1] * k.shape[1], _sm_count(q.device),
                              resident_ctas(q.shape[-1], k.bits, v.bits, n_tiles(rows)), row_groups(rows))


# Whether the decode kernel merges its own splits (its last CTA of each row group, one launch a
# call) rather than leaving them to kernels/combine.py. Off until its GPU tests have run (written
# on 2026-12-08 with no GPU lent): tests/test_gpu_decode.py runs both ways.
DECODE_COMBINE_IN_KERNEL = False


def _run_decode_kernel(prob, num_splits: Optional[int], return_lse: bool, combine_in_kernel: Optional[bool] = None):
    """The decode kernel over ``num_splits`` KV splits: it rotates q and un-rotates its float32
    partials itself; ``kernels/combine.py`` merges the splits into the output dtype (one split:
    a cast), both programmatic dependent launches; or, with ``combine_in_kernel`` (default
    ``DECODE_COMBINE_IN_KERNEL``), the kernel merges them itself, one launch."""
    from .kernels.launch import packed_decode

    q, k, v = prob.q.contiguous(), prob.k, prob.v
    batch, seqlen_q, heads, d = q.shape
    if num_splits is None:
        num_splits = choose_decode_splits(q, k, v, prob.page_table)
    out = torch.empty(batch, seqlen_q, heads, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    packed_decode(q, k, v, prob.page_table, prob.seqused_k, out, lse, num_splits,
                  softmax_scale=prob.softmax_scale, causal=prob.causal,
                  combine_in_kernel=DECODE_COMBINE_IN_KERNEL if combine_in_kernel is None else combine_in_kernel)
    return out, (lse if return_lse else None)


class Launch(NamedTuple):
    """One kernel launch of a split: its (virtual) batch and where its partials go."""

    q: torch.Tensor  # [vbatch, seqlen_q, heads, d]
    page_table: torch.Tensor  # int32 [vbatch, pages]
    seqused_k: torch.Tensor  # int32 [vbatch]
    causal: bool
    parts: slice  # its entries of the partial-result buffers ([parts, batch, ...])


def split_launches(q: torch.Tensor, page_table: torch.Tensor, seqused_k: torch.Tensor, causal: bool,
                   page_size: int, num_splits: int) -> tuple[list[Launch], torch.Tensor]:
    """The launches of a ``num_splits``-way split (see the module docstring), as device tensors
    (no sync), and a bool ``[parts, batch]`` that is True where a chunk holds no key."""
    batch, seqlen_q = q.shape[:2]
    max_pages = page_table.shape[1]
    tail = causal and seqlen_q > 1
    n_prefix = num_splits
    pages_per_chunk = -(-max_pages // n_prefix)
    n_prefix = -(-max_pages // pages_per_chunk)  # no chunk that starts past the table
    chunk_keys = pages_per_chunk * page_size
    # int32 throughout (seqused_k is): on the GPU each op here is a launch, paid in host time per call
    used = seqused_k
    if tail:
        prefix_pages = (used - seqlen_q).clamp_min(0) // page_size
        prefix = prefix_pages * page_size
    else:
        prefix = used
    starts = torch.arange(0, n_prefix * chunk_keys, chunk_keys, dtype=torch.int32, device=q.device)
    chunk_used = (prefix.view(1, -1) - starts.view(-1, 1)).clamp(0, chunk_keys)  # [n_prefix, batch]
    table = page_table
    if n_prefix * pages_per_chunk != max_pages:
        table = F.pad(page_table, (0, n_prefix * pages_per_chunk - max_pages))
    table = table.view(batch, n_prefix, pages_per_chunk).transpose(0, 1)
    vb = n_prefix * batch  # chunk-major: entry j * batch + b
    launches = [Launch(
        q.unsqueeze(0).expand(n_prefix, *q.shape).reshape(vb, *q.shape[1:]),
        table.reshape(vb, pages_per_chunk), chunk_used.view(vb), False, slice(0, n_prefix),
    )]
    empty = chunk_used == 0
    if tail:
        tail_pages = -(-(page_size + seqlen_q - 1) // page_size)
        # int64, as gather takes its indices
        first = prefix_pages.view(-1, 1) + torch.arange(tail_pages, device=q.device).view(1, -1)
        tail_used = used - prefix
        launches.append(Launch(q, page_table.gather(1, first.clamp_max(max_pages - 1)), tail_used, True,
                               slice(n_prefix, n_prefix + 1)))
        empty = torch.cat([empty, (tail_used == 0).view(1, -1)])
    return launches, empty


def _run_split(prob, num_splits: Optional[int], return_lse: bool, lam: Optional[torch.Tensor] = None,
               want_stats: bool = True, **knobs):
    """The packed-KV kernel over the split's launches, merged by ``kernels/combine.py``. With
    ``lam`` (skip-softmax) also returns the summed ``SkipStats`` (None unless ``want_stats``: the
    kernel writes its counters either way, summing them costs a few small launches). ``knobs``
    are ``packed_attention``'s private ablation arguments (``_ablate``, ``_tiles``)."""
    from .kernels.launch import packed_attention, sm90_tile_n, split_combine

    q, k, v = prob.q, prob.k, prob.v
    batch, seqlen_q, heads, d = q.shape
    kv_heads, page_size = k.shape[2], k.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(q, k, v, prob.page_table)
    # one tile a CTA: the splits fill the GPU, and the persistent scheduler was measured on prefill only
    common = dict(softmax_scale=prob.softmax_scale, window_size=(None, None), _persistent=False, **knobs)
    rows = seqlen_q * (heads // kv_heads)  # packed query rows per (sequence, KV head)
    if num_splits == 1 and lam is None:
        return packed_attention(q, k, v, causal=prob.causal, page_table=prob.page_table,
                                seqused_k=prob.seqused_k, return_lse=return_lse, **common)
    if num_splits == 1:
        launches = [Launch(q, prob.page_table, prob.seqused_k, prob.causal, slice(0, 1))]
        empty = (prob.seqused_k == 0).view(1, batch)
    else:
        launches, empty = split_launches(q, prob.page_table, prob.seqused_k, prob.causal, page_size, num_splits)
    parts = empty.shape[0]
    stats = None
    if lam is not None:
        log2_lam = torch.log2(lam)  # 0 -> -inf: nothing is skipped
        stats = torch.empty(parts, batch, kv_heads, 2 * math.ceil(rows / SM90_TILE_M), 2, dtype=torch.int32,
                            device=q.device)  # every tile writes its counters
    single = num_splits == 1
    out_part = torch.empty(q.shape if single else (parts, *q.shape), dtype=q.dtype, device=q.device)
    lse_part = None
    if return_lse or not single:
        lse_part = torch.empty(parts, batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    for ln in launches:
        vb = ln.q.shape[0]
        n = ln.parts.stop - ln.parts.start
        skip = {}
        if lam is not None:
            skip = dict(skip_log2_threshold=log2_lam if n == 1 else log2_lam.repeat(n),
                        skip_stats=stats.narrow(0, ln.parts.start, n).view(vb, *stats.shape[2:]))
        packed_attention(ln.q, k, v, causal=ln.causal, page_table=ln.page_table, seqused_k=ln.seqused_k,
                         out=out_part if single else out_part.narrow(0, ln.parts.start, n).view(vb, seqlen_q, heads, d),
                         lse=None if lse_part is None else lse_part.narrow(0, ln.parts.start, n).view(vb, heads, seqlen_q),
                         **skip, **common)
    if single:
        out, lse = out_part, (lse_part.select(0, 0) if return_lse else None)
    else:
        # A chunk without keys (a short sequence beside long ones) gets no weight in the combine.
        lse_part.masked_fill_(empty.view(parts, batch, 1, 1), float("-inf"))
        out = torch.empty_like(q)
        lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
        # Our combine (kernels/combine.py) reads the partials in q's dtype as they are: FA4's
        # merges bf16/fp16 partials wrongly (docs/UPSTREAM.md) and needed a float32 copy of them.
        split_combine(out_part, lse_part, out, lse)
        lse = lse if return_lse else None
    if lam is None:
        return out, lse
    if not want_stats:
        return out, lse, None
    # Per 64-row vote group, summed over the chunks that hold keys (an empty chunk's tile visits
    # nothing); the second warpgroup's counts are dropped where it has no rows.
    # (narrow/select, not slicing: they also run on the fake tensors of CPU compile checks)
    stats = stats.masked_fill(empty.view(parts, batch, 1, 1, 1), 0).sum(0).narrow(2, 0, math.ceil(rows / ROWS_PER_VOTE))
    skipped, blocks = stats.select(-1, 0).long(), stats.select(-1, 1).long()
    eps = skipped.double() * sm90_tile_n(d, k.bits, v.bits) * lam.double().view(-1, 1, 1)
    return out, lse, SkipStats(skipped, blocks, eps)
