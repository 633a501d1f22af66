"""TurboQuant codec, format v1 (docs/FORMAT.md)."""

from .codebook import SUPPORTED_BITS, boundaries, centroids
from .packed import FORMAT_VERSION, SCALE_DTYPES, PackedKV, compress, scales_shape
from .packing import pack, row_bytes, unpack
from .rotation import (
    SUPPORTED_HEAD_DIMS, hadamard, rotate, rotate_rounded, sign_vector, unrotate, unrotate_rounded,
)

__all__ = [
    "FORMAT_VERSION",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "SUPPORTED_HEAD_DIMS",
    "PackedKV",
    "boundaries",
    "centroids",
    "compress",
    "hadamard",
    "pack",
    "rotate",
    "rotate_rounded",
    "row_bytes",
    "scales_shape",
    "sign_vector",
    "unpack",
    "unrotate",
    "unrotate_rounded",
]
