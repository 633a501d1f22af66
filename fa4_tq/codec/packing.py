"""Little-endian bit packing of b-bit indices (format v1).

Every group of 8 consecutive indices becomes b bytes: the integer sum_i idx[8g+i] << (b·i),
written little-endian. That one rule gives: b=8 one index per byte; b=4 two per byte, the even
coordinate in the low nibble; b=2 four per byte from the low bits up; b=3 eight indices in three
bytes. A packed row of d coordinates is d·b/8 bytes.
"""

from __future__ import annotations

import torch

__all__ = ["row_bytes", "pack", "unpack"]


def row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one packed vector."""
    return head_dim * bits // 8


def pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., d·bits/8] from integer indices [..., d] with values < 2**bits."""
    d = idx.shape[-1]
    if d % 8:
        raise ValueError(f"the packed dim must be a multiple of 8, got {d}")
    lead = idx.shape[:-1]
    if bits == 8:
        return idx.to(torch.uint8)
    groups = idx.to(torch.int64).reshape(*lead, d // 8, 8)
    shifts = torch.arange(8, device=idx.device, dtype=torch.int64) * bits
    word = torch.sum(groups << shifts, dim=-1, keepdim=True)  # < 2**24: no overlap, sum == or
    byte_shifts = torch.arange(bits, device=idx.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, d * bits // 8)


def unpack(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """int64 indices [..., head_dim] from uint8 [..., head_dim·bits/8]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed bytes must be torch.uint8, got {packed.dtype}")
    nb = row_bytes(head_dim, bits)
    if packed.shape[-1] != nb:
        raise ValueError(
            f"a packed row of head_dim={head_dim} at {bits} bits is {nb} bytes, got {packed.shape[-1]}"
        )
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.to(torch.int64)
    by = packed.to(torch.int64).reshape(*lead, head_dim // 8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = torch.sum(by << byte_shifts, dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    idx = (word >> shifts) & ((1 << bits) - 1)
    return idx.reshape(*lead, head_dim)
