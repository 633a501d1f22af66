"""Device side of the load stage shared by every architecture (CuTeDSL).

``staging.py`` explains the scheme. The two functions here are the whole per-thread work:
``copy_part_async`` (global packed bytes -> this thread's staging slice) and ``dequant_part``
(staging slice -> ``dtype`` columns of one row of the swizzled tile). The plain PyTorch twin of
``dequant_part`` is ``PackedKV.decompress_rotated``.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass.cute.nvgpu import cpasync


@cute.jit
def copy_part_async(
    src: cute.Pointer,  # global, 16-byte aligned (8 where copy_bytes == 8)
    dst: cute.Tensor,  # shared uint8 (>= part_bytes,)
    part_bytes: cutlass.Constexpr[int],
    copy_bytes: cutlass.Constexpr[int],
):
    atom = cute.make_copy_atom(
        cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL)
        if const_expr(copy_bytes == 16)
        else cpasync.CopyG2SOp(),
        cutlass.Uint8,
        num_bits_per_copy=copy_bytes * 8,
    )
    g = cute.zipped_divide(cute.make_tensor(src, cute.make_layout((part_bytes,))), (copy_bytes,))
    s = cute.zipped_divide(cute.make_tensor(dst.iterator, cute.make_layout((part_bytes,))), (copy_bytes,))
    for i in cutlass.range_constexpr(part_bytes // copy_bytes):
        cute.copy(atom, g[None, i], s[None, i])


@cute.jit
def _chunk_bits(words: cute.Tensor, start: cutlass.Constexpr[int], width: cutlass.Constexpr[int]):
    """Bits [start, start + width) of the little-endian bit stream in ``words`` (width <= 32)."""
    w, off = start // 32, start % 32
    val = words[w] >> off
    if const_expr(off + width > 32):
        val = val | (words[w + 1] << (32 - off))
    return val


@cute.jit
def dequant_part(
    src: cute.Tensor,  # shared uint8 (part_bytes,), 16-byte aligned
    table: cute.Tensor,  # shared float32: pairs (2 * 4**bits,) or singles (256,)
    sigma: Float32,
    dst: cute.Tensor,  # shared (cols,) of the tile row, possibly swizzled
    bits: cutlass.Constexpr[int],
    cols: cutlass.Constexpr[int],
):
    nwords = cols * bits // 32
    words = cute.make_rmem_tensor((nwords,), Uint32)
    src32 = cute.recast_tensor(cute.make_tensor(src.iterator, cute.make_layout((nwords * 4,))), Uint32)
    cute.autovec_copy(src32, words)
    dst_chunks = cute.zipped_divide(dst, (8,))
    for c in cutlass.range_constexpr(cols // 8):
        f = cute.make_rmem_tensor((8,), Float32)
        if const_expr(bits == 8):
            for e in cutlass.range_constexpr(8):
                code = Int32(_chunk_bits(words, 64 * c + 8 * e, 8) & 0xFF)
                f[e] = table[code] * sigma
        else:
            chunk = _chunk_bits(words, 8 * bits * c, 8 * bits)
            mask = (1 << (2 * bits)) - 1
            for p in cutlass.range_constexpr(4):
                pair = Int32((chunk >> (2 * bits * p)) & mask)
                f[2 * p] = table[2 * pair] * sigma
                f[2 * p + 1] = table[2 * pair + 1] * sigma
        o = cute.make_rmem_tensor((8,), dst.element_type)
        o.store(f.load().to(dst.element_type))
        cute.autovec_copy(o, dst_chunks[None, c])
