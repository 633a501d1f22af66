"""Skip-softmax (BLASST, DESIGN section 2): the oracle that fixes its semantics and its error bound.

It runs FA4's online softmax block by block, in FA4's order (the last KV block first, down to
the first), per (sequence, KV head) over the ``seqlen_q x heads/kv_heads`` query rows that
pack-GQA packs together, in vote groups of ``rows_per_vote`` consecutive rows (64: one consumer
warpgroup of the SM90 kernel, ``kernels/skip_softmax.py``). A block is skipped for a group when
every row of it agrees that ``exp(block_max - running_max) < threshold``: no exp, no row-sum, no
P.V, no running-max update. The first block is never skipped. ``flash_attn_with_kvcache`` runs
this oracle as its CPU backend; the kernel follows it (its split-KV chunks each start their own
online softmax, so it may skip other blocks than the unsplit oracle, inside the same bound).

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
from typing import NamedTuple, Optional, Union

import torch

from .codec import PackedKV, rotate, unrotate
from .reference import _sequences_k

__all__ = ["SkipStats", "skip_softmax_attention"]


class SkipStats(NamedTuple):
    skipped: torch.Tensor  # int64 [batch, kv_heads, groups]: blocks skipped per vote group
    blocks: torch.Tensor  # int64 [batch, kv_heads, groups]: blocks the group visited
    eps: torch.Tensor  # float64 [batch, kv_heads, groups]: skipped * tile_n * lambda (the mass bound)

    def row_eps(self, seqlen_q: int, group: int, rows_per_vote: int = 64) -> torch.Tensor:
        """eps of every query row, ``[batch, seqlen_q, heads]`` (rows packed (token, head))."""
        rows = torch.arange(seqlen_q * group, device=self.eps.device) // rows_per_vote
        e = self.eps[:, :, rows]  # [batch, kv_heads, seqlen_q * group]
        return e.view(*e.shape[:2], seqlen_q, group).permute(0, 2, 1, 3).reshape(e.shape[0], seqlen_q, -1)


def skip_softmax_attention(
    q: torch.Tensor,
    k: PackedKV,
    v: PackedKV,
    page_table: torch.Tensor,
    seqused_k: torch.Tensor,
    *,
    threshold: Union[float, torch.Tensor, None] = None,
    threshold_scale_factor: Optional[float] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    tile_n: int = 128,
    rows_per_vote: int = 64,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, SkipStats]:
    """Decode/verification attention with skip-softmax on a paged packed cache (layouts as
    ``flash_attn_with_kvcache``). Give ``threshold`` (one lambda for every sequence, or a tensor
    ``[batch]`` of them) or ``threshold_scale_factor`` (lambda = factor / seqlen_k of each
    sequence). Returns ``(out,
    lse, stats)``; a threshold or factor of 0 skips nothing."""
    if (threshold is None) == (threshold_scale_factor is None):
        raise ValueError("give exactly one of threshold and threshold_scale_factor")
    if isinstance(threshold, torch.Tensor):
        # values >= 1 are allowed here: threshold_scale_factor / seqlen_k gives them for short sequences
        if threshold.shape != (q.shape[0],) or not bool(((threshold >= 0) & (threshold < math.inf)).all()):
            raise ValueError(f"a threshold tensor must be [batch] = [{q.shape[0]}] of finite values >= 0")
    elif threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold must be a float in [0, 1) or a [batch] tensor, got {threshold!r}")
    if not (isinstance(rows_per_vote, int) and rows_per_vote >= 1):
        raise ValueError(f"rows_per_vote must be a positive int, got {rows_per_vote!r}")
    if threshold_scale_factor is not None and not (
            isinstance(threshold_scale_factor, (int, float)) and threshold_scale_factor >= 0):
        raise ValueError(f"threshold_scale_factor must be a float >= 0, got {threshold_scale_factor!r}")
    batch, seqlen_q, heads, d = q.shape
    kv_heads = k.shape[-2]
    group = heads // kv_heads
    n_rows = seqlen_q * group
    groups = -(-n_rows // rows_per_vote)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_rot = rotate(q.to(dtype), k.seed).to(dtype)
    ks = _sequences_k(k.decompress_rotated(dtype), batch, None, seqused_k, page_table)
    vs = _sequences_k(v.decompress_rotated(dtype), batch, None, seqused_k, page_table)
    out = torch.zeros(batch, seqlen_q, heads, d, dtype=dtype, device=q.device)
    lse = torch.empty(batch, heads, seqlen_q, dtype=dtype, device=q.device)
    skipped = torch.zeros(batch, kv_heads, groups, dtype=torch.int64)
    blocks = torch.zeros(batch, kv_heads, groups, dtype=torch.int64)
    lam = torch.zeros(batch, 1, dtype=torch.float64)  # each sequence's lambda
    for b in range(batch):
        n = ks[b].shape[0]
        if isinstance(threshold, torch.Tensor):
            lam[b] = float(threshold[b])
        else:
            lam[b] = threshold if threshold is not None else (threshold_scale_factor / n if n else 0.0)
        # query s sees keys t <= n - seqlen_q + s (bottom-right aligned)
        limit = (n - seqlen_q + torch.arange(seqlen_q, device=q.device)).repeat_interleave(group)
        for h in range(kv_heads):
            rows_all = q_rot[b, :, h * group:(h + 1) * group].reshape(-1, d)  # (s, head) order
            o_rows = torch.empty(n_rows, d, dtype=dtype, device=q.device)
            lse_rows = torch.empty(n_rows, dtype=dtype, device=q.device)
            for g in range(groups):
                sel = slice(g * rows_per_vote, min((g + 1) * rows_per_vote, n_rows))
                rows, lim = rows_all[sel], limit[sel]
                m = torch.full((rows.shape[0],), -math.inf, dtype=dtype, device=q.device)
                l_sum = torch.zeros_like(m)
                acc = torch.zeros(rows.shape[0], d, dtype=dtype, device=q.device)
                for j in reversed(range(-(-n // tile_n))):
                    keys = torch.arange(j * tile_n, min((j + 1) * tile_n, n), device=q.device)
                    s = scale * rows @ ks[b][keys, h].T
                    if causal:
                        s = s.masked_fill(keys.view(1, -1) > lim.view(-1, 1), -math.inf)
                    m_blk = s.amax(1)
                    blocks[b, h, g] += 1
                    if blocks[b, h, g] > 1 and bool((torch.exp(m_blk - m) < float(lam[b])).all()):
                        skipped[b, h, g] += 1
                        continue
                    m_new = torch.maximum(m, m_blk)
                    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                    p = torch.exp(s - safe.view(-1, 1))
                    alpha = torch.exp(m - safe)
                    l_sum = l_sum * alpha + p.sum(1)
                    acc = acc * alpha.view(-1, 1) + p @ vs[b][keys, h]
                    m = m_new
                o_rows[sel] = acc / l_sum.view(-1, 1)
                lse_rows[sel] = m + torch.log(l_sum)
            out[b, :, h * group:(h + 1) * group] = o_rows.view(seqlen_q, group, d)
            lse[b, h * group:(h + 1) * group] = lse_rows.view(seqlen_q, group).T
    eps = skipped.double() * tile_n * lam.view(-1, 1, 1)
    return unrotate(out, v.seed).to(dtype), lse, SkipStats(skipped, blocks, eps)


def peaked_attention_inputs(
    lens,
    seqlen_q: int,
    heads: int,
    kv_heads: int,
    d: int,
    *,
    generator: torch.Generator,
    recent: int = 32,
    peak: float = 14.0,
    sink: float = 10.0,
    outlier_channels: int = 4,
    outlier_scale: float = 8.0,
):
    """A decode/verification workload whose attention is peaked the way LLM attention often is,
    for testing and benchmarking skip-softmax (on i.i.d. Gaussian data no block is ever skippable).

    Every query of KV head ``h`` is ``sqrt(d) u_h`` plus small noise; keys are Gaussian with a
    few heavy-tailed channels. The ``recent`` keys before the new tokens and the new tokens
    themselves carry ``peak * u_h`` (logit about ``peak`` at the default softmax scale), the
    first 4 keys (a sink) ``sink * u_h``; the bulk's logits are of order 1-3. Values are Gaussian.

    Returns ``q`` float32 ``[batch, seqlen_q, heads, d]`` and the raw ``[(k, v)]`` of each sequence
    (``[n, kv_heads, d]`` float32), for ``PagedKVCache.write``, on the generator's device."""
    dev = generator.device
    u = torch.nn.functional.normalize(torch.randn(kv_heads, d, generator=generator, device=dev), dim=-1)
    group = heads // kv_heads
    q = 0.1 * torch.randn(len(lens), seqlen_q, heads, d, generator=generator, device=dev)
    q += math.sqrt(d) * u.repeat_interleave(group, 0)
    raw = []
    for n in lens:
        k = torch.randn(n, kv_heads, d, generator=generator, device=dev)
        k[..., torch.randperm(d, generator=generator, device=dev)[:outlier_channels]] *= outlier_scale
        weight = torch.zeros(n, device=dev)
        weight[:4] = sink
        weight[max(n - seqlen_q - recent, 0):] = peak
        k += weight.view(n, 1, 1) * u
        raw.append((k, torch.randn(n, kv_heads, d, generator=generator, device=dev)))
    return q, raw
