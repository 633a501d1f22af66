"""Argument checks for the public API: every bad input gets a ValueError/TypeError that names the
argument and says what to do, before any kernel sees it."""

from __future__ import annotations

from typing import Optional

import torch

from .codec import FORMAT_VERSION, PackedKV

QUERY_DTYPES = (torch.bfloat16, torch.float16)


def check_query(q) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in QUERY_DTYPES:
        raise TypeError(
            f"q must be torch.bfloat16 or torch.float16, got {q.dtype}: cast it, e.g. "
            f"q.to(torch.bfloat16) (fa4_tq.reference.attention_reference takes float32/float64)"
        )


def check_packed(name: str, p) -> None:
    if not isinstance(p, PackedKV):
        raise TypeError(
            f"{name} must be a fa4_tq.PackedKV, got {type(p).__name__}: compress it with "
            f"fa4_tq.compress({name}, bits) or take it from a fa4_tq.PagedKVCache"
        )
    # A PackedKV restored by pickle skips __init__: check the version again here.
    if getattr(p, "version", None) != FORMAT_VERSION:
        raise ValueError(
            f"{name} is codec format v{getattr(p, 'version', '?')}, this fa4_tq reads format "
            f"v{FORMAT_VERSION}: recompress the original tensor with fa4_tq.compress"
        )


def _aligned16(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.data_ptr() % 16 == 0


def check_buffers(name: str, p: PackedKV) -> None:
    """The layout rules of docs/FORMAT.md ("Alignment")."""
    data, scales = p.data, p.scales
    nb = p.row_bytes
    if data.stride(-1) != 1 or (data.dim() >= 2 and data.shape[-2] > 1 and data.stride(-2) != nb):
        raise ValueError(
            f"{name}.data must hold each token's rows contiguously (strides (..., {nb}, 1)), got "
            f"strides {data.stride()}: pass {name}.data.contiguous() or allocate with "
            f"fa4_tq.compress / PagedKVCache"
        )
    step = 16 if nb % 16 == 0 else 8  # 24-byte rows (3-bit, head_dim 64) can only be 8-B aligned
    if not _aligned16(data) or any(s % step for s in data.stride()[:-2]):
        raise ValueError(
            f"{name}.data must start on a 16-byte boundary with its outer strides multiples of "
            f"{step} bytes (got address % 16 = {data.data_ptr() % 16}, strides {data.stride()}); "
            f"a sliced buffer is the usual cause: slice whole batch entries/pages or .clone() it"
        )
    es = scales.element_size()
    if scales.dim() and scales.stride(-1) != 1:
        raise ValueError(
            f"{name}.scales must be contiguous along tokens (stride(-1) == 1), got strides "
            f"{scales.stride()}: allocate them with fa4_tq.compress / PagedKVCache"
        )
    if not _aligned16(scales) or any((s * es) % 16 for s in scales.stride()[:-1]):
        raise ValueError(
            f"{name}.scales must start on a 16-byte boundary with outer strides multiples of 16 "
            f"bytes (got address % 16 = {scales.data_ptr() % 16}, strides {scales.stride()} of "
            f"{es}-byte elements): pad the token dim to a multiple of {16 // es}, as "
            f"fa4_tq.compress does, or .clone() a sliced tensor"
        )


def check_index_tensor(name: str, t: Optional[torch.Tensor], shape: tuple, device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32, got {t.dtype}: pass {name}.to(torch.int32)")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: move it to {device}")
    if t.dim() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim: pass {name}.contiguous()")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int) -> torch.Tensor:
    """Values: starts at 0, non-decreasing, ends at the total (costs a device sync). Returns the
    host copy it checked (int64), for callers that need the values too."""
    c = cu.detach().to("cpu", torch.int64)
    if c.numel() and (int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any())):
        raise ValueError(
            f"{name} must start at 0, never decrease and end at {total} (the total length), got "
            f"{c.tolist()[:8]}{'...' if c.numel() > 8 else ''}"
        )
    return c
