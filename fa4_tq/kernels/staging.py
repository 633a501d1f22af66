"""Host side of the load stage shared by every architecture: codebook lookups and the staging plan.

One thread owns one (row, column part) of a KV tile. It copies its packed bytes from global
memory into its own slice of a shared-memory staging ring (cp.async, so the next tile's bytes
are in flight while this one is dequantised), then turns them into the swizzled tile the tensor
cores read: ``tile[row, col] = T(g * s_hi + T(g * s_lo))`` in the tile dtype T, sigma split
into two T parts (a packed multiply and FMA per two values), exactly as
``PackedKV.decompress_rotated(T)`` computes it, so tile and reference agree bit for bit. A value
depends only on the code and the row, so 2/3/4-bit rows scale the 2**bits codebook entries once
and look the codes up in that scaled codebook.

Because a thread only ever reads bytes it copied itself, the ring needs no barrier: each
thread's ``cp.async.wait_group`` is enough. 2/3/4-bit codes are looked up in registers with
``prmt`` byte permutes over the codebook split into byte planes (``code_planes``), four codes per
permute; 8-bit codes index a 256-entry float32 table in shared memory (``lookup_table``).

The host side is plain Python so tests can check it on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import struct

import torch

from ..codec.codebook import centroid_values, centroids

# Shared memory an SM90/SM100 CTA may use (227 KB); FA4's tiles take most of it.
SMEM_CAPACITY = 232448


def uses_shared_table(bits: int) -> bool:
    """8-bit codes (256 entries) are too many for register lookups: they index shared memory."""
    return bits == 8


@functools.lru_cache(maxsize=None)
def entry_bits(bits: int, dtype: str) -> tuple[int, ...]:
    """The 2**bits codebook values in ``dtype`` ("bfloat16" or "float16") as 16-bit patterns.
    Every codebook value is a bf16 value, hence exact in float16 too."""
    fmt = {"bfloat16": "<f", "float16": "<e"}[dtype]  # bf16 = the top half of the float32 bits
    return tuple(int.from_bytes(struct.pack(fmt, v)[-2:], "little") for v in centroid_values(bits))


@functools.lru_cache(maxsize=None)
def entry_pairs(bits: int, dtype: str) -> tuple[int, ...]:
    """The 2**bits codebook values in ``dtype`` as 32-bit words of two 16-bit values, entry 2j
    in the low half of word j."""
    if bits not in (2, 3, 4):
        raise ValueError(f"register lookups are for 2/3/4-bit codes, got bits={bits}")
    raw = entry_bits(bits, dtype)
    return tuple(raw[2 * j] | (raw[2 * j + 1] << 16) for j in range(len(raw) // 2))


def planes_from_pairs(pairs, prmt) -> tuple[tuple, tuple]:
    """Entry pairs (``entry_pairs`` layout) -> two byte planes, low bytes and high bytes, four
    entries per word (entry 4j+i in byte i of word j): the form ``decode_four`` indexes.

    The kernel calls it on codebook values already multiplied by a row's scale (registers);
    ``code_planes`` on the plain codebook (ints)."""
    lo = tuple(prmt(pairs[2 * k], pairs[2 * k + 1], 0x6420) for k in range(len(pairs) // 2))
    hi = tuple(prmt(pairs[2 * k], pairs[2 * k + 1], 0x7531) for k in range(len(pairs) // 2))
    return lo, hi


@functools.lru_cache(maxsize=None)
def code_planes(bits: int, dtype: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The codebook as the byte planes ``decode_four`` reads by default (``planes_from_pairs``).

    ``prmt(plane[0], plane[1], sel)`` then yields byte ``sel_i`` of entries 0-7 for four codes at
    once; 4-bit codes do the same on words 2-3 for entries 8-15 and pick per byte."""
    return planes_from_pairs(entry_pairs(bits, dtype), prmt_reference)


def decode_four(x, bits: int, dtype: str, prmt, planes=None):
    """Four 2/3/4-bit codes at the bottom of ``x`` (a packed bit stream, code 0 lowest; higher
    bits are ignored) -> two words of two ``dtype`` codebook values each (code 0 in the low half).

    ``planes`` (default ``code_planes(bits, dtype)``) are the byte planes looked up: the kernel
    passes the codebook already scaled by the row's sigma, so it scales 2**bits entries per row
    instead of every element.

    Plain Python over ``&``, ``>>``, ``+``: the kernel calls it while tracing, with ``x`` a
    register and ``prmt`` the PTX byte permute; tests call it with ints and ``prmt_reference``.
    A selector nibble is a code (prmt reads nibble bit 3 as "sign-extend", so 4-bit codes
    look up entries ``code & 7`` in both halves of the codebook and ``pick`` chooses per byte)."""
    planes = code_planes(bits, dtype) if planes is None else planes
    if bits == 4:
        return _lookup_4bit(planes, x & 0x7777, ((x >> 1) & 0x4444) | 0x3210, prmt)
    if bits == 3:  # 4 x 3 bits -> nibbles: move codes 2-3 up to bit 8, then codes 1 and 3 up by 1
        y = (x & 0x3F) | ((x & 0xFC0) << 2)
        sel = y + (y & 0x3838)
    else:  # 4 x 2 bits: codes 2-3 up to bit 8, then codes 1 and 3 up by 2
        y = (x & 0xF) | ((x & 0xF0) << 4)
        sel = y + (y & 0x0C0C) * 3
    # entries 0-3 in plane[0], 4-7 in plane[-1] (2-bit: one word, bit 2 of the nibble is 0)
    return _interleave(*(prmt(plane[0], plane[-1], sel) for plane in planes), prmt)


def decode_eight(x, dtype: str, prmt, planes=None):
    """Eight 4-bit codes (a whole word ``x``) -> the four words ``decode_four`` gives for its low
    and high halves, with the selector arithmetic done once for the word: ``prmt`` reads only a
    selector's low 16 bits, so the high half's selectors are a shift away (21 operations for
    eight codes, 23 as two ``decode_four`` calls)."""
    planes = code_planes(4, dtype) if planes is None else planes
    sel8, pick8 = x & 0x77777777, ((x >> 1) & 0x44444444) | 0x32103210
    high = sel8 >> 16, pick8 >> 16
    return [*_lookup_4bit(planes, sel8, pick8, prmt), *_lookup_4bit(planes, *high, prmt)]


def _lookup_4bit(planes, sel, pick, prmt):
    """Four 4-bit codes' values from their selectors: entries ``code & 7`` of both halves of each
    byte plane, ``pick`` choosing per byte by the code's bit 3."""
    lo, hi = (prmt(prmt(p[0], p[1], sel), prmt(p[2], p[3], sel), pick) for p in planes)
    return _interleave(lo, hi, prmt)


def _interleave(lo, hi, prmt):
    """Low-byte and high-byte planes of four values -> two words: bytes (lo0 hi0 lo1 hi1), (lo2 hi2 lo3 hi3)."""
    return prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362)


def prmt_reference(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode) on Python ints: byte i of the result is byte
    ``sel >> 4i & 7`` of {b, a}, or that byte's sign replicated when nibble bit 3 is set."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        n = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (n & 7))) & 0xFF
        if n & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


@functools.lru_cache(maxsize=None)
def _lookup_table_on(bits: int, device: torch.device) -> torch.Tensor:
    return centroids(bits, "cpu").to(torch.float32).to(device)


def lookup_table(bits: int, device) -> torch.Tensor:
    """The float32 codebook a kernel copies into shared memory when ``uses_shared_table(bits)``
    (passed for every width so the launch signature is fixed); one copy per device, made once,
    so a launch does no host-to-device transfer."""
    return _lookup_table_on(bits, torch.device(device))


def table_floats(bits: int) -> int:
    """Shared-memory floats the kernel reserves for the codebook of ``bits``-bit codes."""
    return 1 << bits if uses_shared_table(bits) else 0


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
    base += 4 * (table_floats(k_bits) + table_floats(v_bits)) + 256  # 8-bit tables, alignment
    plans = [StagingPlan(tile_n, head_dim, b) for b in (k_bits, v_bits)]
    for slots, padded in ((2, True), (2, False), (1, True), (1, False)):
        if base + slots * sum(p.bytes(padded) for p in plans) <= SMEM_CAPACITY:
            return slots, padded
    raise ValueError(
        f"no staging ring fits in shared memory for tile {tile_m}x{tile_n}, head_dim {head_dim}, "
        f"K{k_bits}V{v_bits}"
    )
