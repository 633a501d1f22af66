"""The randomized Walsh-Hadamard rotation R = H_d diag(s) / sqrt(d) of format v1.

H_d is the Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]); s is a ±1
vector drawn from a fixed, specified generator so that any implementation (a CUDA kernel, another
language) reproduces it from the seed alone: s_i = -1 if the top bit of splitmix64(seed·2^32 + i)
is set, else +1 (docs/FORMAT.md). The transform is applied as log2(d) butterfly stages of
additions, which is exact in float32 up to the final 1/sqrt(d) scaling.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "SUPPORTED_HEAD_DIMS", "sign_vector", "rotate", "unrotate", "rotate_rounded", "unrotate_rounded",
    "hadamard",
]

SUPPORTED_HEAD_DIMS = (64, 128, 256, 512)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} is out of range: use 0 <= seed < 2**32")


@functools.lru_cache(maxsize=None)
def _signs_cpu(d: int, seed: int) -> torch.Tensor:
    bits = [_splitmix64((seed << 32) + i) >> 63 for i in range(d)]
    return torch.tensor([-1.0 if b else 1.0 for b in bits], dtype=torch.float32)


def sign_vector(d: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ±1 vector s of length d for this seed (float32)."""
    check_seed(seed)
    s = _signs_cpu(d, seed)
    return s if device is None else s.to(device)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester-Hadamard transform over the last dim (a power of two)."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < d:
        y = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return x


def _check_head_dim(d: int) -> None:
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim={d} is not supported: the last dim must be one of {SUPPORTED_HEAD_DIMS}"
        )


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """y = R x over the last dim, in float32 (float64 input stays float64)."""
    d = x.shape[-1]
    _check_head_dim(d)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = sign_vector(d, seed, x.device).to(dtype)
    return _fwht(x.to(dtype) * s) * (1.0 / math.sqrt(d))


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """x = R^T y over the last dim (R is orthogonal and H_d symmetric), float32 or float64."""
    d = y.shape[-1]
    _check_head_dim(d)
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    s = sign_vector(d, seed, y.device).to(dtype)
    return _fwht(y.to(dtype)) * (s * (1.0 / math.sqrt(d)))


@functools.lru_cache(maxsize=None)
def _signed_hadamard(d: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """W = diag(s) H_d: entries +-1, exact in bf16/fp16 (the 1/sqrt(d) is applied separately)."""
    return (sign_vector(d, seed)[:, None] * _fwht(torch.eye(d))).to(dtype).to(device)


def _matmul_rounded(x: torch.Tensor, seed: int, transpose: bool) -> torch.Tensor:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"expected a bfloat16 or float16 tensor, got {x.dtype}: use rotate/unrotate")
    d = x.shape[-1]
    _check_head_dim(d)
    w = _signed_hadamard(d, seed, x.dtype, x.device)
    x2 = x.reshape(-1, d)
    out = torch.empty_like(x2)
    # One GEMM with float32 accumulation; alpha scales in float32 before the single rounding.
    torch.addmm(out, x2, w.T if transpose else w, beta=0, alpha=1.0 / math.sqrt(d), out=out)
    return out.view(x.shape)


def rotate_rounded(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``R x`` for a bf16/fp16 ``x``, in its dtype: one matmul by the +-1 matrix diag(s) H with
    float32 accumulation, rounded once, so a query costs one read and one write (the butterfly
    ``rotate`` makes log2(d) float32 passes). Equal to ``rotate(x).to(x.dtype)`` up to the order
    of the float32 additions."""
    return _matmul_rounded(x, seed, transpose=False)


def unrotate_rounded(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``R^T y`` for a bf16/fp16 ``y``, in its dtype (``unrotate(y).to(y.dtype)``, one matmul)."""
    return _matmul_rounded(y, seed, transpose=True)


def hadamard(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense matrix R (for tests and for fusing the rotation into a projection)."""
    eye = torch.eye(d, dtype=dtype)
    return rotate(eye, seed).T.contiguous()
