"""Host side of the load stage shared by every architecture: tables and the staging plan.

One thread owns one (row, column part) of a KV tile. It copies its packed bytes from global
memory into its own slice of a shared-memory staging ring (cp.async, so the next tile's bytes
are in flight while this one is dequantised), then turns them into the swizzled tile the tensor
cores read: ``tile[row, col] = dtype(sigma_row * g[idx])``, the product taken in float32 exactly
as ``PackedKV.decompress_rotated`` does, so tile and reference agree bit for bit.

Because a thread only ever reads bytes it copied itself, the ring needs no barrier: each
thread's ``cp.async.wait_group`` is enough. Codebook lookups go through a small shared-memory
table indexed by *two* codes at once (``2*bits`` bits -> two float32 centroids) for 2/3/4-bit
codes, and by one byte for 8-bit codes: one 8-byte load per two elements.

The host side (``pair_table``, ``StagingPlan``) is plain Python so tests can check it on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..codec.codebook import centroids

# Shared memory an SM90/SM100 CTA may use (227 KB); FA4's tiles take most of it.
SMEM_CAPACITY = 232448


def codes_per_entry(bits: int) -> int:
    """Codes decoded by one table lookup: two for 2/3/4 bits (table of 4**bits pairs), one for 8."""
    return 1 if bits == 8 else 2


@functools.lru_cache(maxsize=None)
def _pair_table_cpu(bits: int) -> torch.Tensor:
    g = centroids(bits, "cpu").to(torch.float32)
    if codes_per_entry(bits) == 1:
        return g.contiguous()
    n = 1 << bits
    v = torch.arange(n * n)
    # entry v = (g[v & mask], g[v >> bits]): the low code is the even (first) coordinate, as in
    # the little-endian packing of format v1.
    return torch.stack([g[v & (n - 1)], g[v >> bits]], dim=1).reshape(-1).contiguous()


@functools.lru_cache(maxsize=None)
def _pair_table_on(bits: int, device: torch.device) -> torch.Tensor:
    return _pair_table_cpu(bits).to(device)


def pair_table(bits: int, device) -> torch.Tensor:
    """float32 lookup table the kernels copy into shared memory (see module docstring); one copy
    per device, made once, so a launch does no host-to-device transfer."""
    return _pair_table_on(bits, torch.device(device))


def table_floats(bits: int) -> int:
    return (1 << bits) if codes_per_entry(bits) == 1 else 2 * (1 << (2 * bits))


@dataclasses.dataclass(frozen=True)
class StagingPlan:
    """How one KV tile is split over the producer threads and staged in shared memory."""

    tile_n: int
    head_dim: int
    bits: int
    num_threads: int = 128

    def __post_init__(self):
        if self.num_threads % self.tile_n:
            raise ValueError(
                f"tile_n={self.tile_n} must divide the {self.num_threads} load threads"
            )

    @property
    def threads_per_row(self) -> int:
        return self.num_threads // self.tile_n

    @property
    def cols(self) -> int:
        """Columns (head-dim elements) one thread dequantises per tile."""
        return self.head_dim // self.threads_per_row

    @property
    def part_bytes(self) -> int:
        """Packed bytes one thread copies per tile."""
        return self.cols * self.bits // 8

    @property
    def copy_bytes(self) -> int:
        """Width of one cp.async: 16 B, or 8 B for the one layout whose parts are 24 B."""
        return 16 if self.part_bytes % 16 == 0 else 8

    @property
    def stride(self) -> int:
        """Staging bytes per thread: the part rounded to 16 B and padded to an odd number of
        16-byte units, so the 8 threads of a quarter warp read 8 different bank groups."""
        return self.row_stride(padded=True)

    def row_stride(self, padded: bool) -> int:
        """Staging bytes per thread, with or without the bank-conflict padding."""
        s = -(-self.part_bytes // 16) * 16
        return s + 16 if padded and (s // 16) % 2 == 0 else s

    def bytes(self, padded: bool = True) -> int:
        return self.num_threads * self.row_stride(padded)


def fa4_sm90_smem_bytes(tile_m: int, tile_n: int, head_dim: int, num_stages: int = 2) -> int:
    """Shared memory FA4's SM90 forward takes for Q, K and V (bf16/fp16, P in registers)."""
    # + FA4's mbarriers and the 1 KB alignment of its first buffer
    return 2 * (tile_m * head_dim + 2 * num_stages * tile_n * head_dim) + 1024


def choose_staging(tile_m: int, tile_n: int, head_dim: int, k_bits: int, v_bits: int,
                   num_stages: int = 2) -> tuple[int, bool]:
    """(staging slots, padded rows) that fit next to FA4's tiles: two slots let the next tile's
    bytes load while this one is dequantised; padding avoids bank conflicts. Prefer both, then
    two slots unpadded, then one slot."""
    base = fa4_sm90_smem_bytes(tile_m, tile_n, head_dim, num_stages)
    base += 4 * (table_floats(k_bits) + table_floats(v_bits)) + 256  # tables, their alignment
    plans = [StagingPlan(tile_n, head_dim, b) for b in (k_bits, v_bits)]
    for slots, padded in ((2, True), (2, False), (1, True), (1, False)):
        if base + slots * sum(p.bytes(padded) for p in plans) <= SMEM_CAPACITY:
            return slots, padded
    raise ValueError(
        f"no staging ring fits in shared memory for tile {tile_m}x{tile_n}, head_dim {head_dim}, "
        f"K{k_bits}V{v_bits}"
    )
