"""Online cache write (CuTeDSL): rotate, normalise, quantise, pack and scatter new K and V rows
into a packed cache in one launch, any architecture (plain CUDA cores; compiled for SM90/SM100).

One row = one (token, head) vector of ``d`` values. ``L = d / E`` consecutive lanes of a warp own
a row, ``E = max(8, d / 32)`` values each (8 codes of ``b`` bits pack into ``b`` whole bytes, so a
lane writes its bytes alone). Per row, exactly as ``fa4_tq.compress`` (the reference) computes it:

1. ``f = x * s`` in float32; the Walsh-Hadamard butterflies in the reference's stage order
   (strides 1, 2, 4, ...: within a lane, then across lanes by ``shfl.bfly``), times
   ``1/sqrt(d)``. Same float32 operations in the same order: the rotated row is bit-identical.
2. ``norm = ||y||`` (a lane sum, then a butterfly sum over the row's lanes: the only reduction
   whose order differs from torch's, so ``u = y * sqrt(d) / norm`` can differ in its last bit
   and a value on a decision boundary can take the neighbouring code: the tests count those).
3. The code: the codebook is symmetric, so the magnitude index is the number of positive
   boundaries below ``|u|`` (constants compared for 2/3/4 bits, a 7-step binary search in a
   table for 8 bits); ``u > 0`` takes ``m + k``, else ``m - 1 - k`` (``m = 2**(b-1)``), and a value
   on a boundary takes the lower code, as ``torch.bucketize`` does.
4. ``sigma = norm / ||g[idx]||`` rounded to the scale dtype; codes packed little-endian.

Rows whose slot is -1 (padding) are computed and not written; a zero vector gets codes
``m - 1`` and scale 0, like the reference.
"""

from __future__ import annotations

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..codec.codebook import centroid_values

THREADS = 128


def lanes_per_row(head_dim: int) -> tuple[int, int]:
    """(lanes L, values per lane E) for a row of ``head_dim`` values."""
    e = max(8, head_dim // 32)
    return head_dim // e, e


def positive_boundaries(bits: int) -> list[float]:
    """The 2**(b-1) - 1 positive decision boundaries (float32 midpoints of bf16 centroids): the
    upper half of ``codebook.boundaries(bits)``, computed from Python floats because the kernel
    calls this while tracing, under torch's FakeTensorMode in CPU compiles (no torch ops there)."""
    import struct

    c = [v for v in centroid_values(bits) if v > 0]
    f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]
    return [f32(0.5 * (c[j] + c[j + 1])) for j in range(len(c) - 1)]


def search_table(bits: int):
    """float32 [2, 128]: row 0 the positive boundaries padded with +inf, row 1 the squared
    positive centroids (by magnitude index). The kernel reads it for 8-bit searches and for the
    norm of the quantised row."""
    import torch

    t = torch.full((2, 128), float("inf"), dtype=torch.float32)
    pb = positive_boundaries(bits)
    t[0, : len(pb)] = torch.tensor(pb, dtype=torch.float32)
    c = torch.tensor([v for v in centroid_values(bits) if v > 0], dtype=torch.float32)
    t[1, : len(c)] = c * c
    return t


class CacheWrite:
    """Compile-time configuration of one cache-write kernel (head_dim, K/V bits, dtypes)."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int):
        self.head_dim = head_dim
        self.bits = (k_bits, v_bits)
        self.lanes, self.per_lane = lanes_per_row(head_dim)
        self.rows_per_cta = THREADS // self.lanes

    @cute.jit
    def __call__(
        self,
        mK: cute.Tensor,  # (T, H, d) bf16/fp16, last dim contiguous, rows 16-byte aligned
        mV: cute.Tensor,
        mSlots: cute.Tensor,  # (T,) int32/int64; -1 = skip
        mKData: cute.Tensor,  # (P, S, H, d*kb/8) uint8
        mVData: cute.Tensor,
        mKScale: cute.Tensor,  # (P, H, S) fp16/fp32
        mVScale: cute.Tensor,
        mKSigns: cute.Tensor,  # (d,) float32 +-1
        mVSigns: cute.Tensor,
        mKTable: cute.Tensor,  # (2, 128) float32, search_table(k_bits)
        mVTable: cute.Tensor,
        stream: cuda.CUstream = None,
    ):
        rows = mK.shape[0] * mK.shape[1]
        grid_x = (rows + self.rows_per_cta - 1) // self.rows_per_cta
        self.kernel(mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKSigns, mVSigns, mKTable, mVTable).launch(
            grid=[grid_x, 2, 1], block=[THREADS, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKSigns, mVSigns, mKTable, mVTable):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, bidy, _ = cute.arch.block_idx()
        row = bidx * self.rows_per_cta + tidx // self.lanes
        lane = tidx % self.lanes
        if bidy == 0:
            self._row(mK, mSlots, mKData, mKScale, mKSigns, mKTable, self.bits[0], row, lane)
        else:
            self._row(mV, mSlots, mVData, mVScale, mVSigns, mVTable, self.bits[1], row, lane)

    @cute.jit
    def _row(self, mX, mSlots, mData, mScale, mSigns, mTable, bits: cutlass.Constexpr[int], row, lane):
        d, L, E = self.head_dim, self.lanes, self.per_lane
        num_heads = mX.shape[1]
        valid = row < mX.shape[0] * num_heads
        tok = row // num_heads if valid else Int32(0)
        head = row % num_heads
        slot = Int64(mSlots[tok]) if valid else Int64(-1)

        # 1. load E values (16-byte vectors), signs, butterflies
        xs = cute.make_rmem_tensor((E,), mX.element_type)
        xs.fill(0)
        if valid:
            src = cute.domain_offset((tok, head, lane * E), mX)
            ptr = cute.make_ptr(mX.element_type, src.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
            cute.autovec_copy(cute.make_tensor(ptr, cute.make_layout((E,))), xs)
        f = cute.make_rmem_tensor((E,), Float32)
        for j in cutlass.range_constexpr(E):
            f[j] = Float32(xs[j]) * mSigns[lane * E + j]
        for s in cutlass.range_constexpr(E.bit_length() - 1):  # strides 1, 2, .. E/2 inside a lane
            h = 1 << s
            for j in cutlass.range_constexpr(E):
                if const_expr(j & h == 0):
                    a, b = f[j], f[j + h]
                    f[j], f[j + h] = a + b, a - b
        for s in cutlass.range_constexpr(L.bit_length() - 1):  # strides E, 2E, ..: across lanes
            off = 1 << s
            upper = (lane & off) != 0  # the upper partner keeps (lower - upper)
            for j in cutlass.range_constexpr(E):
                other = cute.arch.shuffle_sync_bfly(f[j], offset=off)
                f[j] = (other - f[j]) if upper else (f[j] + other)
        inv_sqrt_d = Float32(1.0 / math.sqrt(d))
        sq = Float32(0.0)
        for j in cutlass.range_constexpr(E):
            f[j] = f[j] * inv_sqrt_d
            sq += f[j] * f[j]
        sq = cute.arch.warp_reduction(sq, lambda x, y: x + y, threads_in_group=L)
        norm = cute.math.sqrt(sq)
        safe = norm if norm > Float32(0.0) else Float32(1.0)
        to_unit = Float32(math.sqrt(d)) / safe

        # 2. codes and the norm of the quantised row
        m = 1 << (bits - 1)
        pb = positive_boundaries(bits)
        codes = cute.make_rmem_tensor((E,), Uint32)
        gsq = Float32(0.0)
        for j in cutlass.range_constexpr(E):
            u = f[j] * to_unit
            pos = u > Float32(0.0)
            # ``b <= |u|`` on the negative side: compare against the next float above |u|
            a = u if pos else _next_up(-u)
            k = Int32(0)
            if const_expr(bits == 8):
                for step in (64, 32, 16, 8, 4, 2, 1):
                    if mTable[0, k + step - 1] < a:
                        k += step
            else:
                for bnd in pb:
                    if Float32(bnd) < a:
                        k += 1
            codes[j] = Uint32(m + k) if pos else Uint32(m - 1 - k)
            gsq += mTable[1, k]
        gsq = cute.arch.warp_reduction(gsq, lambda x, y: x + y, threads_in_group=L)
        sigma = norm / cute.math.sqrt(gsq)

        # 3. pack (E codes -> E*bits/8 bytes) and store where the slot says
        if slot >= 0:
            page_size = mData.shape[1]
            page, pos_in_page = slot // page_size, slot % page_size
            nbytes = E * bits // 8
            dst = cute.domain_offset((page, pos_in_page, head, lane * nbytes), mData)
            addr = dst.iterator.toint()
            for g in cutlass.range_constexpr(E // 8):  # 8 codes -> ``bits`` bytes (format v1)
                words = []
                for w in cutlass.range_constexpr(2 if bits == 8 else 1):
                    word = Uint32(0)
                    for i in cutlass.range_constexpr(4 if bits == 8 else 8):
                        word = word | (codes[8 * g + (4 if bits == 8 else 8) * w + i] << (bits * i))
                    words.append(word)
                if const_expr(bits >= 4):  # 4 or 8 bytes, 4-byte aligned
                    p = cute.make_ptr(Uint32, addr + g * bits, cute.AddressSpace.gmem, assumed_align=4)
                    out32 = cute.make_tensor(p, cute.make_layout((len(words),)))
                    for w in cutlass.range_constexpr(len(words)):
                        out32[w] = words[w]
                else:  # 2 or 3 bytes (3-bit groups are not 2-byte aligned)
                    p = cute.make_ptr(cutlass.Uint8, addr + g * bits, cute.AddressSpace.gmem, assumed_align=1)
                    out8 = cute.make_tensor(p, cute.make_layout((bits,)))
                    for i in cutlass.range_constexpr(bits):
                        out8[i] = cutlass.Uint8((words[0] >> (8 * i)) & 0xFF)
            if lane == 0:
                mScale[page, head, pos_in_page] = mScale.element_type(sigma)


@dsl_user_op
def _next_up(a: Float32, *, loc=None, ip=None) -> Float32:
    """The next float32 above a finite ``a >= 0`` (its bit pattern + 1), so that
    ``b < _next_up(a)`` is ``b <= a``."""
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(a).ir_value(loc=loc, ip=ip)],
        "{ .reg .b32 t;\n mov.b32 t, $1;\n add.u32 t, t, 1;\n mov.b32 $0, t; }", "=f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))
