"""PackedKV and compress(): TurboQuant format v1 as pure, vectorised PyTorch.

Layout (docs/FORMAT.md has the whole story):
- ``data``   uint8, shape ``x.shape[:-1] + (d·bits/8,)``, contiguous rows.
- ``scales`` float16 (default) or float32, one per vector. For ``x`` of 3 or more dims, read as
  ``[..., tokens, heads, d]``, the scales are head-major ``[..., heads, tokens]`` so that a tile of
  consecutive tokens of one head is contiguous (what a TMA box wants); the token dim of the
  allocation is padded to a multiple of 16 bytes so every stride is 16-byte aligned.
  For 1-D and 2-D ``x`` the scales are simply ``x.shape[:-1]``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .codebook import _check_bits, boundaries, centroids
from .packing import pack, row_bytes, unpack
from .rotation import _check_head_dim, check_seed, rotate, unrotate

__all__ = ["FORMAT_VERSION", "PackedKV", "compress", "SCALE_DTYPES", "scales_shape"]

FORMAT_VERSION = 1
SCALE_DTYPES = (torch.float16, torch.float32)
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def scales_shape(lead: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scales for vectors indexed by ``lead`` (= x.shape[:-1])."""
    if len(lead) >= 2:
        return (*lead[:-2], lead[-1], lead[-2])
    return tuple(lead)


def _alloc_scales(lead: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Scales tensor whose last (token) dim is padded to 16 bytes: every stride 16-B aligned."""
    shape = scales_shape(lead)
    if not shape:
        return torch.empty((), dtype=dtype, device=device)
    per16 = 16 // torch.empty((), dtype=dtype).element_size()
    padded = -(-shape[-1] // per16) * per16 if shape[-1] else 0
    buf = torch.empty((*shape[:-1], padded), dtype=dtype, device=device)
    return buf[..., : shape[-1]]


def _token_major(scales: torch.Tensor, ndim_lead: int) -> torch.Tensor:
    """View the stored scales as ``lead`` (the vectors' own indexing)."""
    return scales.transpose(-1, -2) if ndim_lead >= 2 else scales


@dataclasses.dataclass(frozen=True)
class PackedKV:
    """Keys or values compressed with the TurboQuant codec (format v1).

    ``shape`` is the shape of the original tensor ``[..., head_dim]``. Build one with
    :func:`compress`, or wrap existing buffers (a paged cache) with the constructor, which checks
    that they are consistent.
    """

    data: torch.Tensor
    scales: torch.Tensor
    bits: int
    head_dim: int
    seed: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.data, torch.Tensor) or not isinstance(self.scales, torch.Tensor):
            raise TypeError("PackedKV.data and PackedKV.scales must be torch.Tensors")
        if self.version != FORMAT_VERSION:
            raise ValueError(
                f"this PackedKV is codec format v{self.version}; fa4_tq {FORMAT_VERSION} reads only "
                f"format v{FORMAT_VERSION}: decompress it with the fa4_tq that wrote it and "
                f"recompress with fa4_tq.compress"
            )
        _check_bits(self.bits)
        _check_head_dim(self.head_dim)
        check_seed(self.seed)
        if self.data.dtype != torch.uint8:
            raise TypeError(f"PackedKV.data must be torch.uint8, got {self.data.dtype}")
        nb = row_bytes(self.head_dim, self.bits)
        if self.data.dim() < 1 or self.data.shape[-1] != nb:
            raise ValueError(
                f"PackedKV.data must end in a dim of {nb} bytes (head_dim={self.head_dim} at "
                f"{self.bits} bits), got shape {tuple(self.data.shape)}"
            )
        if self.scales.dtype not in SCALE_DTYPES:
            raise TypeError(f"PackedKV.scales must be float16 or float32, got {self.scales.dtype}")
        want = scales_shape(tuple(self.data.shape[:-1]))
        if tuple(self.scales.shape) != want:
            raise ValueError(
                f"PackedKV.scales must have shape {want} for data of shape "
                f"{tuple(self.data.shape)} (heads before tokens), got {tuple(self.scales.shape)}"
            )
        if self.data.device != self.scales.device:
            raise ValueError(
                f"PackedKV.data is on {self.data.device} but PackedKV.scales on "
                f"{self.scales.device}: move both with .to(device)"
            )

    # --- description -------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """Shape of the tensor that was compressed."""
        return torch.Size((*self.data.shape[:-1], self.head_dim))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.head_dim, self.bits)

    @property
    def nbytes(self) -> int:
        """Payload bytes: packed rows plus one scale per vector (alignment padding excluded)."""
        return self.data.numel() + self.scales.numel() * self.scales.element_size()

    def to(self, device) -> "PackedKV":
        return dataclasses.replace(self, data=self.data.to(device), scales=self.scales.to(device))

    # --- decoding ----------------------------------------------------------------------
    def indices(self) -> torch.Tensor:
        """Codebook indices, int64 ``[..., head_dim]``."""
        return unpack(self.data, self.bits, self.head_dim)

    def decompress_rotated(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``sigma · g[idx]``: the vectors in the rotated space, where attention runs.

        float32/float64: the product, rounded once. bf16/fp16: what a kernel tile of that dtype
        holds (docs/FORMAT.md, step 4): ``T(g·s_hi + T(g·s_lo))`` with ``s_hi = T(sigma)``,
        ``s_lo = T(sigma - s_hi)``; every float32 step here is exact, so it matches the kernels'
        packed multiply + FMA bit for bit."""
        g = centroids(self.bits, self.device)
        sigma = _token_major(self.scales, self.data.dim() - 1).unsqueeze(-1)
        if dtype in (torch.bfloat16, torch.float16):
            s = sigma.float()
            s_hi = s.to(dtype).float()
            s_lo = (s - s_hi).to(dtype).float()
            gi = g.float()[self.indices()]
            return (gi * s_hi + (gi * s_lo).to(dtype).float()).to(dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (g.to(work)[self.indices()] * sigma.to(work)).to(dtype)

    def decompress(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to the original space: ``R^T (sigma · g[idx])``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return unrotate(self.decompress_rotated(work), self.seed).to(dtype)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        """``R q`` in float32 for a query meant to attend to these keys."""
        _check_last_dim(q, self.head_dim, "q")
        return rotate(q, self.seed)

    def unrotate_output(self, o: torch.Tensor) -> torch.Tensor:
        """``R^T o`` in float32 for an attention output computed on these (rotated) values."""
        _check_last_dim(o, self.head_dim, "o")
        return unrotate(o, self.seed)


def _check_last_dim(t: torch.Tensor, d: int, name: str) -> None:
    if t.shape[-1] != d:
        raise ValueError(f"{name} has head_dim {t.shape[-1]} but the packed tensor has {d}")


def compress(
    x: torch.Tensor,
    bits: int,
    *,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> PackedKV:
    """Compress ``x[..., d]`` (d in {64, 128, 256, 512}) to ``bits`` in {2, 3, 4, 8}.

    Each vector is rotated (randomized Hadamard, ``seed``), normalised to norm sqrt(d), each
    coordinate mapped to the nearest bf16 Lloyd-Max centroid, and one scale
    ``sigma = ||x|| / ||g[idx]||`` stored, so the decoded vector keeps the norm of ``x`` up to the
    rounding of sigma to ``scale_dtype``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (the head dim)")
    _check_bits(bits)
    d = x.shape[-1]
    _check_head_dim(d)
    check_seed(seed)
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x holds inf or NaN: the codec only compresses finite values")

    y = rotate(x, seed).to(torch.float32)
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    u = y * (math.sqrt(d) / safe)
    idx = torch.bucketize(u, boundaries(bits, x.device))
    g = centroids(bits, x.device)
    gnorm = torch.linalg.vector_norm(g[idx], dim=-1, keepdim=True)
    sigma = (norm / gnorm).squeeze(-1)

    lead = tuple(x.shape[:-1])
    scales = _alloc_scales(lead, scale_dtype, x.device)
    _token_major(scales, len(lead)).copy_(sigma)
    if scales.numel() and not bool(torch.isfinite(scales).all()):
        worst = float(sigma.max())
        raise ValueError(
            f"a vector's scale ({worst:.4g}, about its RMS value) overflows {scale_dtype}; "
            f"pass scale_dtype=torch.float32, or bring the activations into range"
        )
    return PackedKV(data=pack(idx, bits), scales=scales, bits=bits, head_dim=d, seed=seed)


