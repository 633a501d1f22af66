"""Public attention API on packed K/V, mirroring flash_attn.cute.flash_attn_func /
flash_attn_varlen_func: same argument names and layouts, same ``(out, lse)`` return.

Backends (``backend=``):
- ``"reference"``: fa4_tq.reference in float32, on any device (what CPU tensors get with "auto").
- ``"decompress"``: the honest baseline on CUDA: decode the packed K/V to a bf16/fp16 scratch in
  the rotated space, run FlashAttention-4 on it, rotate the output back. It materialises the
  scratch the inline-dequant kernel exists to avoid; it stays selectable for comparisons.
- ``"inline"``: the packed-KV kernel (``fa4_tq.kernels``): FA4's SM90 forward with a load stage that
  dequantises packed K/V inside the kernel, and the query rotation / output un-rotation done by
  its consumer warpgroups (no extra pass over q or o). Hopper (SM 9.x), head_dim 64/128/256.
- ``"auto"``: "inline" on a GPU it supports, else "decompress" on CUDA, "reference" on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

from . import validation as V
from .codec import PackedKV, rotate_rounded, unrotate_rounded
from .reference import attention_reference

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "BACKENDS"]

BACKENDS = ("auto", "reference", "decompress", "inline")


@dataclasses.dataclass
class _Problem:
    q: torch.Tensor
    k: PackedKV
    v: PackedKV
    batch: int
    softmax_scale: float
    causal: bool
    window_size: tuple
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    page_table: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None


def _check_window(window_size) -> tuple:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of int or None, got {window_size!r}")
    for w in window_size:
        if w is not None and (isinstance(w, bool) or not isinstance(w, int)):
            raise TypeError(f"window_size entries must be int or None, got {window_size!r}")
    return tuple(window_size)


def _check_common(q, k, v, softmax_scale, window_size) -> None:
    V.check_query(q)
    V.check_packed("k", k)
    V.check_packed("v", v)
    if q.shape[-1] != k.head_dim:
        raise ValueError(
            f"q has head_dim {q.shape[-1]} but k was packed with head_dim {k.head_dim}: they must match"
        )
    if v.head_dim != k.head_dim:
        raise ValueError(f"v has head_dim {v.head_dim} but k has {k.head_dim}: they must match")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same leading shape (tokens, kv_heads), got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    for name, p in (("k", k), ("v", v)):
        if p.device != q.device:
            raise ValueError(f"{name} is on {p.device} but q is on {q.device}: use {name}.to(q.device)")
        V.check_buffers(name, p)
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(
            f"q has {nheads} heads, which is not a multiple of the {nheads_k} KV heads of k/v "
            f"(GQA/MQA need heads % kv_heads == 0)"
        )
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    _check_window(window_size)


def _scale(q, softmax_scale) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attn_func(
    q: torch.Tensor,
    k: PackedKV,
    v: PackedKV,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[Optional[int]] = (None, None),
    return_lse: bool = False,
    *,
    backend: str = "auto",
):
    """Attention of ``q[batch, seqlen_q, heads, d]`` over packed ``k``/``v`` of shape
    ``[batch, seqlen_k, kv_heads, d]``. Returns ``(out, lse)``: ``out`` like ``q``, ``lse``
    float32 ``[batch, heads, seqlen_q]`` or None unless ``return_lse``."""
    _check_common(q, k, v, softmax_scale, window_size)
    if q.dim() != 4:
        raise ValueError(
            f"q must be [batch, seqlen_q, heads, head_dim], got {q.dim()} dims: for packed "
            f"sequences use fa4_tq.flash_attn_varlen_func"
        )
    if len(k.shape) != 4 or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"k and v must be [batch, seqlen_k, kv_heads, head_dim] with q's batch {q.shape[0]}, "
            f"got {tuple(k.shape)}"
        )
    prob = _Problem(q, k, v, q.shape[0], _scale(q, softmax_scale), bool(causal), tuple(window_size))
    return _run(prob, return_lse, backend)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: PackedKV,
    v: PackedKV,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    seqused_k: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[Optional[int]] = (None, None),
    return_lse: bool = False,
    *,
    backend: str = "auto",
    check_indices: bool = True,
):
    """Variable-length and paged attention on packed K/V (flash_attn_varlen_func's layouts).

    q: ``[total_q, heads, d]`` with ``cu_seqlens_q`` [batch+1], or ``[batch, seqlen_q, heads, d]``.
    k, v: ``[total_k, kv_heads, d]`` with ``cu_seqlens_k``; or pages
    ``[num_pages, page_size, kv_heads, d]`` with ``page_table`` [batch, max_pages] and
    ``seqused_k`` [batch]; or ``[batch, seqlen_k, kv_heads, d]`` (``seqused_k`` optional).
    Index tensors are int32 on q's device. ``check_indices`` checks their values (cu_seqlens
    monotone, lengths and page ids in range) by copying them to the host, which synchronises with
    the device; pass False when the caller guarantees them (inside a CUDA graph, say). Returns ``(out, lse)``; ``lse`` is
    ``[heads, total_q]`` for varlen q, ``[batch, heads, seqlen_q]`` for batched q.
    """
    prob = _varlen_problem(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table,
        softmax_scale, causal, window_size, check_indices,
    )
    return _run(prob, return_lse, backend)


def _varlen_problem(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table,
    softmax_scale, causal, window_size, check_indices: bool, min_seqused_k: int = 0, min_seqused_why: str = "",
) -> _Problem:
    """flash_attn_varlen_func's checks (shared with fa4_tq.decode, which also needs every
    seqused_k >= ``min_seqused_k``, for the reason ``min_seqused_why``); returns the checked problem."""
    _check_common(q, k, v, softmax_scale, window_size)
    dev = q.device
    if cu_seqlens_q is not None:
        if q.dim() != 3:
            raise ValueError(f"with cu_seqlens_q, q must be [total_q, heads, head_dim], got {q.dim()} dims")
        if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
            raise ValueError("cu_seqlens_q must be a 1-D int32 tensor of batch + 1 offsets")
        batch = cu_seqlens_q.numel() - 1
        V.check_index_tensor("cu_seqlens_q", cu_seqlens_q, (batch + 1,), dev)
    else:
        if q.dim() != 4:
            raise ValueError(
                f"without cu_seqlens_q, q must be [batch, seqlen_q, heads, head_dim], got {q.dim()} dims"
            )
        batch = q.shape[0]

    kshape = tuple(k.shape)
    if page_table is not None:
        if cu_seqlens_k is not None:
            raise ValueError("page_table and cu_seqlens_k exclude each other: give seqused_k with page_table")
        if seqused_k is None:
            raise ValueError("page_table needs seqused_k [batch] (the number of keys of each sequence)")
        if len(kshape) != 4:
            raise ValueError(
                f"with page_table, k and v must be pages [num_pages, page_size, kv_heads, head_dim], "
                f"got {kshape}"
            )
        if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2:
            raise ValueError("page_table must be a 2-D int32 tensor [batch, max_pages_per_seq]")
        V.check_index_tensor("page_table", page_table, (batch, page_table.shape[1]), dev)
        V.check_index_tensor("seqused_k", seqused_k, (batch,), dev)
    elif cu_seqlens_k is not None:
        if len(kshape) != 3:
            raise ValueError(f"with cu_seqlens_k, k and v must be [total_k, kv_heads, head_dim], got {kshape}")
        if seqused_k is not None:
            raise ValueError("give either cu_seqlens_k or seqused_k for unpaged K/V, not both")
        V.check_index_tensor("cu_seqlens_k", cu_seqlens_k, (batch + 1,), dev)
    else:
        if len(kshape) != 4 or kshape[0] != batch:
            raise ValueError(
                f"k and v must be [batch={batch}, seqlen_k, kv_heads, head_dim] (or pass cu_seqlens_k "
                f"or page_table), got {kshape}"
            )
        V.check_index_tensor("seqused_k", seqused_k, (batch,), dev)

    if check_indices:
        if cu_seqlens_q is not None:
            V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        if cu_seqlens_k is not None:
            V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, kshape[0])
        if seqused_k is not None:
            cap = kshape[1] * page_table.shape[1] if page_table is not None else kshape[1]
            used = seqused_k.detach().to("cpu", torch.int64)
            if bool((used < 0).any()) or bool((used > cap).any()):
                raise ValueError(
                    f"seqused_k must lie in [0, {cap}] ("
                    + ("max_pages * page_size" if page_table is not None else "seqlen_k")
                    + f"), got {used.tolist()[:8]}"
                )
            if bool((used < min_seqused_k).any()):
                raise ValueError(
                    f"seqused_k must be >= {min_seqused_k} for every sequence{min_seqused_why}, got {used.tolist()[:8]}"
                )
            if page_table is not None:
                _check_page_table(page_table, used, kshape[0], kshape[1])

    return _Problem(
        q, k, v, batch, _scale(q, softmax_scale), bool(causal), tuple(window_size),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
        page_table=page_table, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )


def _check_page_table(page_table: torch.Tensor, used: torch.Tensor, num_pages: int, page_size: int):
    pt = page_table.detach().to("cpu", torch.int64)
    needed = (used + page_size - 1) // page_size  # pages each sequence reads
    cols = torch.arange(pt.shape[1]).view(1, -1)
    live = cols < needed.view(-1, 1)
    bad = live & ((pt < 0) | (pt >= num_pages))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"page_table[{b}, {j}] = {int(pt[b, j])} is out of range: every page a sequence reads "
            f"(the first ceil(seqused_k / page_size) entries of its row) must be in [0, {num_pages})"
        )


def _inline_unsupported(prob: _Problem, explicit: bool = False) -> Optional[str]:
    """Why the inline kernel cannot run this problem (None when it can). On Blackwell (SM 10.x)
    the kernel has only been compiled, never run (``kernels/sm100.py``): "auto" does not pick
    it, an explicit ``backend="inline"`` does."""
    from .kernels.launch import SUPPORTED_HEAD_DIMS

    dev = prob.q.device
    if dev.type != "cuda":
        return "it needs CUDA tensors"
    major = torch.cuda.get_device_capability(dev)[0]
    if major == 10:
        if not explicit:
            return "its SM100 kernel is compile-checked only, never run by this project (pass backend='inline')"
        if prob.k.head_dim not in (64, 128) or prob.cu_seqlens_k is not None:
            return "the SM100 kernel takes head_dim 64/128 and paged or batch-layout K/V"
        return None
    if major != 9:
        return f"it runs on Hopper (SM 9.x) and Blackwell (SM 10.x) only, this GPU is SM {major}.x"
    if prob.k.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"it supports head_dim {SUPPORTED_HEAD_DIMS}, got {prob.k.head_dim}"
    return None


def _resolve_backend(backend: str, prob: _Problem) -> str:
    device = prob.q.device
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        return "decompress" if _inline_unsupported(prob) else "inline"
    if backend == "inline":
        why = _inline_unsupported(prob, explicit=True)
        if why:
            raise ValueError(f"backend='inline' cannot run this call: {why}; use backend='decompress' or 'auto'")
        return backend
    if backend == "decompress" and device.type != "cuda":
        raise ValueError(
            "backend='decompress' runs FlashAttention-4 and needs CUDA tensors; on the CPU use "
            "backend='reference' (or 'auto')"
        )
    return backend


def _run(prob: _Problem, return_lse: bool, backend: str):
    return _run_resolved(prob, return_lse, _resolve_backend(backend, prob))


def _run_resolved(prob: _Problem, return_lse: bool, backend: str):
    """Run ``prob`` on a backend ``_resolve_backend`` returned ("reference", "inline", "decompress")."""
    if backend == "reference":
        out, lse = attention_reference(
            prob.q, prob.k, prob.v, softmax_scale=prob.softmax_scale, causal=prob.causal,
            window_size=prob.window_size, cu_seqlens_q=prob.cu_seqlens_q,
            cu_seqlens_k=prob.cu_seqlens_k, seqused_k=prob.seqused_k, page_table=prob.page_table,
        )
        return out.to(prob.q.dtype), (lse if return_lse else None)
    if backend == "inline":
        return _run_inline(prob, return_lse)
    return _run_decompress(prob, return_lse)


def _run_inline(prob: _Problem, return_lse: bool):
    from .kernels.launch import packed_attention  # needs the gpu extra: only here

    return packed_attention(
        prob.q, prob.k, prob.v,
        softmax_scale=prob.softmax_scale, causal=prob.causal, window_size=prob.window_size,
        cu_seqlens_q=prob.cu_seqlens_q, cu_seqlens_k=prob.cu_seqlens_k, seqused_k=prob.seqused_k,
        page_table=prob.page_table, return_lse=return_lse,
    )


def _decompress_pages(p: PackedKV, page_table: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode only the pages the table names (no sync): a compact pool and its identity table."""
    batch, max_pages = page_table.shape
    ids = page_table.reshape(-1).long().clamp(0, p.shape[0] - 1)
    sub = PackedKV(
        data=p.data[ids], scales=p.scales[ids], bits=p.bits, head_dim=p.head_dim, seed=p.seed
    )
    table = torch.arange(batch * max_pages, device=page_table.device, dtype=torch.int32)
    return sub.decompress_rotated(dtype), table.view(batch, max_pages)


def _run_decompress(prob: _Problem, return_lse: bool):
    from flash_attn.cute import flash_attn_varlen_func as fa4_varlen  # heavy import: only here

    q = prob.q
    q_rot = rotate_rounded(q, prob.k.seed)
    page_table = prob.page_table
    if page_table is not None:
        k_bf, page_table = _decompress_pages(prob.k, prob.page_table, q.dtype)
        v_bf, _ = _decompress_pages(prob.v, prob.page_table, q.dtype)
    else:
        k_bf = prob.k.decompress_rotated(q.dtype)
        v_bf = prob.v.decompress_rotated(q.dtype)
    left, right = prob.window_size
    out_rot, lse = fa4_varlen(
        q_rot, k_bf, v_bf,
        cu_seqlens_q=prob.cu_seqlens_q, cu_seqlens_k=prob.cu_seqlens_k,
        max_seqlen_q=prob.max_seqlen_q, max_seqlen_k=prob.max_seqlen_k,
        seqused_k=prob.seqused_k, page_table=page_table,
        softmax_scale=prob.softmax_scale, causal=prob.causal, window_size=(left, right),
        return_lse=return_lse,
    )
    out = unrotate_rounded(out_rot, prob.v.seed)
    return out, (lse if return_lse else None)
