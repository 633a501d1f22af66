"""Walsh-Hadamard transforms on values held in registers (CuTeDSL), shared by the cache-write
kernel (rotating new K/V rows), the decode kernel and the fused query rotation.

``butterflies``: a row of ``per * lanes`` values is split over ``lanes`` adjacent lanes, ``per``
consecutive values each. The stages run in the order of the reference (``codec.rotation._fwht``:
strides 1, 2, 4, ...), first those inside a lane, then those across lanes by ``shfl.bfly``, each
one the same float32 add or subtract: the result is bit-identical to the reference's.

``rotate_mma``: the same transform on the tensor cores, for rows of ``4 * per`` values of which
lane ``(g, q) = (lane / 4, lane % 4)`` of a warp holds values ``per*q .. per*q + per - 1`` of row
``g`` (the cache write's head_dim-128 layout, ``per`` = 32; the fused query rotation's, ``per`` =
``d / 4``). ``H_d`` is a Kronecker product of one ``H_2`` per bit of the index, so it splits along
any grouping of the bits. Write a column as ``per*q + 4B + e`` (``e`` < 4, ``B`` < ``per / 4``):
one ``mma.sync.m16n8k16`` per (``B`` pair, half of the outputs) applies the 16x16 factor over the
bits of ``e`` and ``q``, with M = the 8 rows x 2 values of ``B``, so that every A fragment is a
word the lane already holds and every output lands where the lane needs it; then the factor over
the bits of ``B`` is butterfly stages inside the lane. At ``per`` = 32, 8 MMAs and 96 adds replace
224 adds and 64 shuffles (and the 32 conversions to float32) per 32 values; the sums are rounded
in another order, so ``h`` agrees with the reference's to float32 rounding, not bit for bit.
``row_norm_sq_mma`` takes the rows' squared norms from the same fragments (the diagonal of
``A A^T``). The plain PyTorch model of the fragments is in tests/test_hadamard_mma.py.

``mma_tf32_split``: one ``mma.sync.m16n8k8`` tf32 product of float32 values taken as two
tf32 parts (high bits, then the remainder), exact to about 2^-20 of each value where one tf32
part would round at 2^-11: the output un-rotation's factor over the columns that span a quad of
lanes (``fused_rotation.unrotate_acc``).
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from .load_stage import mma_16816

def pow2_bits(e: int, bf16: bool) -> int:
    """``2**e`` in bf16 (True) or fp16, as 16 bits; ``-2**e`` adds the sign bit."""
    return (127 + e) << 7 if bf16 else (15 + e) << 10


ONE_BITS = {bf16: pow2_bits(0, bf16) for bf16 in (True, False)}  # 1.0: 0x3F80 in bf16, 0x3C00 in fp16


def scale_split(d: int) -> tuple[int, float]:
    """``1/sqrt(d) = 2**-e * rest``: the power of two, exact in any float format and so free in a
    +-1 matrix, and the rest (1, or 1/sqrt(2) for odd powers of two)."""
    e = (d.bit_length() - 1) // 2
    return e, 2.0 ** e / math.sqrt(d)


@cute.jit
def butterflies(f: cute.Tensor, per: cutlass.Constexpr[int], lane: Int32, lanes: cutlass.Constexpr[int],
                first: cutlass.Constexpr[int] = 1):
    """``f`` (float32 rmem, ``per`` values) <- this lane's part of ``H_{per*lanes} row``, unscaled;
    ``lane`` = 0..lanes-1 within the row. ``first`` > 1 skips the stages of smaller stride
    inside a lane (``rotate_mma`` has done them)."""
    for s in cutlass.range_constexpr(per.bit_length() - 1):  # strides 1, 2, .. per/2 inside a lane
        h = 1 << s
        if const_expr(h >= first):
            for j in cutlass.range_constexpr(per):
                if const_expr(j & h == 0):
                    a, b = f[j], f[j + h]
                    f[j], f[j + h] = a + b, a - b
    for s in cutlass.range_constexpr(lanes.bit_length() - 1):  # strides per, 2 per, ..: across lanes
        off = 1 << s
        # lower lane: f + other; upper lane: other - f (a product by +-1 is exact: one rounding)
        sgn = Float32(-1.0) if (lane & off) != 0 else Float32(1.0)
        for j in cutlass.range_constexpr(per):
            other = cute.arch.shuffle_sync_bfly(f[j], offset=off)
            f[j] = f[j] * sgn + other


# ----------------------------------------------------------------------------- on the tensor cores
def mma_a_words(t: int) -> tuple[int, int, int, int]:
    """The lane's words (pairs of values ``2w, 2w+1`` of its 32) that form the A fragment of
    m-tile ``t``: M rows ``g`` / ``g + 8`` are ``B = 2t`` / ``2t + 1``, k positions ``2q, 2q+1`` /
    ``2q+8, 2q+9`` are ``e = 0, 1`` / ``2, 3`` (PTX order a0-a3: (g, lo k), (g+8, lo k), (g, hi k),
    (g+8, hi k))."""
    return 4 * t, 4 * t + 2, 4 * t + 1, 4 * t + 3


def mma_c_values(t: int, j: int) -> tuple[int, int, int, int]:
    """Where the four accumulators of m-tile ``t``, n-tile ``j`` go among the lane's 32 outputs
    (``4B + e``): columns ``2q, 2q+1`` of n-tile ``j`` are ``e = 2j, 2j + 1``; rows ``g``, ``g + 8``
    are ``B = 2t, 2t + 1``."""
    return 8 * t + 2 * j, 8 * t + 2 * j + 1, 8 * t + 4 + 2 * j, 8 * t + 5 + 2 * j


def h16_fragment(j: int, g, q, one: int) -> list:
    """Lane ``(g, q)``'s two B-fragment words of n-tile ``j`` of the +-1 factor over the bits of
    ``e`` and ``q``: word ``h`` holds the entries (k = input ``e = 2h``, ``2h + 1`` of lane ``q``;
    n = output ``e = 2j + (g & 1)`` of lane ``g >> 1``), each ``(-1)^popcount`` of the bits the two
    share, as ``one`` with or without the sign bit. Plain operators: Python ints in the tests,
    DSL integers (``g``, ``q``) in the kernel."""
    e_out = (g & 1) + 2 * j
    x = q & (g >> 1)
    sign_q = (x ^ (x >> 1)) & 1
    words = []
    for h in range(2):
        lo, hi = 2 * h & e_out, (2 * h + 1) & e_out
        s_lo = sign_q ^ ((lo ^ (lo >> 1)) & 1)
        s_hi = sign_q ^ ((hi ^ (hi >> 1)) & 1)
        words.append((one | (s_lo << 15)) | ((one | (s_hi << 15)) << 16))
    return words


@cute.jit
def h16_fragments(g: Int32, q: Int32, bf16: cutlass.Constexpr[bool], exp2: cutlass.Constexpr[int] = 0) -> cute.Tensor:
    """``h16_fragment`` of both n-tiles as a 4-word rmem tensor (computed once per thread), its
    entries +-``2**exp2``."""
    hb = cute.make_rmem_tensor((4,), Uint32)
    for j in cutlass.range_constexpr(2):
        w = h16_fragment(j, g, q, pow2_bits(exp2, bf16))
        hb[2 * j], hb[2 * j + 1] = Uint32(w[0]), Uint32(w[1])
    return hb


@cute.jit
def rotate_mma(xw: cute.Tensor, f: cute.Tensor, hb: cute.Tensor, bf16: cutlass.Constexpr[bool]):
    """``f`` (``per`` float32, ``per`` in 16, 32, 64) <- the lane's ``per`` values of ``H_{4 per}
    row``, unscaled, from ``xw`` (its ``per / 2`` words of bf16/fp16 pairs, signs applied) and
    ``hb`` (``h16_fragments``). The warp's 32 lanes must all call it (``mma.sync``)."""
    per = cute.size(f)
    zero = Float32(0.0)
    for t in cutlass.range_constexpr(per // 8):
        a = tuple(xw[w] for w in mma_a_words(t))
        for j in cutlass.range_constexpr(2):
            c = mma_16816(a, (hb[2 * j], hb[2 * j + 1]), (zero, zero, zero, zero), bf16)
            for i, at in enumerate(mma_c_values(t, j)):
                f[at] = c[i]
    butterflies(f, per, Int32(0), 1, first=4)


def gram_diagonal_lane(g: int) -> tuple[int, int]:
    """Where row ``g``'s squared norm is after ``row_norm_sq_mma``'s products: in lane
    ``(g, g >> 1)``, accumulator ``c0`` (``g`` even) or ``c1`` of the first product and ``c2`` or
    ``c3`` of the second (the diagonal entries ``(g, g)`` and ``(g + 8, g + 8)`` of ``A A^T``)."""
    return 4 * g + (g >> 1), g & 1


@cute.jit
def row_norm_sq_mma(xw: cute.Tensor, bf16: cutlass.Constexpr[bool]) -> Float32:
    """``||x||^2`` of the lane's row (its 4 lanes' 128 values; ``||H x||^2`` is 128 times it),
    from the diagonal of ``A A^T`` of ``rotate_mma``'s A fragments (``per`` = 32): the B fragment of
    ``A^T``'s first 8 columns is the lane's own ``(a0, a2)``, of the other 8 ``(a1, a3)``. Eight
    MMAs and a shuffle, where the products and sums of the 32 values and two shuffles took 37
    instructions. Squares of bf16/fp16 values are exact in float32; the sum rounds as the tensor
    core's does. All 32 lanes must call it."""
    zero = Float32(0.0)
    lo = (zero, zero, zero, zero)
    hi = (zero, zero, zero, zero)
    for t in cutlass.range_constexpr(4):
        a = tuple(xw[w] for w in mma_a_words(t))
        lo = mma_16816(a, (a[0], a[2]), lo, bf16)
        hi = mma_16816(a, (a[1], a[3]), hi, bf16)
    src, odd = gram_diagonal_lane(cute.arch.lane_idx() // 4)
    mine = lo[1] + hi[3] if odd != 0 else lo[0] + hi[2]
    return cute.arch.shuffle_sync(mine, src)


# ----------------------------------------------------------------------------- accumulator, tf32
def h8_sign_bit(col_in: int, col_out: int) -> int:
    """1 where ``H_8`` at (``col_in``, ``col_out``) is -1: the parity of the bits they share. Plain
    operators: Python ints in the tests, DSL integers in the kernel."""
    x = col_in & col_out
    x = x ^ (x >> 1)
    return (x ^ (x >> 2)) & 1


def tf32_a_values() -> tuple[tuple[int, int], ...]:
    """The lane's accumulators (row ``g`` = 0 / ``g + 8`` = 1, ``e``) of an 8-column group
    that form the A fragment of its m16n8k8 product, in PTX order a0 (row g, k = t), a1 (row
    g+8, k = t), a2 (row g, k = t + 4), a3 (row g+8, k = t + 4): k = t + 4e stands for column
    ``2t + e``, so the lane's own values are the fragment."""
    return (0, 0), (1, 0), (0, 1), (1, 1)


@dsl_user_op
def mma_tf32_split(a: tuple, b: tuple, *, loc=None, ip=None) -> tuple:
    """``A B`` for one m16n8k8 tf32 MMA (float32 accumulators, ``a`` 4 and ``b`` 2 float32 in
    the PTX fragment layouts; ``b`` must be exact in tf32), A taken as high part (low 13 bits
    cleared) plus remainder, two products summed on the tensor core: the remainder's own
    truncation costs about 2^-20 of each value, one tf32 part about 2^-11."""
    res = llvm.inline_asm(
        ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
        [Float32(x).ir_value(loc=loc, ip=ip) for x in (*a, *b)],
        "{ .reg .b32 h0, h1, h2, h3, l0, l1, l2, l3, b0, b1, z; .reg .f32 r0, r1, r2, r3;\n"
        " and.b32 h0, $4, 0xFFFFE000;\n and.b32 h1, $5, 0xFFFFE000;\n"
        " and.b32 h2, $6, 0xFFFFE000;\n and.b32 h3, $7, 0xFFFFE000;\n"
        " sub.f32 r0, $4, h0;\n sub.f32 r1, $5, h1;\n sub.f32 r2, $6, h2;\n sub.f32 r3, $7, h3;\n"
        " mov.b32 l0, r0;\n mov.b32 l1, r1;\n mov.b32 l2, r2;\n mov.b32 l3, r3;\n"
        " mov.b32 b0, $8;\n mov.b32 b1, $9;\n mov.b32 z, 0;\n"
        " mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {$0, $1, $2, $3}, {l0, l1, l2, l3}, {b0, b1}, "
        "{z, z, z, z};\n"
        " mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {$0, $1, $2, $3}, {h0, h1, h2, h3}, {b0, b1}, "
        "{$0, $1, $2, $3};\n}",
        "=f,=f,=f,=f,f,f,f,f,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))
