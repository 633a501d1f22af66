"""fa4-tq: attention on a TurboQuant-packed KV cache, built on FlashAttention-4.

    import fa4_tq
    k_packed = fa4_tq.compress(k, bits=4)          # k[batch, seqlen, kv_heads, d]
    v_packed = fa4_tq.compress(v, bits=4, seed=1)
    out, lse = fa4_tq.flash_attn_func(q, k_packed, v_packed, causal=True, return_lse=True)
"""

from .codec import (
    FORMAT_VERSION,
    SUPPORTED_BITS,
    SUPPORTED_HEAD_DIMS,
    PackedKV,
    compress,
    rotate,
    unrotate,
)
from .decode import flash_attn_with_kvcache
from .interface import BACKENDS, flash_attn_func, flash_attn_varlen_func
from .paged import PagedKVCache, compress_into
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "SUPPORTED_BITS",
    "SUPPORTED_HEAD_DIMS",
    "PackedKV",
    "PagedKVCache",
    "attention_reference",
    "compress",
    "compress_into",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "rotate",
    "unrotate",
]
