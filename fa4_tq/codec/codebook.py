"""The format-v1 codebooks: Lloyd-Max centroids of N(0, 1), rounded to bf16.

The codebook *is* the bf16 values below (not the float64 optimum they were rounded from), so a
kernel that dequantises into a bf16 tile and this reference agree bit for bit. The literals were
produced by ``lloyd_max.lloyd_max_normal(bits).to(torch.bfloat16)``; ``tests/test_codebook.py``
recomputes them. Only the positive half is written: every codebook is symmetric.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["SUPPORTED_BITS", "centroids", "centroid_values", "boundaries"]

SUPPORTED_BITS = (2, 3, 4, 8)

_POSITIVE_HALF = {
    2: (
        0.453125, 1.5078125,
    ),
    3: (
        0.2451171875, 0.7578125, 1.34375, 2.15625,
    ),
    4: (
        0.1279296875, 0.388671875, 0.65625, 0.94140625, 1.2578125, 1.6171875,
        2.0625, 2.734375,
    ),
    8: (
        0.0084228515625, 0.025390625, 0.042236328125, 0.05908203125, 0.076171875, 0.0927734375,
        0.10986328125, 0.126953125, 0.1435546875, 0.1611328125, 0.177734375, 0.1943359375,
        0.2119140625, 0.228515625, 0.24609375, 0.263671875, 0.279296875, 0.296875,
        0.314453125, 0.33203125, 0.34765625, 0.365234375, 0.3828125, 0.400390625,
        0.41796875, 0.435546875, 0.453125, 0.470703125, 0.48828125, 0.50390625,
        0.5234375, 0.5390625, 0.55859375, 0.578125, 0.59375, 0.61328125,
        0.62890625, 0.6484375, 0.66796875, 0.68359375, 0.703125, 0.72265625,
        0.73828125, 0.7578125, 0.77734375, 0.796875, 0.81640625, 0.83203125,
        0.8515625, 0.87109375, 0.890625, 0.91015625, 0.9296875, 0.94921875,
        0.96875, 0.98828125, 1.0078125, 1.03125, 1.046875, 1.0703125,
        1.0859375, 1.109375, 1.1328125, 1.1484375, 1.171875, 1.1953125,
        1.21875, 1.234375, 1.2578125, 1.28125, 1.3046875, 1.328125,
        1.3515625, 1.375, 1.3984375, 1.421875, 1.4453125, 1.46875,
        1.4921875, 1.515625, 1.5390625, 1.5703125, 1.59375, 1.6171875,
        1.640625, 1.671875, 1.6953125, 1.7265625, 1.75, 1.78125,
        1.8125, 1.84375, 1.8671875, 1.8984375, 1.9296875, 1.9609375,
        2.0, 2.03125, 2.0625, 2.09375, 2.140625, 2.171875,
        2.203125, 2.25, 2.28125, 2.328125, 2.375, 2.40625,
        2.453125, 2.5, 2.5625, 2.609375, 2.65625, 2.71875,
        2.78125, 2.84375, 2.90625, 2.984375, 3.046875, 3.140625,
        3.234375, 3.328125, 3.4375, 3.578125, 3.734375, 3.921875,
        4.1875, 4.59375,
    ),
}


def centroid_values(bits: int) -> tuple[float, ...]:
    """The 2**bits centroids, ascending, as Python floats (for kernels that bake them in)."""
    _check_bits(bits)
    half = _POSITIVE_HALF[bits]
    return tuple(-v for v in reversed(half)) + half


@functools.lru_cache(maxsize=None)
def _centroids_cpu(bits: int) -> torch.Tensor:
    full = torch.tensor(centroid_values(bits), dtype=torch.float32)
    # Every literal is a bf16 value: the round trip must be exact.
    assert torch.equal(full.to(torch.bfloat16).to(torch.float32), full)
    return full


@functools.lru_cache(maxsize=None)
def _boundaries_cpu(bits: int) -> torch.Tensor:
    c = _centroids_cpu(bits)
    # Midpoints of neighbouring bf16 centroids, computed in float32 (exact: both are bf16).
    return 0.5 * (c[1:] + c[:-1])


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in {SUPPORTED_BITS}, got {type(bits).__name__}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: choose one of {SUPPORTED_BITS}")


def centroids(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2**bits centroids, ascending, as float32 (every value exactly representable in bf16)."""
    _check_bits(bits)
    return _centroids_cpu(bits).to(device) if device is not None else _centroids_cpu(bits)


def boundaries(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2**bits - 1 decision boundaries (midpoints); a value on a boundary takes the lower index."""
    _check_bits(bits)
    return _boundaries_cpu(bits).to(device) if device is not None else _boundaries_cpu(bits)
