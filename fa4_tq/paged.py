"""A paged KV cache of packed pages, written through a vLLM-style ``slot_mapping``.

Per layer: K and V bytes ``[num_pages, page_size, kv_heads, row_bytes]`` (uint8) and scales
``[num_pages, kv_heads, page_size]`` (head-major, docs/FORMAT.md). ``layer(i)`` returns the two
``PackedKV`` views that ``fa4_tq.flash_attn_varlen_func(..., page_table=, seqused_k=)`` takes.

Writes on an SM90+ GPU run one CuTeDSL kernel for K and V (``fa4_tq/kernels/cache_write.py``:
rotation, quantisation, packing and scatter fused, no sync); elsewhere, or with
``backend="reference"``, the reference codec (``fa4_tq.compress``). ``compress_into`` is the same
kernel for a contiguous ``PackedKV`` (e.g. a growing per-sequence buffer).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from .codec import SCALE_DTYPES, PackedKV, compress, row_bytes
from .codec.codebook import _check_bits
from .codec.rotation import _check_head_dim, check_seed

__all__ = ["PagedKVCache", "compress_into"]

WRITE_BACKENDS = ("auto", "kernel", "reference")


@functools.lru_cache(maxsize=None)
def _kernel_usable(device: torch.device) -> Optional[str]:
    """Why the cache-write kernel cannot run on ``device`` (None when it can); asked once per
    device, not on every write."""
    if device.type != "cuda":
        return "it needs CUDA tensors"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "it is built for SM90 and newer"
    try:
        import flash_attn.cute  # noqa: F401  (the gpu extra)
    except ImportError:
        return "the gpu extra (flash-attn-4, nvidia-cutlass-dsl) is not installed"
    return None


def _pick_write_backend(backend: str, device: torch.device) -> str:
    if backend not in WRITE_BACKENDS:
        raise ValueError(f"backend must be one of {WRITE_BACKENDS}, got {backend!r}")
    why = _kernel_usable(device)
    if backend == "kernel" and why:
        raise ValueError(f"backend='kernel' cannot run: {why}; use backend='reference' or 'auto'")
    return backend if backend != "auto" else ("reference" if why else "kernel")

BitsArg = Union[int, Sequence[int]]


def check_slot_mapping(slot_mapping, num_tokens: int, device: torch.device, num_slots: int, check_indices: bool) -> None:
    """A cache write's ``slot_mapping``: int32/int64 ``[num_tokens]`` on the cache's device; with
    ``check_indices`` (a host sync) every value -1 (padding) or a slot below ``num_slots``."""
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be torch.int32 or torch.int64, got {slot_mapping.dtype}")
    if tuple(slot_mapping.shape) != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}] (one slot per token), got {tuple(slot_mapping.shape)}")
    if slot_mapping.device != device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device}, the cache on {device}")
    if check_indices and num_tokens:
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(
                f"slot_mapping values must be -1 (padding) or in [0, {num_slots}) "
                f"(num_pages * page_size), got min {lo}, max {hi}"
            )


def scatter_compressed(slot_mapping: torch.Tensor, *pairs: tuple[torch.Tensor, PackedKV]) -> None:
    """The reference write: for each ``(x, dst)``, compress ``x[num_tokens, heads, d]`` with the
    codec and store it in the paged ``dst`` at ``slot_mapping`` (-1 skipped; the mask costs one
    host sync for all pairs)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, dst in pairs:
        page_size = dst.data.shape[1]
        page, off = slots // page_size, slots % page_size
        p = compress(x[keep], dst.bits, seed=dst.seed, scale_dtype=dst.scales.dtype)
        dst.data[page, off] = p.data
        dst.scales[page, :, off] = p.scales.transpose(0, 1)


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
        backend: str = "auto",
    ) -> None:
        """Compress new tokens ``k, v[num_tokens, kv_heads, head_dim]`` into the slots
        ``slot_mapping[num_tokens]`` (slot = page * page_size + offset; -1 = padding, skipped).

        ``check_indices`` validates the slots on the host (a device sync; serving loops that
        trust their slot mapping pass False). ``backend``: "kernel" (one launch for K and V,
        SM90+), "reference" (the PyTorch codec), "auto" (the kernel where it runs). The kernel
        does not check for inf/NaN (that needs a sync): such rows get unspecified codes."""
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
        check_slot_mapping(slot_mapping, k.shape[0], self.device, self.num_slots, check_indices)
        if k.dtype not in (torch.bfloat16, torch.float16, torch.float32) or v.dtype != k.dtype:
            raise TypeError(f"k and v must share one of bfloat16/float16/float32, got {k.dtype} and {v.dtype}")
        if _pick_write_backend(backend, self.device) == "kernel" and k.dtype != torch.float32:
            from .kernels.launch import write_packed

            write_packed(k, v, slot_mapping, self._k[layer], self._v[layer])
            return
        scatter_compressed(slot_mapping, (k, self._k[layer]), (v, self._v[layer]))

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, k_bits={self.k_bits}, "
            f"v_bits={self.v_bits}, {self.nbytes / 2**20:.1f} MiB on {self.device})"
        )


def compress_into(x: torch.Tensor, out: PackedKV, *, backend: str = "auto") -> None:
    """Compress ``x`` into the existing buffers of ``out`` (same shape, ``[batch, seqlen, heads,
    d]`` or ``[tokens, heads, d]``), as ``fa4_tq.compress(x, out.bits, seed=out.seed)`` would,
    without allocating: the cache-write kernel on SM90+ for bf16/fp16 ``x``, else the reference."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(out, PackedKV):
        raise TypeError(f"out must be a PackedKV, got {type(out).__name__}")
    if tuple(x.shape) != tuple(out.shape):
        raise ValueError(f"x has shape {tuple(x.shape)}, out holds {tuple(out.shape)}: they must match")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [batch, seqlen, heads, d] or [tokens, heads, d], got {x.dim()} dims")
    if x.device != out.device:
        raise ValueError(f"x is on {x.device}, out on {out.device}")
    kernel = (_pick_write_backend(backend, x.device) == "kernel" and x.dtype in (torch.bfloat16, torch.float16)
              and out.data.is_contiguous() and out.data.data_ptr() % 16 == 0)
    if not kernel:
        p = compress(x, out.bits, seed=out.seed, scale_dtype=out.scales.dtype)
        out.data.copy_(p.data)
        out.scales.copy_(p.scales)
        return
    from .kernels.launch import write_packed

    if x.dim() == 4:  # data [b, s, h, nb] and scales [b, h, s] are already pages of s slots
        b, s = x.shape[:2]
        rows, paged = x.reshape(b * s, *x.shape[2:]), out
    else:  # [t, h]: one page of t slots
        rows = x
        paged = PackedKV(data=out.data.unsqueeze(0), scales=out.scales.unsqueeze(0), bits=out.bits,
                         head_dim=out.head_dim, seed=out.seed)
    slots = torch.arange(rows.shape[0], device=x.device, dtype=torch.int32)
    write_packed(rows, None, slots, paged)
