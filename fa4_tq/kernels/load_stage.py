"""Device side of the load stage shared by every architecture (CuTeDSL).

``staging.py`` explains the scheme. The functions here are the whole per-thread work:
``copy_part_async`` (global packed bytes -> this thread's staging slice) and ``dequant_part``
(staging slice, or global bytes -> ``dtype`` columns of one row of the swizzled tile), or
``load_words`` then ``dequant_words`` (the same conversion from codes loaded into registers
earlier, for a caller with something to wait on between the two: the MLA producer);
``packed_shape_carrier`` is the SM100 subclasses' way of handing FA4 packed K/V. The plain PyTorch twin of
``dequant_part`` is ``PackedKV.decompress_rotated``. The register ops below them (``prmt``, packed
bf16x2/f16x2 arithmetic, one ``mma.sync``) are shared with the decode and cache-write kernels.
"""

from __future__ import annotations

from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync
from cutlass.cutlass_dsl import T, dsl_user_op

from .staging import decode_eight, decode_four, entry_pairs, planes_from_pairs


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


def packed_shape_carrier(mX: cute.Tensor, dtype, cols: int) -> cute.Tensor:
    """A ``dtype`` tensor of the logical shape (..., cols) over packed uint8 rows ``mX`` whose
    element (..., 0) sits at the packed row's byte address: strides are the packed byte strides
    over the dtype width (every packed stride is even). FA4 builds its layouts and per-row
    pointers from it; the packed loads read ``mX`` itself."""
    width = dtype.width // 8
    layout = cute.make_layout((*mX.shape[:-1], cols), stride=(*[s // width for s in mX.stride[:-1]], 1))
    return cute.make_tensor(cute.recast_ptr(mX.iterator, dtype=dtype), layout)


# ----------------------------------------------------------------------------- register ops
# Plain PTX the compiler may schedule freely (no side effects), unlike cute.arch.prmt.
def _asm(ptx: str, constraints: str, *args, loc=None, ip=None) -> Uint32:
    return Uint32(llvm.inline_asm(
        T.i32(), [a.ir_value(loc=loc, ip=ip) for a in args], ptx, constraints,
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dsl_user_op
def prmt(a, b, sel, *, loc=None, ip=None) -> Uint32:
    """Byte permute: output byte i is byte ``sel`` nibble i (0-7) of the pair {b, a}."""
    return _asm("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", Uint32(a), Uint32(b), Uint32(sel), loc=loc, ip=ip)


@dsl_user_op
def pack_x2(lo: Float32, hi: Float32, bf16: bool, *, loc=None, ip=None) -> Uint32:
    """Two float32 -> one bf16x2/f16x2 word (round to nearest), ``lo`` in the low half."""
    t = "bf16x2" if bf16 else "f16x2"
    return _asm(f"cvt.rn.{t}.f32 $0, $2, $1;", "=r,f,f", Float32(lo), Float32(hi), loc=loc, ip=ip)


@dsl_user_op
def mul_x2(a: Uint32, b: Uint32, bf16: bool, *, loc=None, ip=None) -> Uint32:
    """Packed bf16x2/f16x2 product, rounded once to nearest (HMUL2)."""
    t = "bf16x2" if bf16 else "f16x2"
    return _asm(f"mul.rn.{t} $0, $1, $2;", "=r,r,r", Uint32(a), Uint32(b), loc=loc, ip=ip)


@dsl_user_op
def fma_x2(a: Uint32, b: Uint32, c: Uint32, bf16: bool, *, loc=None, ip=None) -> Uint32:
    """Packed ``a * b + c``, rounded once (HFMA2)."""
    t = "bf16x2" if bf16 else "f16x2"
    return _asm(f"fma.rn.{t} $0, $1, $2, $3;", "=r,r,r,r", Uint32(a), Uint32(b), Uint32(c), loc=loc, ip=ip)


@dsl_user_op
def scale_residual_x2(sigma: Float32, bf16: bool, *, loc=None, ip=None) -> Uint32:
    """``sigma - T(sigma)`` rounded to T, twice: with ``pack_x2(sigma, sigma)`` it carries sigma
    to ~16 significant bits, so the tile is not scaled by a sigma rounded to bf16 (whose 2^-9
    error is the same for a whole key: it would scale that key's scores, not average out)."""
    if bf16:  # bf16 -> f32 is the top half of the bits
        ptx = ("{ .reg .b32 h; .reg .f32 r;\n cvt.rn.bf16x2.f32 h, $1, $1;\n and.b32 h, h, 0xFFFF0000;\n"
               " sub.f32 r, $1, h;\n cvt.rn.bf16x2.f32 $0, r, r; }")
    else:
        ptx = ("{ .reg .b16 h; .reg .f32 hf, r;\n cvt.rn.f16.f32 h, $1;\n cvt.f32.f16 hf, h;\n"
               " sub.f32 r, $1, hf;\n cvt.rn.f16x2.f32 $0, r, r; }")
    return _asm(ptx, "=r,f", Float32(sigma), loc=loc, ip=ip)


@dsl_user_op
def mma_16816(a, b, c, bf16: bool, *, loc=None, ip=None) -> tuple:
    """``c + A B`` for one m16n8k16 MMA (float32 accumulators): ``a`` 4 words, ``b`` 2, ``c`` 4
    floats in the PTX fragment layouts."""
    t = "bf16" if bf16 else "f16"
    res = llvm.inline_asm(
        ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
        [Uint32(x).ir_value(loc=loc, ip=ip) for x in (*a, *b)] + [Float32(x).ir_value(loc=loc, ip=ip) for x in c],
        f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, "
        "{$8, $9}, {$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))


# ----------------------------------------------------------------------------- dequantisation
@cute.jit
def _chunk_bits(words: cute.Tensor, start: cutlass.Constexpr[int], width: cutlass.Constexpr[int]):
    """Bits [start, start + width) of the little-endian bit stream in ``words`` (width <= 32);
    bits above ``width`` are garbage the callers mask."""
    w, off = start // 32, start % 32
    val = words[w] >> off
    if const_expr(off + width > 32):
        val = val | (words[w + 1] << (32 - off))
    return val


@cute.jit
def dequant_part(
    src: cute.Tensor,  # shared uint8 (part_bytes,), 16-byte aligned
    sigma: Float32,
    dst: cute.Tensor,  # shared (cols,) of the tile row, possibly swizzled; bf16 or fp16
    bits: cutlass.Constexpr[int],
    cols: cutlass.Constexpr[int],
    table: Optional[cute.Tensor] = None,  # shared float32 codebook (256,), 8-bit codes only
    unroll: cutlass.Constexpr[int] = 1,
):
    """``dst[j] = T(g * sigma_hi + T(g * sigma_lo))``, ``g = g[code_j]``, in the tile dtype T
    (``sigma_hi = T(sigma)``, ``sigma_lo = T(sigma - sigma_hi)``), eight columns per 16-byte store.

    2/3/4-bit codes are looked up in registers: the row's 2**bits codebook entries are scaled
    once (a packed multiply + FMA per two entries), split into byte planes, and ``prmt`` indexes
    them by four codes at once (``staging.decode_four``): no per-element arithmetic besides the
    permutes, and no shared-memory lookups beside FA4's wgmma reads (random lookups into a shared
    table cost 3-4 bank-conflicted wavefronts each). 8-bit codes (256 entries, too many for
    registers) use the shared ``table`` and scale each pair of elements."""
    scale = _row_scale(sigma, dst.element_type, bits)
    src32 = cute.recast_tensor(cute.make_tensor(src.iterator, cute.make_layout((cols * bits // 8,))), Uint32)
    dst_chunks = cute.zipped_divide(dst, (8,))
    # 32 codes (``bits`` words) per iteration, ``unroll`` iterations per loop trip. With every
    # element still scaled, a fully unrolled row spilled (K4V4 at 56 producer registers); the
    # scaled codebook leaves a 4-bit element three integer ops, and the kernel unrolls a whole
    # head_dim-128 row (sm90.py says what that measured).
    for it in cutlass.range(cols // 32, unroll=unroll):
        words = cute.make_rmem_tensor((bits,), Uint32)
        cute.autovec_copy(cute.local_tile(src32, (bits,), (it,)), words)
        _decode_32(words, scale, dst_chunks, it, bits, table)


@cute.jit
def dequant_words(
    words: cute.Tensor,  # registers (cols * bits // 32,) Uint32: the part's codes (load_words)
    sigma: Float32,
    dst: cute.Tensor,  # as dequant_part's
    bits: cutlass.Constexpr[int],
    cols: cutlass.Constexpr[int],
    table: Optional[cute.Tensor] = None,  # as dequant_part's
):
    """``dequant_part`` on codes already in registers: a caller that loads them (``load_words``)
    before it waits for something else (a free pipeline stage) has their global latency behind
    it. Fully unrolled: registers are indexed at compile time."""
    scale = _row_scale(sigma, dst.element_type, bits)
    dst_chunks = cute.zipped_divide(dst, (8,))
    for it in cutlass.range_constexpr(cols // 32):
        _decode_32(cute.local_tile(words, (bits,), (it,)), scale, dst_chunks, it, bits, table)


@cute.jit
def load_words(src: cute.Tensor, words: cute.Tensor, bits: cutlass.Constexpr[int], cols: cutlass.Constexpr[int]):
    """``cols`` codes of global ``src`` (uint8, 16-byte aligned) into the register words that
    ``dequant_words`` converts."""
    src32 = cute.recast_tensor(cute.make_tensor(src.iterator, cute.make_layout((cols * bits // 8,))), Uint32)
    cute.autovec_copy(src32, words)


def _row_scale(sigma: Float32, dtype, bits: int):
    """Traced inline by the conversions: (sigma_hi, sigma_lo, the byte planes of the codebook
    scaled by sigma, or None for 8-bit codes)."""
    bf16 = dtype == cutlass.BFloat16
    sigma_hi, sigma_lo = pack_x2(sigma, sigma, bf16), scale_residual_x2(sigma, bf16)
    planes = None
    if bits != 8:
        pairs = [fma_x2(Uint32(g), sigma_hi, mul_x2(Uint32(g), sigma_lo, bf16), bf16)
                 for g in entry_pairs(bits, "bfloat16" if bf16 else "float16")]
        planes = planes_from_pairs(pairs, prmt)
    return sigma_hi, sigma_lo, planes


def _decode_32(words: cute.Tensor, scale, dst_chunks: cute.Tensor, it, bits: int, table: Optional[cute.Tensor]):
    """32 codes (``bits`` words) -> columns ``32 it .. 32 it + 31`` of the row, four 16-byte stores."""
    sigma_hi, sigma_lo, planes = scale
    dtype = dst_chunks.element_type
    bf16 = dtype == cutlass.BFloat16
    o = cute.make_rmem_tensor((16,), Uint32)
    for c in range(4):
        if bits == 8:
            for p in range(4):
                w = words[2 * c + p // 2] >> (16 * (p % 2))
                g2 = pack_x2(table[Int32(w & 0xFF)], table[Int32((w >> 8) & 0xFF)], bf16)
                o[4 * c + p] = fma_x2(g2, sigma_hi, mul_x2(g2, sigma_lo, bf16), bf16)
        elif bits == 4:  # eight codes a word
            o[4 * c], o[4 * c + 1], o[4 * c + 2], o[4 * c + 3] = decode_eight(
                words[c], "bfloat16" if bf16 else "float16", prmt, planes)
        else:
            chunk = _chunk_bits(words, 8 * bits * c, 8 * bits)
            for h in range(2):
                o[4 * c + 2 * h], o[4 * c + 2 * h + 1] = decode_four(
                    chunk >> (4 * bits * h), bits, "bfloat16" if bf16 else "float16", prmt, planes)
    out = cute.recast_tensor(o, dtype)
    for c in range(4):
        cute.autovec_copy(cute.local_tile(out, (8,), (c,)), dst_chunks[None, it * 4 + c])
