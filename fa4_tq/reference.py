"""Reference attention over TurboQuant-packed K/V: the oracle every kernel is tested against.

Plain PyTorch in float32 (or float64), one sequence at a time, no tricks. It works where the
kernels work, in the rotated space: the query is rotated with K's seed, scores are
``scale · q_rot · k_hat_rot^T``, the output ``softmax · v_hat_rot`` is rotated back with V's seed.
That equals attention of ``q`` over ``k.decompress()``/``v.decompress()`` in exact arithmetic
(tests/test_reference.py checks it against torch SDPA).

Conventions are FlashAttention's: when seqlen_q != seqlen_k the causal diagonal is aligned to the
bottom right; ``window_size=(left, right)`` keeps key j for query i when
``i + sk - sq - left <= j <= i + sk - sq + right`` (None = unbounded); a query row that sees no
key gets output 0 and LSE -inf. LSE is the natural log of the row sum of ``exp(scores)``, shaped
``[batch, heads, seqlen_q]`` for batched queries and ``[heads, total_q]`` for varlen queries.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .codec import PackedKV, rotate, unrotate

__all__ = ["attention_reference", "attention_dense", "attention_dense_batched", "resolve_window"]


def resolve_window(causal: bool, window_size) -> tuple[Optional[int], Optional[int]]:
    """(left, right) with None = unbounded; causal means right = 0 (FlashAttention's rule)."""
    left, right = window_size
    if left is not None and right is not None and left < 0 and right < 0:
        left, right = None, None
    if left is not None and left < 0:
        left = None
    if right is not None and right < 0:
        right = None
    if causal:
        right = 0
    return left, right


def attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    window: tuple[Optional[int], Optional[int]] = (None, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q[sq, H, d], k[sk, Hk, d], v[sk, Hk, dv] -> (out[sq, H, dv], lse[H, sq])."""
    sq, nheads, _ = q.shape
    sk, nheads_k, _ = k.shape
    group = nheads // nheads_k
    kh = k.repeat_interleave(group, dim=1)
    vh = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kh) * softmax_scale
    left, right = window
    if left is not None or right is not None:
        i = torch.arange(sq, device=q.device).view(sq, 1) + (sk - sq)
        j = torch.arange(sk, device=q.device).view(1, sk)
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if right is not None:
            keep &= j <= i + right
        if left is not None:
            keep &= j >= i - left
        scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [H, sq]; -inf for rows with no key
    finite = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
    out = torch.einsum("hqk,khd->qhd", p, vh)
    return out, lse


def attention_dense_batched(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: Sequence[Optional[int]] = (None, None),
    softmax_scale: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked attention, q[b, sq, H, d] over k/v[b, sk, Hk, d], in ``dtype``: the exact answer
    that baselines (bf16 FA4, the demo's error table) are measured against."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    window = resolve_window(causal, window_size)
    pairs = [
        attention_dense(q[b].to(dtype), k[b].to(dtype), v[b].to(dtype), softmax_scale=scale, window=window)
        for b in range(q.shape[0])
    ]
    return torch.stack([o for o, _ in pairs]), torch.stack([l for _, l in pairs])


def _sequences_k(
    k_rot: torch.Tensor,
    batch: int,
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    page_table: Optional[torch.Tensor],
) -> list[torch.Tensor]:
    """Split decoded K (or V) into one [sk_b, Hk, d] tensor per batch entry."""
    out = []
    for b in range(batch):
        if page_table is not None:
            page_size = k_rot.shape[1]
            n = int(seqused_k[b])
            pages = page_table[b, : -(-n // page_size)].long()
            out.append(k_rot[pages].reshape(-1, *k_rot.shape[2:])[:n])
        elif cu_seqlens_k is not None:
            out.append(k_rot[int(cu_seqlens_k[b]) : int(cu_seqlens_k[b + 1])])
        else:
            n = int(seqused_k[b]) if seqused_k is not None else k_rot.shape[1]
            out.append(k_rot[b, :n])
    return out


def attention_reference(
    q: torch.Tensor,
    k: PackedKV,
    v: PackedKV,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[Optional[int]] = (None, None),
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over packed ``k``/``v``; returns ``(out, lse)`` in ``dtype``.

    Layouts (as in flash_attn.cute):
      q  [batch, seqlen_q, heads, d], or [total_q, heads, d] with ``cu_seqlens_q``;
      k/v shape [batch, seqlen_k, kv_heads, d], or [total_k, kv_heads, d] with ``cu_seqlens_k``,
      or pages [num_pages, page_size, kv_heads, d] with ``page_table`` [batch, max_pages] and
      ``seqused_k`` [batch]. ``seqused_k`` may also trim a batched K/V.
    Inputs are assumed valid: the public functions in ``fa4_tq.interface`` check them.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    window = resolve_window(causal, window_size)
    q_rot = rotate(q.to(dtype), k.seed).to(dtype)
    k_rot = k.decompress_rotated(dtype)
    v_rot = v.decompress_rotated(dtype)

    varlen_q = cu_seqlens_q is not None
    if varlen_q:
        batch = cu_seqlens_q.numel() - 1
        qs = [q_rot[int(cu_seqlens_q[b]) : int(cu_seqlens_q[b + 1])] for b in range(batch)]
    else:
        batch = q.shape[0]
        qs = list(q_rot.unbind(0))
    ks = _sequences_k(k_rot, batch, cu_seqlens_k, seqused_k, page_table)
    vs = _sequences_k(v_rot, batch, cu_seqlens_k, seqused_k, page_table)

    outs, lses = [], []
    for qb, kb, vb in zip(qs, ks, vs):
        o, lse = attention_dense(qb, kb, vb, softmax_scale=scale, window=window)
        outs.append(o)
        lses.append(lse)
    if varlen_q:
        out_rot = torch.cat(outs, 0) if outs else q_rot.new_zeros(0, q.shape[1], v.head_dim)
        lse = torch.cat(lses, 1) if lses else q_rot.new_zeros(q.shape[1], 0)
    else:
        out_rot = torch.stack(outs, 0)
        lse = torch.stack(lses, 0)
    return unrotate(out_rot, v.seed).to(dtype), lse
