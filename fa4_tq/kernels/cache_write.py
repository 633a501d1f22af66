"""Online cache write (CuTeDSL): rotate, normalise, quantise, pack and scatter new K and V rows
into a packed cache in one launch, any architecture (plain CUDA cores; compiled for SM90/SM100).

One row = one (token, head) vector of ``d`` values, owned by ``L = d / E`` consecutive lanes of
``E = 32`` values each (4 lanes at head_dim 128: measured faster on the H100 than 2 or 1, which
hold more registers and keep fewer rows in flight; ``perf/bench_compress.py --sweep``). CTAs
loop over blocks of rows, loading the next row while they compute one; blockIdx.y picks K or V.
Per row, as ``fa4_tq.compress`` (the reference) computes it:

1. ``f = x * s`` (the sign flipped on the input bits, exact), the Walsh-Hadamard butterflies in
   the reference's stage order (strides 1, 2, 4, ...: within a lane, then across lanes by
   ``shfl.bfly``): the same float32 operations in the same order as the reference, so ``h = H f``
   is bit-identical.
2. ``u = h * sqrt(d) / ||h||`` (the reference's ``y = h / sqrt(d)``, ``u = y * sqrt(d) / ||y||``
   in one product per value, and a running sum for the norm): ``u`` can differ from the
   reference's in its last bit or two, so a value within that of a decision boundary can take
   the neighbouring code. The tests count those ties.
3. The code: the number of boundaries strictly below ``u`` (``torch.bucketize``: a value on a
   boundary takes the lower code). It comes from one shared-memory bucket: ``u * S + C`` (``S``
   a power of two so that a bucket holds at most one boundary, ``C`` the buckets below zero,
   ``search_table``) names the bucket, which stores how many boundaries lie below it, its one
   candidate boundary and the squared centroids of the two possible codes; one float compare
   finishes the search, for every width (8 bits included) and both signs (zeros take the
   middle boundary's lower code, ``m - 1``).
4. ``sigma = ||y|| / ||g[idx]||`` rounded to the scale dtype; codes packed little-endian.

Rows whose slot is -1 (padding) are computed and not written; a zero vector gets codes
``m - 1`` and scale 0, like the reference. The plain PyTorch twin is ``fa4_tq.compress``.
"""

from __future__ import annotations

import functools
import math
import struct

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir.dialects import arith, llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..codec.codebook import centroid_values
from .hadamard import butterflies

THREADS = 128
PER_LANE = 32  # values per thread (see the module docstring)


def lanes_per_row(head_dim: int, per_lane: int | None = None) -> tuple[int, int]:
    """(lanes L, values per lane E) for a row of ``head_dim`` values."""
    e = min(head_dim, PER_LANE) if per_lane is None else per_lane
    # 128 values per thread spill (254 registers) and measured wrong scales on the H100: not offered
    if e not in (32, 64) or head_dim % e:
        raise ValueError(f"per_lane must be 32 or 64 (and divide head_dim {head_dim}), got {e}")
    return head_dim // e, e


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def signed_boundaries(bits: int) -> list[float]:
    """The 2**b - 1 decision boundaries (float32 midpoints of bf16 centroids, ``codebook.boundaries``)
    computed from Python floats because the kernel calls this while tracing, under torch's
    FakeTensorMode in CPU compiles (no torch ops there)."""
    c = centroid_values(bits)
    return [_f32(0.5 * (c[j] + c[j + 1])) for j in range(len(c) - 1)]


def bucket_scale(bits: int) -> int:
    """The smallest power of two ``S`` whose buckets ``[q/S, (q+1)/S)`` hold at most one boundary
    each (``u * S`` is then exact, so bucket membership is exact too)."""
    b, s = signed_boundaries(bits), 1
    while len({math.floor(x * s) for x in b}) < len(b):
        s *= 2
    return s


def bucket_range(bits: int, head_dim: int) -> tuple[int, int]:
    """(offset C, bucket count n): row ``q + C`` of the table is bucket ``q``. Up to 4 bits the
    rows cover every ``|u| <= sqrt(d)`` (a unit-norm-times-sqrt(d) vector has no larger
    coordinate), so the kernel needs no clamp; 8-bit tables run from the lowest boundary's bucket
    to one boundary-free bucket above the highest, and the kernel clamps every value beyond them
    into the end buckets (whose codes are then 0 and 255, as they must be)."""
    b, s = signed_boundaries(bits), bucket_scale(bits)
    lo, hi = math.floor(b[0] * s), math.floor(b[-1] * s) + 1
    if bits != 8:
        r = math.floor(_f32(math.sqrt(head_dim)) * s) + 2
        lo, hi = min(lo, -r), max(hi, r)
    return -lo, hi - lo + 1


@functools.lru_cache(maxsize=None)
def search_rows(bits: int, head_dim: int) -> tuple[tuple[int, int, int, int], ...]:
    """The bucket table as uint32 rows ``(below, candidate, c2[below], c2[below + 1])``: how many
    boundaries lie below the bucket (the code of a value at or under its candidate), the
    float32 bits of the one boundary inside it (+inf if none), and the squared centroids
    (float32 bits) of the two possible codes."""
    b, s = signed_boundaries(bits), bucket_scale(bits)
    offset, n = bucket_range(bits, head_dim)
    c2 = [_f32_bits(_f32(v * v)) for v in centroid_values(bits)]
    rows = []
    for q in range(-offset, n - offset):
        below = sum(1 for x in b if math.floor(x * s) < q)
        inside = [x for x in b if math.floor(x * s) == q]
        cand = _f32_bits(inside[0]) if inside else 0x7F800000
        rows.append((below, cand, c2[below], c2[min(below + 1, len(c2) - 1)]))
    return tuple(rows)


def search_table(bits: int, head_dim: int):
    """``search_rows`` as an int32 tensor [n, 4] (the bits of the uint32 rows), for the kernel."""
    import torch

    rows = [[v - (1 << 32) if v >= 1 << 31 else v for v in r] for r in search_rows(bits, head_dim)]
    return torch.tensor(rows, dtype=torch.int32)


def code_of(u: float, bits: int, head_dim: int) -> tuple[int, int]:
    """Python model of the kernel's search for one float32 ``u``: (code, c2 bits). The CPU tests
    check it against ``torch.bucketize`` on the codebook at every boundary and bucket edge."""
    offset, n = bucket_range(bits, head_dim)
    q = math.floor(_f32(u) * bucket_scale(bits)) + offset
    assert bits == 8 or 0 <= q < n, "bucket past the table: |u| > sqrt(d)"
    below, cand, lo, hi = search_rows(bits, head_dim)[min(max(q, 0), n - 1)]
    above = struct.unpack("<f", struct.pack("<I", cand))[0] < u
    return below + above, (hi if above else lo)


class CacheWrite:
    """Compile-time configuration of one cache-write kernel: head_dim, K/V bits (``v_bits=None``
    writes one side only, for ``compress_into``) and how many CTAs to launch at most (they loop
    over the row blocks, so the constants are staged once per CTA)."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int | None, max_ctas: int, per_lane: int | None = None):
        self.head_dim = head_dim
        self.bits = (k_bits, v_bits)
        self.sides = 1 if v_bits is None else 2
        self.max_ctas = max_ctas
        self.lanes, self.per_lane = lanes_per_row(head_dim, per_lane)
        self.rows_per_cta = THREADS // self.lanes
        self.table_rows = max(bucket_range(b, head_dim)[1] for b in self.bits if b is not None)

    @cute.jit
    def __call__(
        self,
        mK: cute.Tensor,  # (T, H, d) bf16/fp16, last dim contiguous, rows 16-byte aligned
        mV: cute.Tensor,  # (one-side kernels get mK again here and in every V argument)
        mSlots: cute.Tensor,  # (T,) int32/int64 < 2**31; -1 = skip
        mKData: cute.Tensor,  # (P, S, H, d*kb/8) uint8, 16-byte aligned
        mVData: cute.Tensor,
        mKScale: cute.Tensor,  # (P, H, S) fp16/fp32
        mVScale: cute.Tensor,
        mKSigns: cute.Tensor,  # (d,) float32 +-1
        mVSigns: cute.Tensor,
        mKTable: cute.Tensor,  # (n, 4) int32, search_table(k_bits, d)
        mVTable: cute.Tensor,
        stream: cuda.CUstream = None,
    ):
        blocks = (mK.shape[0] * mK.shape[1] + self.rows_per_cta - 1) // self.rows_per_cta
        grid_x = cutlass.min(blocks, self.max_ctas // self.sides)
        self.kernel(mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKSigns, mVSigns, mKTable, mVTable).launch(
            grid=[cutlass.max(grid_x, 1), self.sides, 1], block=[THREADS, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKSigns, mVSigns, mKTable, mVTable):
        smem = cutlass.utils.SmemAllocator()
        sTable = smem.allocate_tensor(Uint32, cute.make_layout((self.table_rows, 4), stride=(4, 1)), byte_alignment=16)
        sSignMask = smem.allocate_tensor(Uint32, cute.make_layout((self.head_dim // 2,)), byte_alignment=16)
        if cute.arch.block_idx()[1] == 0:
            self._side(mK, mSlots, mKData, mKScale, mKSigns, mKTable, sTable, sSignMask, self.bits[0])
        elif const_expr(self.sides == 2):
            self._side(mV, mSlots, mVData, mVScale, mVSigns, mVTable, sTable, sSignMask, self.bits[1])

    @cute.jit
    def _side(self, mX, mSlots, mData, mScale, mSigns, mTable, sTable, sSignMask, bits: cutlass.Constexpr[int]):
        """Stage this side's constants in shared memory, then loop over blocks of rows."""
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        grid_x, _, _ = cute.arch.grid_dim()
        n = bucket_range(bits, self.head_dim)[1]
        for i in cutlass.range(tidx, n * 4, THREADS, unroll=1):
            sTable[i // 4, i % 4] = Uint32(mTable[i // 4, i % 4])
        # sign bits of the bf16/fp16 pairs (bit 15 and bit 31): x * s is one xor on the input
        for i in cutlass.range(tidx, self.head_dim // 2, THREADS, unroll=1):
            lo = Uint32(0x8000) if mSigns[2 * i] < Float32(0.0) else Uint32(0)
            hi = Uint32(0x80000000) if mSigns[2 * i + 1] < Float32(0.0) else Uint32(0)
            sSignMask[i] = lo | hi
        cute.arch.sync_threads()
        rows = mX.shape[0] * mX.shape[1]
        blocks = (rows + self.rows_per_cta - 1) // self.rows_per_cta
        lane = tidx % self.lanes
        # Software pipelining: the next block's row is loaded while this one is computed, so
        # every thread keeps a load in flight through its arithmetic.
        nxt = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
        slot_nxt = self._load(mX, mSlots, bidx * self.rows_per_cta + tidx // self.lanes, rows, lane, nxt)
        cur = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
        for blk in cutlass.range(bidx, blocks, grid_x, unroll=1):
            for i in cutlass.range_constexpr(self.per_lane // 2):
                cur[i] = nxt[i]
            slot = slot_nxt
            slot_nxt = self._load(mX, mSlots, (blk + grid_x) * self.rows_per_cta + tidx // self.lanes, rows, lane, nxt)
            row = blk * self.rows_per_cta + tidx // self.lanes
            self._row(mX, mData, mScale, sTable, sSignMask, bits, row, slot, lane, cur)

    @cute.jit
    def _load(self, mX, mSlots, row, rows, lane, xw) -> Int32:
        """This lane's ``E`` values of ``row`` into ``xw`` (16-byte loads) and the row's slot;
        zeros and slot -1 past the last row."""
        E, H = self.per_lane, mX.shape[1]
        slot = Int32(-1)
        xw.fill(0)
        if row < rows:
            tok = row // H
            slot = Int32(mSlots[tok])
            src = cute.domain_offset((tok, row % H, lane * E), mX)
            ptr = cute.make_ptr(Uint32, src.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
            cute.autovec_copy(cute.make_tensor(ptr, cute.make_layout((E // 2,))), xw)
        return slot

    @cute.jit
    def _row(self, mX, mData, mScale, sTable, sSignMask, bits: cutlass.Constexpr[int], row, slot, lane, xw):
        d, L, E = self.head_dim, self.lanes, self.per_lane
        head = row % mX.shape[1]

        # 1. the signs on the input bits, the butterflies
        mask = cute.make_rmem_tensor((E // 2,), Uint32)
        cute.autovec_copy(cute.local_tile(sSignMask, (E // 2,), (lane,)), mask)
        for i in cutlass.range_constexpr(E // 2):
            xw[i] = xw[i] ^ mask[i]
        xs = cute.recast_tensor(xw, mX.element_type)
        f = cute.make_rmem_tensor((E,), Float32)
        for j in cutlass.range_constexpr(E):
            f[j] = Float32(xs[j])
        butterflies(f, E, lane, L)
        sq = Float32(0.0)
        for j in cutlass.range_constexpr(E):
            sq += f[j] * f[j]
        if const_expr(L > 1):
            sq = cute.arch.warp_reduction(sq, lambda x, y: x + y, threads_in_group=L)
        h_norm = cute.math.sqrt(sq)
        to_unit = Float32(math.sqrt(d)) / (h_norm if h_norm > Float32(0.0) else Float32(1.0))

        # 2. codes (bucket search), the norm of the quantised row, packing
        offset, n = bucket_range(bits, d)
        scale = Float32(bucket_scale(bits))
        words = cute.make_rmem_tensor((E * bits // 32,), Uint32)
        words.fill(0)
        gsq = Float32(0.0)
        for j in cutlass.range_constexpr(E):
            u = f[j] * to_unit
            q = _floor_index(u, scale, offset)
            if const_expr(bits == 8):  # values past the outermost boundaries share the end buckets
                q = cutlass.max(cutlass.min(q, Int32(n - 1)), Int32(0))
            entry = cute.make_rmem_tensor((4,), Uint32)
            cute.autovec_copy(sTable[q, None], entry)
            above = _as_f32(entry[1]) < u
            gsq += _as_f32(entry[3] if above else entry[2])
            code = entry[0] + (Uint32(1) if above else Uint32(0))
            w, sh = (bits * j) // 32, (bits * j) % 32
            words[w] = words[w] | (code << sh)
            if const_expr(sh + bits > 32):  # a 3-bit code straddling two words
                words[w + 1] = words[w + 1] | (code >> (32 - sh))
        if const_expr(L > 1):
            gsq = cute.arch.warp_reduction(gsq, lambda x, y: x + y, threads_in_group=L)
        sigma = h_norm * Float32(1.0 / math.sqrt(d)) / cute.math.sqrt(gsq)

        # 3. store where the slot says
        if slot >= 0:
            page_size = mData.shape[1]
            page, pos_in_page = slot // page_size, slot % page_size
            nbytes = E * bits // 8
            dst = cute.domain_offset((page, pos_in_page, head, lane * nbytes), mData)
            align = math.gcd(16, nbytes, d * bits // 8)
            p = cute.make_ptr(Uint32, dst.iterator.toint(), cute.AddressSpace.gmem, assumed_align=align)
            cute.autovec_copy(words, cute.make_tensor(p, cute.make_layout((E * bits // 32,))))
            if lane == 0:
                mScale[page, head, pos_in_page] = mScale.element_type(sigma)


@dsl_user_op
def _floor_index(u: Float32, scale: Float32, offset: int, *, loc=None, ip=None) -> Int32:
    """``floor(u * scale) + offset`` without a conversion instruction (quarter rate):
    ``u * scale + offset + 2**23`` rounded toward zero has it in its low mantissa bits while
    ``0 <= u * scale + offset < 2**23``; below 0 (8-bit tables only) the bits stay monotonic and
    the kernel's clamp to bucket 0 is still exact. The subtraction is left to the compiler, which
    folds it into the table address."""
    bits = llvm.inline_asm(
        T.i32(), [Float32(u).ir_value(loc=loc, ip=ip), Float32(scale).ir_value(loc=loc, ip=ip)],
        f"{{ .reg .f32 t;\n fma.rz.f32 t, $1, $2, 0f{_f32_bits(2.0**23 + offset):08X};\n mov.b32 $0, t; }}",
        "=r,f,f", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )
    return Int32(bits) - Int32(0x4B000000)


@dsl_user_op
def _as_f32(x: Uint32, *, loc=None, ip=None) -> Float32:
    return Float32(arith.bitcast(T.f32(), Uint32(x).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))
