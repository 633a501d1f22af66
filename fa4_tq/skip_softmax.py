"""Skip-softmax (BLASST, DESIGN section 2): the oracle that fixes its semantics and its error bound.

The kernel does not skip yet (``flash_attn_with_kvcache`` rejects a threshold); this is what it
will be tested against. It runs FA4's online softmax block by block, in FA4's order (the last KV
block first, down to the first), over one tile of query rows per (sequence, KV head): the
``seqlen_q x heads/kv_heads`` rows that pack-GQA puts in one 128-row tile. A block is skipped when
every row of the tile agrees that ``exp(block_max - running_max) < threshold``: no exp, no row-sum,
no P.V, no running-max update (and, in the kernel, no V load). The first block is never skipped.

Bound. A skipped block's weight in a row is at most ``tile_n * threshold * exp(running_max)``, and
the final row sum is at least ``exp(running_max)`` of that moment (the running max only grows and
its own key weighs 1), so the skipped fraction of a row's softmax mass is at most
``eps = n_skipped * tile_n * threshold``. The output moves by that fraction times the distance
between the skipped and kept averages of V: ``||out - dense|| <= 2 * eps * max_t ||v_t||`` per row
(norms: the rotation preserves them), and the LSE by at most ``-log(1 - eps)``.

The ecosystem's knob (FlashInfer's ``skip_softmax_threshold_scale_factor``, TensorRT-LLM's
``threshold_scale_factor``) is a scale factor: ``threshold = scale_factor / seqlen_k`` per
sequence. Since a sequence has at most ``ceil(seqlen_k / tile_n)`` blocks, its ``eps`` is then at
most ``scale_factor * tile_n * ceil(seqlen_k / tile_n) / seqlen_k``, about ``scale_factor`` at
any context length: the factor bounds the fraction of softmax mass that can be dropped.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .codec import PackedKV, rotate, unrotate
from .reference import _sequences_k

__all__ = ["SkipStats", "skip_softmax_attention"]


class SkipStats(NamedTuple):
    skipped: torch.Tensor  # int64 [batch, kv_heads]: blocks skipped per query tile
    blocks: torch.Tensor  # int64 [batch, kv_heads]: blocks the tile visited
    eps: torch.Tensor  # float64 [batch, kv_heads]: skipped * tile_n * lambda (the mass bound)


def skip_softmax_attention(
    q: torch.Tensor,
    k: PackedKV,
    v: PackedKV,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    *,
    threshold: Optional[float] = None,
    threshold_scale_factor: Optional[float] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    tile_n: int = 128,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, SkipStats]:
    """Decode/verification attention with skip-softmax on a paged packed cache (layouts as
    ``flash_attn_with_kvcache``). Give ``threshold`` (one lambda for every sequence) or
    ``threshold_scale_factor`` (lambda = factor / seqlen_k of each sequence). Returns ``(out,
    lse, stats)``; a threshold or factor of 0 skips nothing."""
    if (threshold is None) == (threshold_scale_factor is None):
        raise ValueError("give exactly one of threshold and threshold_scale_factor")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold must be a float in [0, 1), got {threshold!r}")
    if threshold_scale_factor is not None and not (
            isinstance(threshold_scale_factor, (int, float)) and threshold_scale_factor >= 0):
        raise ValueError(f"threshold_scale_factor must be a float >= 0, got {threshold_scale_factor!r}")
    batch, seqlen_q, heads, d = q.shape
    kv_heads = k.shape[-2]
    group = heads // kv_heads
    if seqlen_q * group > 128:
        raise ValueError(
            f"seqlen_q x heads/kv_heads = {seqlen_q * group} rows: the oracle models one 128-row "
            f"query tile per (sequence, KV head), as pack-GQA gives for decode and verification"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_rot = rotate(q.to(dtype), k.seed).to(dtype)
    ks = _sequences_k(k.decompress_rotated(dtype), batch, None, seqused_k, page_table)
    vs = _sequences_k(v.decompress_rotated(dtype), batch, None, seqused_k, page_table)
    out = torch.zeros(batch, seqlen_q, heads, d, dtype=dtype, device=q.device)
    lse = torch.empty(batch, heads, seqlen_q, dtype=dtype, device=q.device)
    skipped = torch.zeros(batch, kv_heads, dtype=torch.int64)
    blocks = torch.zeros(batch, kv_heads, dtype=torch.int64)
    lam = torch.zeros(batch, 1, dtype=torch.float64)  # each sequence's lambda
    for b in range(batch):
        n = ks[b].shape[0]
        lam[b] = threshold if threshold is not None else (threshold_scale_factor / n if n else 0.0)
        # query s sees keys t <= n - seqlen_q + s (bottom-right aligned)
        limit = (n - seqlen_q + torch.arange(seqlen_q, device=q.device)).repeat_interleave(group)
        for h in range(kv_heads):
            rows = q_rot[b, :, h * group:(h + 1) * group].reshape(-1, d)  # (s, head) order
            m = torch.full((rows.shape[0],), -math.inf, dtype=dtype, device=q.device)
            l_sum = torch.zeros_like(m)
            acc = torch.zeros(rows.shape[0], d, dtype=dtype, device=q.device)
            for j in reversed(range(-(-n // tile_n))):
                keys = torch.arange(j * tile_n, min((j + 1) * tile_n, n), device=q.device)
                s = scale * rows @ ks[b][keys, h].T
                if causal:
                    s = s.masked_fill(keys.view(1, -1) > limit.view(-1, 1), -math.inf)
                m_blk = s.amax(1)
                blocks[b, h] += 1
                if blocks[b, h] > 1 and bool((torch.exp(m_blk - m) < float(lam[b])).all()):
                    skipped[b, h] += 1
                    continue
                m_new = torch.maximum(m, m_blk)
                safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - safe.view(-1, 1))
                alpha = torch.exp(m - safe)
                l_sum = l_sum * alpha + p.sum(1)
                acc = acc * alpha.view(-1, 1) + p @ vs[b][keys, h]
                m = m_new
            o = acc / l_sum.view(-1, 1)
            out[b, :, h * group:(h + 1) * group] = o.view(seqlen_q, group, d)
            lse[b, h * group:(h + 1) * group] = (m + torch.log(l_sum)).view(seqlen_q, group).T
    eps = skipped.double() * tile_n * lam
    return unrotate(out, v.seed).to(dtype), lse, SkipStats(skipped, blocks, eps)
