"""``flash_mla_prefill``: absorbed MLA prefill over a paged latent cache (packed or bf16)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fa4_tq import validation as V
from fa4_tq.codec import PackedKV, hadamard, rotate, rotate_rounded, unrotate, unrotate_rounded
from fa4_tq.interface import _check_page_table

from .cache import D_LATENT, D_ROPE
from .reference import mla_reference

__all__ = ["flash_mla_prefill", "latent_rotation", "BACKENDS"]

BACKENDS = ("auto", "kernel", "reference")


def _kernel_unavailable(device: torch.device, heads: int, explicit: bool) -> Optional[str]:
    """Why the kernel cannot serve this call (None: it can). ``explicit``: backend="kernel" asked.

    SM 10.x runs ``mla/sm100.py`` only when asked by name: it compiles in CI but has never run on a
    Blackwell GPU, so "auto" keeps the float32 reference there."""
    if device.type != "cuda":
        return "it needs CUDA tensors"
    major = torch.cuda.get_device_capability(device)[0]
    if major == 10:
        if not explicit:
            return ("the SM100 kernel has never run on a Blackwell GPU (it is compile-checked only); "
                    "pass backend='kernel' to use it")
        if not (128 % heads == 0 or heads % 128 == 0):
            return f"FA4's SM100 MLA kernel packs heads into 128-row tiles: heads must divide 128 or be a multiple of it, got {heads}"
    elif major != 9:
        return "it is built for SM90 (Hopper) and SM100 (Blackwell) only"
    try:
        import flash_attn.cute  # noqa: F401  (the gpu extra)
    except ImportError:
        return "the gpu extra (flash-attn-4, nvidia-cutlass-dsl) is not installed"
    return None


def flash_mla_prefill(
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
    return_lse: bool = False,
    max_seqlen_q: Optional[int] = None,
    rotated_space: bool = False,
    backend: str = "auto",
    check_indices: bool = True,
):
    """MLA attention of absorbed queries over a paged latent cache.

    - ``q_nope[total_q, heads, 512]`` (queries already multiplied into latent space),
      ``q_pe[total_q, heads, 64]`` (RoPE part), bf16; sequence b's queries are rows
      ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and are its last tokens: with ``causal`` query i of n
      sees keys ``j <= i + seqused_k[b] - n`` (chunked prefill: cached tokens come first).
    - ``latent_cache``: ``[num_pages, page_size, 1, 512]``, a ``fa4_tq.PackedKV`` (bits 2/3/4/8)
      or bf16; ``rope_cache``: bf16 ``[num_pages, page_size, 1, 64]``; ``mla.MLACache`` holds both.
      ``page_size`` a multiple of 64.
    - ``page_table[batch, max_pages]``, ``cu_seqlens_q[batch + 1]``, ``seqused_k[batch]``: int32.
    - ``softmax_scale`` defaults to ``1/sqrt(576)``; DeepSeek models pass their own.

    Returns ``out[total_q, heads, 512]`` (bf16, in the latent's original space) and, with
    ``return_lse``, ``(out, lse[heads, total_q])`` (natural log; -inf for a row with no key).
    ``backend``: "kernel" (CuTeDSL: ``mla/sm90.py`` on Hopper, ``mla/sm100.py`` on Blackwell),
    "reference" (float32 PyTorch), "auto" (the kernel where it runs; on Blackwell the reference,
    because the SM100 kernel is compile-checked only and has never run). ``max_seqlen_q`` (the longest query run) saves a host read of ``cu_seqlens_q``;
    ``check_indices=False`` skips the host checks of the index tensors (no sync).

    A packed latent is stored rotated (``c_rot = R c``, ``R = mla.latent_rotation(latent_cache)``,
    orthogonal). By default the call rotates ``q_nope`` and un-rotates the output (two bf16
    GEMMs). ``rotated_space=True`` skips both: ``q_nope`` must then be ``R q_nope`` and the output
    comes back as ``R out``; a model folds ``R`` into its absorbed ``W_UK`` and ``R^T`` into
    ``W_UV`` once, and the rotation costs nothing per call.
    """
    longest = _check_inputs(q_nope, q_pe, latent_cache, rope_cache, page_table, cu_seqlens_q, seqused_k,
                            softmax_scale, check_indices)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_seqlen_q is not None:
        if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
            raise ValueError(f"max_seqlen_q must be an int >= 0 or None, got {max_seqlen_q!r}")
        if longest is not None and max_seqlen_q < longest:
            raise ValueError(
                f"max_seqlen_q={max_seqlen_q} is shorter than the longest query run "
                f"({longest}): the kernel would leave rows unwritten; pass it or None"
            )
    packed = isinstance(latent_cache, PackedKV)
    if rotated_space and not packed:
        raise ValueError("rotated_space=True is for a packed latent (a bf16 latent is not rotated): drop it")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D_LATENT + D_ROPE)
    why = _kernel_unavailable(q_nope.device, q_nope.shape[1], explicit=backend == "kernel")
    if backend == "kernel" and why:
        raise ValueError(f"backend='kernel' cannot run: {why}; use backend='reference' or 'auto'")
    if backend == "reference" or (backend == "auto" and why):
        q_ref = unrotate(q_nope.float(), latent_cache.seed) if rotated_space else q_nope
        out, lse = mla_reference(q_ref, q_pe, latent_cache, rope_cache, page_table, cu_seqlens_q, seqused_k,
                                 causal=causal, softmax_scale=scale)
        out = (rotate(out, latent_cache.seed) if rotated_space else out).to(q_nope.dtype)
        return (out, lse) if return_lse else out

    from .launch import mla_attention

    if max_seqlen_q is None:
        max_seqlen_q = longest if longest is not None else _longest_run(cu_seqlens_q.detach().cpu())
    rotate_here = packed and not rotated_space
    q_in = rotate_rounded(q_nope, latent_cache.seed) if rotate_here else q_nope
    out, lse = mla_attention(q_in, q_pe, latent_cache, rope_cache, page_table, cu_seqlens_q, seqused_k,
                             int(max_seqlen_q), softmax_scale=scale, causal=bool(causal), return_lse=return_lse)
    if rotate_here:
        out = unrotate_rounded(out, latent_cache.seed)
    return (out, lse) if return_lse else out


def _longest_run(cu: torch.Tensor) -> int:
    """The longest query run of host offsets ``cu``."""
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def latent_rotation(latent_cache: PackedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthogonal 512 x 512 matrix ``R`` a packed latent is stored under (``c_rot = R c``),
    for folding into a model's absorbed projections (``rotated_space=True``)."""
    V.check_packed("latent_cache", latent_cache)
    return hadamard(D_LATENT, latent_cache.seed, torch.float64).to(dtype)


def _check_inputs(q_nope, q_pe, latent, rope, page_table, cu_seqlens_q, seqused_k, softmax_scale,
                  check_indices: bool) -> Optional[int]:
    """Every check of flash_mla_prefill's tensors; with ``check_indices`` (one host copy of each
    index tensor) returns the longest query run, else None."""
    for name, t, d in (("q_nope", q_nope, D_LATENT), ("q_pe", q_pe, D_ROPE)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.bfloat16:
            raise TypeError(f"{name} must be torch.bfloat16, got {t.dtype}: cast it with .to(torch.bfloat16)")
        if t.dim() != 3 or t.shape[-1] != d:
            raise ValueError(f"{name} must be [total_q, heads, {d}], got {tuple(t.shape)}")
    if q_pe.shape[:2] != q_nope.shape[:2]:
        raise ValueError(f"q_pe {tuple(q_pe.shape)} and q_nope {tuple(q_nope.shape)} must share [total_q, heads]")
    dev = q_nope.device
    if q_pe.device != dev:
        raise ValueError(f"q_pe is on {q_pe.device} but q_nope on {dev}: move it")
    if not isinstance(rope, torch.Tensor) or rope.dtype != torch.bfloat16 or rope.dim() != 4 \
            or rope.shape[2:] != (1, D_ROPE):
        raise ValueError(
            f"rope_cache must be a bf16 tensor [num_pages, page_size, 1, {D_ROPE}], got "
            f"{tuple(rope.shape) if isinstance(rope, torch.Tensor) else type(rope).__name__}"
            + (f" of {rope.dtype}" if isinstance(rope, torch.Tensor) else "")
        )
    num_pages, page_size = rope.shape[:2]
    if page_size % 64:
        raise ValueError(f"page_size must be a multiple of 64, got {page_size}")
    if rope.device != dev:
        raise ValueError(f"rope_cache is on {rope.device} but q_nope on {dev}: move it")
    # pages 16-byte aligned too: the kernel loads whole bf16 blocks by TMA
    if rope.stride(-1) != 1 or rope.stride(1) != D_ROPE or rope.data_ptr() % 16 or rope.stride(0) % 8:
        raise ValueError("rope_cache rows and pages must be contiguous and 16-byte aligned: pass rope_cache.contiguous()")
    want = (num_pages, page_size, 1, D_LATENT)
    if isinstance(latent, PackedKV):
        V.check_packed("latent_cache", latent)
        if tuple(latent.shape) != want:
            raise ValueError(f"latent_cache must hold shape {want} (rope_cache's pages), got {tuple(latent.shape)}")
        if latent.device != dev:
            raise ValueError(f"latent_cache is on {latent.device} but q_nope on {dev}: move it")
        V.check_buffers("latent_cache", latent)
    elif isinstance(latent, torch.Tensor):
        if latent.dtype != torch.bfloat16 or tuple(latent.shape) != want:
            raise ValueError(
                f"a plain latent_cache must be bf16 of shape {want} (rope_cache's pages), got "
                f"{tuple(latent.shape)} of {latent.dtype}"
            )
        if latent.device != dev:
            raise ValueError(f"latent_cache is on {latent.device} but q_nope on {dev}: move it")
        if latent.stride(-1) != 1 or latent.stride(1) != D_LATENT or latent.data_ptr() % 16 or latent.stride(0) % 8:
            raise ValueError(
                "latent_cache rows and pages must be contiguous and 16-byte aligned: pass latent_cache.contiguous()")
    else:
        raise TypeError(
            f"latent_cache must be a fa4_tq.PackedKV or a bf16 tensor, got {type(latent).__name__}: "
            f"take both caches from mla.MLACache"
        )
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise ValueError("cu_seqlens_q must be a 1-D int32 tensor of batch + 1 offsets")
    batch = cu_seqlens_q.numel() - 1
    V.check_index_tensor("cu_seqlens_q", cu_seqlens_q, (batch + 1,), dev)
    V.check_index_tensor("seqused_k", seqused_k, (batch,), dev)
    if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2:
        raise ValueError("page_table must be a 2-D int32 tensor [batch, max_pages_per_seq]")
    V.check_index_tensor("page_table", page_table, (batch, page_table.shape[1]), dev)
    if not check_indices:
        return None
    cu = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q_nope.shape[0])
    used = seqused_k.detach().to("cpu", torch.int64)
    cap = page_size * page_table.shape[1]
    if bool((used < 0).any()) or bool((used > cap).any()):
        raise ValueError(f"seqused_k must lie in [0, {cap}] (max_pages * page_size), got {used.tolist()[:8]}")
    _check_page_table(page_table, used, num_pages, page_size)
    return _longest_run(cu)
