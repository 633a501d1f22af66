"""A paged KV cache of packed pages, written through a vLLM-style ``slot_mapping``.

Per layer: K and V bytes ``[num_pages, page_size, kv_heads, row_bytes]`` (uint8) and scales
``[num_pages, kv_heads, page_size]`` (head-major, docs/FORMAT.md). ``layer(i)`` returns the two
``PackedKV`` views that ``fa4_tq.flash_attn_varlen_func(..., page_table=, seqused_k=)`` takes.
Writes use the reference codec (``fa4_tq.compress``) for now.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .codec import SCALE_DTYPES, PackedKV, compress, row_bytes
from .codec.codebook import _check_bits
from .codec.rotation import _check_head_dim, check_seed

__all__ = ["PagedKVCache"]

BitsArg = Union[int, Sequence[int]]


def _per_layer(name: str, bits: BitsArg, num_layers: int) -> list[int]:
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = [bits] * num_layers
    bits = list(bits)
    if len(bits) != num_layers:
        raise ValueError(f"{name} must be one int or one per layer ({num_layers}), got {len(bits)}")
    for b in bits:
        _check_bits(b)
    return bits


class PagedKVCache:
    """Packed K/V pages for ``num_layers`` layers.

    ``k_bits``/``v_bits`` are one width for all layers or one per layer (e.g. 8-bit first and
    last layers). ``page_size`` must be a multiple of 8 so every page's scales start 16-byte
    aligned. Unwritten slots hold zero bytes and zero scales (they decode to zero vectors).
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        *,
        k_bits: BitsArg = 4,
        v_bits: BitsArg = 4,
        k_seed: int = 0,
        v_seed: int = 1,
        scale_dtype: torch.dtype = torch.float16,
        device: Union[str, torch.device] = "cpu",
    ):
        for name, val in (("num_layers", num_layers), ("num_pages", num_pages), ("kv_heads", kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 8 or page_size % 8:
            raise ValueError(f"page_size must be a positive multiple of 8 (16-byte aligned scales), got {page_size!r}")
        _check_head_dim(head_dim)
        check_seed(k_seed)
        check_seed(v_seed)
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.k_bits = _per_layer("k_bits", k_bits, num_layers)
        self.v_bits = _per_layer("v_bits", v_bits, num_layers)
        self.k_seed, self.v_seed, self.scale_dtype = k_seed, v_seed, scale_dtype
        self.device = torch.device(device)
        self._k = [self._alloc(b, k_seed) for b in self.k_bits]
        self.device = self._k[0].device  # "cuda" -> "cuda:0": compare against what we hold
        self._v = [self._alloc(b, v_seed) for b in self.v_bits]

    def _alloc(self, bits: int, seed: int) -> PackedKV:
        data = torch.zeros(
            self.num_pages, self.page_size, self.kv_heads, row_bytes(self.head_dim, bits),
            dtype=torch.uint8, device=self.device,
        )
        scales = torch.zeros(
            self.num_pages, self.kv_heads, self.page_size, dtype=self.scale_dtype, device=self.device
        )
        return PackedKV(data=data, scales=scales, bits=bits, head_dim=self.head_dim, seed=seed)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def layer(self, layer: int) -> tuple[PackedKV, PackedKV]:
        """(k, v) pages of one layer: views of the cache, no copy."""
        self._check_layer(layer)
        return self._k[layer], self._v[layer]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._k + self._v)

    def bytes_per_token(self) -> int:
        """K+V bytes per token over all layers (packed rows + scales)."""
        es = torch.empty((), dtype=self.scale_dtype).element_size()
        return sum(
            self.kv_heads * (row_bytes(self.head_dim, b) + es) for b in self.k_bits + self.v_bits
        )

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def write(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        check_indices: bool = True,
    ) -> None:
        """Compress new tokens ``k, v[num_tokens, kv_heads, head_dim]`` into the slots
        ``slot_mapping[num_tokens]`` (slot = page * page_size + offset; -1 = padding, skipped)."""
        self._check_layer(layer)
        want = (self.kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != want:
                raise ValueError(
                    f"{name} must be [num_tokens, {want[0]}, {want[1]}] (kv_heads, head_dim of this "
                    f"cache), got {tuple(t.shape)}"
                )
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.device}: move it")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k has {k.shape[0]} tokens and v {v.shape[0]}: they must match")
        if not isinstance(slot_mapping, torch.Tensor):
            raise TypeError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
        if slot_mapping.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"slot_mapping must be torch.int32 or torch.int64, got {slot_mapping.dtype}")
        if tuple(slot_mapping.shape) != (k.shape[0],):
            raise ValueError(f"slot_mapping must be [{k.shape[0]}] (one slot per token), got {tuple(slot_mapping.shape)}")
        if slot_mapping.device != self.device:
            raise ValueError(f"slot_mapping is on {slot_mapping.device}, the cache on {self.device}")
        if check_indices and slot_mapping.numel():
            lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
            if lo < -1 or hi >= self.num_slots:
                raise ValueError(
                    f"slot_mapping values must be -1 (padding) or in [0, {self.num_slots}) "
                    f"(num_pages * page_size), got min {lo}, max {hi}"
                )
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        page, off = slots // self.page_size, slots % self.page_size
        for cache, x in ((self._k[layer], k[keep]), (self._v[layer], v[keep])):
            p = compress(x, cache.bits, seed=cache.seed, scale_dtype=self.scale_dtype)
            cache.data[page, off] = p.data
            cache.scales[page, :, off] = p.scales.transpose(0, 1)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, k_bits={self.k_bits}, "
            f"v_bits={self.v_bits}, {self.nbytes / 2**20:.1f} MiB on {self.device})"
        )
