"""The paged MLA cache: per token a 512-wide latent (packed with the codec, or bf16) and a 64-wide
bf16 RoPE key, written through a vLLM-style ``slot_mapping``.

Per layer ``layer(i)`` returns ``(latent, rope)`` as ``mla.flash_mla_prefill`` takes them:
``latent`` a ``fa4_tq.PackedKV`` of shape ``[num_pages, page_size, 1, 512]`` (data ``[..., 1,
64 * bits]`` uint8, scales ``[num_pages, 1, page_size]``) or a bf16 tensor of that shape, and
``rope`` bf16 ``[num_pages, page_size, 1, 64]``. The latent goes through the cache-write kernel of
``fa4_tq`` on SM90+ (rotation, quantisation, packing, scatter in one launch); the RoPE part is a
scatter copy. Neither needs a host sync: padding slots (-1) of the RoPE copy land in one spare
row past the last page.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from fa4_tq.codec import SCALE_DTYPES, PackedKV, row_bytes
from fa4_tq.codec.codebook import _check_bits
from fa4_tq.codec.rotation import check_seed
from fa4_tq.paged import _pick_write_backend, check_slot_mapping, scatter_compressed

__all__ = ["MLACache", "D_LATENT", "D_ROPE"]

D_LATENT = 512
D_ROPE = 64


class MLACache:
    """Latent + RoPE pages for ``num_layers`` layers. ``bits`` in {2, 3, 4, 8} packs the latent
    (``seed`` picks its rotation), ``bits=None`` keeps it bf16. ``page_size`` must be a positive
    multiple of 64 (the kernel's key block never straddles a page)."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        *,
        bits: Optional[int] = 4,
        seed: int = 0,
        scale_dtype: torch.dtype = torch.float16,
        device: Union[str, torch.device] = "cpu",
    ):
        for name, val in (("num_layers", num_layers), ("num_pages", num_pages)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 64 or page_size % 64:
            raise ValueError(f"page_size must be a positive multiple of 64, got {page_size!r}")
        if bits is not None:
            _check_bits(bits)
        check_seed(seed)
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.bits, self.seed = bits, seed
        dev = torch.device(device)
        slots = num_pages * page_size
        self._latent: list = []
        self._rope_rows: list[torch.Tensor] = []  # [slots + 1, 64]: the last row takes padding writes
        for _ in range(num_layers):
            if bits is None:
                self._latent.append(torch.zeros(slots + 1, D_LATENT, dtype=torch.bfloat16, device=dev))
            else:
                data = torch.zeros(num_pages, page_size, 1, row_bytes(D_LATENT, bits), dtype=torch.uint8, device=dev)
                scales = torch.zeros(num_pages, 1, page_size, dtype=scale_dtype, device=dev)
                self._latent.append(PackedKV(data=data, scales=scales, bits=bits, head_dim=D_LATENT, seed=seed))
            self._rope_rows.append(torch.zeros(slots + 1, D_ROPE, dtype=torch.bfloat16, device=dev))
        self.device = self._rope_rows[0].device

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def layer(self, layer: int) -> tuple[Union[PackedKV, torch.Tensor], torch.Tensor]:
        """``(latent, rope)`` of one layer: views of the cache, no copy."""
        self._check_layer(layer)
        shape = (self.num_pages, self.page_size, 1)
        lat = self._latent[layer]
        if self.bits is None:
            lat = lat[: self.num_slots].view(*shape, D_LATENT)
        return lat, self._rope_rows[layer][: self.num_slots].view(*shape, D_ROPE)

    @property
    def nbytes(self) -> int:
        lat = sum(p.nbytes if isinstance(p, PackedKV) else self.num_slots * D_LATENT * 2 for p in self._latent)
        return lat + self.num_layers * self.num_slots * D_ROPE * 2

    def write(
        self,
        layer: int,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        check_indices: bool = True,
        backend: str = "auto",
    ) -> None:
        """Store new tokens ``c_kv[num_tokens, 512]`` (the latent) and ``k_pe[num_tokens, 64]``
        (RoPE applied) at ``slot_mapping[num_tokens]`` (slot = page * page_size + offset, -1 =
        padding, skipped). ``backend`` as in ``fa4_tq.PagedKVCache.write``; ``check_indices``
        validates the slots on the host (a sync)."""
        self._check_layer(layer)
        for name, t, d in (("c_kv", c_kv, D_LATENT), ("k_pe", k_pe, D_ROPE)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.shape[1] != d:
                raise ValueError(f"{name} must be [num_tokens, {d}], got {tuple(t.shape)}")
            if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.device}: move it")
        n = c_kv.shape[0]
        if k_pe.shape[0] != n:
            raise ValueError(f"c_kv has {n} tokens and k_pe {k_pe.shape[0]}: they must match")
        check_slot_mapping(slot_mapping, n, self.device, self.num_slots, check_indices)
        use_kernel = _pick_write_backend(backend, self.device) == "kernel"
        # Padding goes to the spare row: a scatter with no boolean mask, hence no sync.
        rows = torch.where(slot_mapping < 0, self.num_slots, slot_mapping).long()
        self._rope_rows[layer].index_copy_(0, rows, k_pe.to(torch.bfloat16))
        lat = self._latent[layer]
        if self.bits is None:
            lat.index_copy_(0, rows, c_kv.to(torch.bfloat16))
        elif use_kernel and c_kv.dtype != torch.float32:
            from fa4_tq.kernels.launch import write_packed

            write_packed(c_kv.unsqueeze(1), None, slot_mapping, lat)
        else:
            scatter_compressed(slot_mapping, (c_kv.unsqueeze(1), lat))

    def __repr__(self) -> str:
        what = "bf16" if self.bits is None else f"{self.bits}-bit"
        return (f"MLACache(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, latent {what}, "
                f"{self.nbytes / 2**20:.1f} MiB on {self.device})")
