"""Reference MLA prefill: plain PyTorch in float32/float64, the oracle the kernel is tested against.

Per sequence: keys are ``[latent, k_pe]`` (576 wide), values the latent (512), all heads read the
one latent (MQA); scores ``scale * (q_nope . c + q_pe . k_pe)``; causal is aligned to the bottom
right (the queries are the last ``seqlen_q`` of the ``seqused_k`` tokens, chunked prefill). A
packed latent is decoded to the original space (``PackedKV.decompress``): the kernel works in the
rotated space, which is the same in exact arithmetic.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fa4_tq.codec import PackedKV
from fa4_tq.reference import attention_dense

__all__ = ["mla_reference"]


def mla_reference(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: Union[torch.Tensor, PackedKV],
    rope_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out[total_q, heads, 512], lse[heads, total_q])`` in ``dtype``; shapes as in
    ``mla.flash_mla_prefill``. Rows that see no key get output 0 and LSE -inf."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_nope.shape[-1] + q_pe.shape[-1])
    page_size = rope_cache.shape[1]
    used = seqused_k.detach().to("cpu", torch.int64)
    cu = cu_seqlens_q.detach().to("cpu", torch.int64)
    q = torch.cat([q_nope, q_pe], dim=-1).to(dtype)
    window = (None, 0) if causal else (None, None)
    outs, lses = [], []
    for b in range(cu.numel() - 1):
        n = int(used[b])
        pages = page_table[b, : -(-n // page_size)].long()  # only the pages this sequence reads
        if isinstance(latent_cache, PackedKV):
            lat = PackedKV(latent_cache.data[pages], latent_cache.scales[pages], latent_cache.bits,
                           latent_cache.head_dim, latent_cache.seed).decompress(dtype)
        else:
            lat = latent_cache[pages].to(dtype)
        lat = lat.reshape(-1, 1, lat.shape[-1])[:n].to(q.device)
        rope = rope_cache[pages].to(dtype).reshape(-1, 1, rope_cache.shape[-1])[:n].to(q.device)
        o, lse = attention_dense(q[int(cu[b]) : int(cu[b + 1])], torch.cat([lat, rope], -1), lat,
                                 softmax_scale=scale, window=window)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, causal: bool,
                   rows_per_chunk: int = 8192) -> torch.Tensor:
    """Plain PyTorch bf16 MLA for one sequence: ``q[sq, heads, 576]``, ``k[sk, 576]``, ``v[sk, 512]``
    (bf16) -> ``out[sq, heads, 512]`` bf16. bf16 matmuls, float32 softmax, P rounded to bf16, the
    query rows in chunks so the score matrix stays small. It is ``perf/bench_mla.py``'s PyTorch
    baseline and the tests' yardstick for what a bf16 attention's rounding costs."""
    sq, heads, _ = q.shape
    sk = k.shape[0]
    qf = q.reshape(sq * heads, q.shape[-1])
    out = torch.zeros(sq * heads, v.shape[-1], dtype=torch.bfloat16, device=q.device)
    cols = torch.arange(sk, device=q.device)
    for r0 in range(0, sq * heads, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, sq * heads)
        s = (qf[r0:r1] @ k.T).float() * softmax_scale
        if causal:
            token = torch.arange(r0, r1, device=q.device) // heads
            s.masked_fill_(cols.view(1, -1) > (token + sk - sq).view(-1, 1), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows with no key: 0
        out[r0:r1] = p.to(torch.bfloat16) @ v
    return out.view(sq, heads, v.shape[-1])
