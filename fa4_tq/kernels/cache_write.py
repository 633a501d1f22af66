"""Online cache write (CuTeDSL): rotate, normalise, quantise, pack and scatter new K and V rows
into a packed cache in one launch, any architecture (plain CUDA cores; compiled for SM90/SM100).

One row = one (token, head) vector of ``d`` values, owned by ``L = d / E`` consecutive lanes of
``E = 32`` values each (4 lanes at head_dim 128: measured faster on the H100 than 2 or 1, which
hold more registers and keep fewer rows in flight; ``perf/bench_compress.py --sweep``). CTAs
loop over blocks of rows, loading the next row while they compute one; blockIdx.y picks K or V.
The launch is a programmatic dependent one (PDL, ``CacheWrite``): a write of up to a few
thousand tokens is mostly launch and prologue, which then overlap the end of the kernel before.
Per row, as ``fa4_tq.compress`` (the reference) computes it:

1. ``f = x * s`` (the sign flipped on the input bits, exact), then ``h = H f``: at head_dim 128
   (4 lanes a row) on the tensor cores, eight ``mma.sync`` a warp and three butterfly stages in
   each lane (``hadamard.rotate_mma``: 1.09-1.12x faster from 4K tokens on the H100, the
   same bytes written in that run; ``h`` agrees with the reference's to float32 rounding);
   at other shapes the Walsh-Hadamard butterflies in the reference's stage order (strides 1, 2,
   4, ...: within a lane, then across lanes by ``shfl.bfly``), bit-identical to the reference.
2. ``u = h * sqrt(d) / ||h||`` (the reference's ``y = h / sqrt(d)``, ``u = y * sqrt(d) / ||y||``
   in one product per value; the norm a running sum, or at head_dim 128 ``d ||x||^2`` from the
   Gram diagonal of the same MMA fragments, ``hadamard.row_norm_sq_mma``): ``u`` can differ from the
   reference's in its last bit or two, so a value within that of a decision boundary can take
   the neighbouring code. The tests count those ties.
3. The code: the number of boundaries strictly below ``u`` (``torch.bucketize``: a value on a
   boundary takes the lower code). It comes from one 4-byte shared-memory bucket: ``u * S + C``
   (``S`` a power of two so that a bucket holds at most one boundary, ``C`` the buckets below
   zero, ``search_table``) names the bucket, whose word is its one candidate boundary (float32;
   every boundary has at least 13 zero low bits) with the count of boundaries below it in the
   low 8 bits; one float compare finishes the search, for every width (8 bits included) and both
   signs (zeros take the middle boundary's lower code, ``m - 1``). The squared centroid for the
   scale is a second lookup, in a table of ``2**b`` words after the buckets. Two 4-byte lookups
   and not one 16-byte row: with 16-byte rows the kernel was bound by shared-memory wavefronts,
   a warp's lookups of random buckets taking 7.3 each (``perf/results/compress-*.md``).
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
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..codec.codebook import centroid_values
from .hadamard import butterflies, h16_fragments, rotate_mma, row_norm_sq_mma

THREADS = 128
PER_LANE = 32  # values per thread (see the module docstring)
# CTAs (of THREADS) per SM: 6 measured up to 1.07x faster than 4 on the H100 at 16K-64K tokens
# (8-bit level) and faster than 8 (perf/results/compress-*.md); 6 resident need <= 80 registers
CTAS_PER_SM = 6
# independent partial sums per norm, where one running sum is a 32-deep chain of dependent adds
# (measured level with one sum on the shared-memory-bound kernel of 2026-11-24)
ACCUMULATORS = 4
# -4 * 0x4B000000 mod 2**32: added once to the table's address (``_search``)
TABLE_BIAS = (-4 * 0x4B000000) % (1 << 32)
CODE_MASK = 0xFF  # the low bits of a bucket word that hold its code


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
    """(offset C, bucket count n): word ``q + C`` of the search table is bucket ``q``. Up to 4 bits the
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
def search_words(bits: int, head_dim: int) -> tuple[int, ...]:
    """The search table as uint32 words: the ``n`` buckets, each the float32 bits of the one
    boundary inside it (+inf if none) or'ed with how many boundaries lie below it (the code of
    a value at or under the boundary); then ``c2``, the ``2**bits`` squared centroids (float32
    bits); zeros up to a multiple of 4 words (the kernel stages 16-byte pieces)."""
    b, s = signed_boundaries(bits), bucket_scale(bits)
    if any(_f32_bits(x) & CODE_MASK for x in b):
        raise AssertionError(f"a {bits}-bit boundary uses the low bits that carry the code")
    offset, n = bucket_range(bits, head_dim)
    words = []
    for q in range(-offset, n - offset):
        below = sum(1 for x in b if math.floor(x * s) < q)
        inside = [x for x in b if math.floor(x * s) == q]
        words.append((_f32_bits(inside[0]) if inside else 0x7F800000) | below)
    words += [_f32_bits(_f32(v * v)) for v in centroid_values(bits)]
    return tuple(words + [0] * (-len(words) % 4))


def sign_mask_words(signs) -> list[int]:
    """R's signs as the kernel applies them: word ``i`` has bit 15 set where ``signs[2i]`` is
    negative and bit 31 where ``signs[2i + 1]`` is, the sign bits of a bf16/fp16 pair (``x * s``
    is then one xor on the input's bits, exact)."""
    return [(0x8000 if signs[2 * i] < 0 else 0) | (0x80000000 if signs[2 * i + 1] < 0 else 0)
            for i in range(len(signs) // 2)]


def write_constants(bits: int, head_dim: int, signs):
    """One side's constants as one int32 tensor, staged by each CTA in one pass: the search table
    (``search_words``, a multiple of 4 words) then the ``head_dim / 2`` sign-mask words
    (``sign_mask_words``; ``signs`` the float +-1 vector of R, any sequence)."""
    import torch

    words = list(search_words(bits, head_dim)) + sign_mask_words([float(x) for x in signs])
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in words], dtype=torch.int32)


def constant_words(bits: int, head_dim: int) -> int:
    """Length of ``write_constants(bits, head_dim, ...)``."""
    return len(search_words(bits, head_dim)) + head_dim // 2


def code_of(u: float, bits: int, head_dim: int) -> tuple[int, int]:
    """Python model of the kernel's search for one float32 ``u``: (code, c2 bits). The CPU tests
    check it against ``torch.bucketize`` on the codebook at every boundary and bucket edge."""
    offset, n = bucket_range(bits, head_dim)
    q = math.floor(_f32(u) * bucket_scale(bits)) + offset
    assert bits == 8 or 0 <= q < n, "bucket past the table: |u| > sqrt(d)"
    words = search_words(bits, head_dim)
    word = words[min(max(q, 0), n - 1)]
    cand = word & ~CODE_MASK
    code = word - cand + (struct.unpack("<f", struct.pack("<I", cand))[0] < u)
    return code, words[n + code]


class CacheWrite:
    """Compile-time configuration of one cache-write kernel: head_dim, K/V bits (``v_bits=None``
    writes one side only, for ``compress_into``) and the grid: ``ctas_per_sm`` CTAs on each of
    ``sms`` SMs at most (they loop over the row blocks, so the constants are staged once per CTA),
    all resident at once (ptxas is told to fit that many, capping the registers).

    ``pdl``: launched as a programmatic dependent (SM90+): the CTAs may start as the kernel before
    them in the stream retires its CTAs, request their constants, and wait for its completion
    (``griddepcontrol.wait``) before they read ``k``, ``v`` and the slots or write anything.
    The kernel does not trigger its own dependents early (they launch as its CTAs exit): a
    trigger at the start measured slower at 1K tokens (the next launch's CTAs took the free
    slots of a partial grid), see ``perf/results/compress-*.md``."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int | None, sms: int, ctas_per_sm: int = CTAS_PER_SM,
                 per_lane: int | None = None, pdl: bool = True):
        self.head_dim = head_dim
        self.bits = (k_bits, v_bits)
        self.sides = 1 if v_bits is None else 2
        self.ctas_per_sm = ctas_per_sm
        self.max_ctas = sms * ctas_per_sm
        self.lanes, self.per_lane = lanes_per_row(head_dim, per_lane)
        self.rows_per_cta = THREADS // self.lanes
        # head_dim 128 at 4 lanes a row is the layout of ``hadamard.rotate_mma``: the rotation
        # on the tensor cores (other shapes: the butterflies)
        self.mma_rotation = head_dim == 128 and self.per_lane == 32
        self.const_words = max(constant_words(b, head_dim) for b in self.bits if b is not None)
        self.pdl = pdl

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
        mKConst: cute.Tensor,  # (words,) int32, write_constants(k_bits, d, signs of K's R)
        mVConst: cute.Tensor,
        stream: cuda.CUstream = None,
    ):
        blocks = (mK.shape[0] * mK.shape[1] + self.rows_per_cta - 1) // self.rows_per_cta
        grid_x = cutlass.min(blocks, self.max_ctas // self.sides)
        # multiply-high divisions: a general 32-bit division by a runtime value is ~25 instructions
        heads = cute.FastDivmodDivisorV2(mK.shape[1])
        pages = [cute.FastDivmodDivisorV2(m.shape[1]) for m in (mKData, mVData)]
        self.kernel(mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKConst, mVConst, heads, *pages).launch(
            grid=[cutlass.max(grid_x, 1), self.sides, 1], block=[THREADS, 1, 1], stream=stream,
            # the carveout (-1: the driver's default) given so that compiling needs no device query
            min_blocks_per_mp=self.ctas_per_sm, preferred_smem_carveout=-1, use_pdl=self.pdl,
        )

    @cute.kernel
    def kernel(self, mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKConst, mVConst,
               heads: cute.FastDivmodDivisorV2, k_pages: cute.FastDivmodDivisorV2, v_pages: cute.FastDivmodDivisorV2):
        smem = cutlass.utils.SmemAllocator()
        sConst = smem.allocate_tensor(Uint32, cute.make_layout((self.const_words,)), byte_alignment=16)
        if cute.arch.block_idx()[1] == 0:
            self._side(mK, mSlots, mKData, mKScale, mKConst, sConst, heads, k_pages, self.bits[0])
        elif const_expr(self.sides == 2):
            self._side(mV, mSlots, mVData, mVScale, mVConst, sConst, heads, v_pages, self.bits[1])

    @cute.jit
    def _side(self, mX, mSlots, mData, mScale, mConst, sConst, heads, pages, bits: cutlass.Constexpr[int]):
        """Stage this side's constants in shared memory, then loop over blocks of rows."""
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        grid_x, _, _ = cute.arch.grid_dim()
        # every 16-byte piece's load in flight at once (a loop of 4-byte loads cost a dependent
        # round trip per 128 words: ~2 us of an 8-bit launch before any row was computed); they
        # read no output of an earlier kernel, so they go before the PDL wait, and the first
        # row's loads are issued before the pieces are stored
        pieces = constant_words(bits, self.head_dim) // 4
        rounds = (pieces + THREADS - 1) // THREADS
        staged = cute.make_rmem_tensor((rounds * 4,), Int32)
        for r in cutlass.range_constexpr(rounds):
            if tidx + r * THREADS < pieces:
                src = cute.domain_offset((4 * (tidx + r * THREADS),), mConst).iterator.toint()
                src = cute.make_ptr(Int32, src, cute.AddressSpace.gmem, assumed_align=16)
                cute.autovec_copy(cute.make_tensor(src, cute.make_layout((4,))), cute.local_tile(staged, (4,), (r,)))
        rows = mX.shape[0] * mX.shape[1]
        blocks = (rows + self.rows_per_cta - 1) // self.rows_per_cta
        lane = tidx % self.lanes
        if const_expr(self.pdl):  # k, v and the slots may be the previous kernel's outputs
            cute.arch.griddepcontrol_wait()
        nxt = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
        slot_nxt = self._load(mX, mSlots, bidx * self.rows_per_cta + tidx // self.lanes, rows, lane, nxt, heads)
        for r in cutlass.range_constexpr(rounds):
            if tidx + r * THREADS < pieces:
                for c in cutlass.range_constexpr(4):
                    sConst[4 * (tidx + r * THREADS) + c] = Uint32(staged[4 * r + c])
        cute.arch.sync_threads()
        # the buckets' address + TABLE_BIAS (see _search), written as an or (shared addresses are
        # below 2**28, where the bias has no bits): as an add, ptxas split it back out of the
        # per-value address; then the squared centroids' address; then the sign masks'
        n = bucket_range(bits, self.head_dim)[1]
        base = sConst.iterator.toint()
        tables = (Uint32(base) | Uint32(TABLE_BIAS), Uint32(base) + Uint32(4 * n))
        masks = base + 4 * len(search_words(bits, self.head_dim))
        bf16 = const_expr(mX.element_type == cutlass.BFloat16)
        hb = h16_fragments(tidx % 32 // 4, lane, bf16) if const_expr(self.mma_rotation) else None
        # Software pipelining: the next block's row is loaded while this one is computed, so
        # every thread keeps a load in flight through its arithmetic.
        cur = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
        for blk in cutlass.range(bidx, blocks, grid_x, unroll=1):
            for i in cutlass.range_constexpr(self.per_lane // 2):
                cur[i] = nxt[i]
            slot = slot_nxt
            slot_nxt = self._load(mX, mSlots, (blk + grid_x) * self.rows_per_cta + tidx // self.lanes, rows, lane, nxt,
                                  heads)
            head = (blk * self.rows_per_cta + tidx // self.lanes) % heads
            self._row(mData, mScale, tables, masks, hb, pages, bits, mX.element_type, head, slot, lane, cur)

    @cute.jit
    def _load(self, mX, mSlots, row, rows, lane, xw, heads) -> Int32:
        """This lane's ``E`` values of ``row`` into ``xw`` (16-byte loads) and the row's slot;
        zeros and slot -1 past the last row."""
        E = self.per_lane
        slot = Int32(-1)
        xw.fill(0)
        if row < rows:
            tok, head = divmod(row, heads)
            slot = Int32(mSlots[tok])
            src = cute.domain_offset((tok, head, lane * E), mX)
            ptr = cute.make_ptr(Uint32, src.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
            cute.autovec_copy(cute.make_tensor(ptr, cute.make_layout((E // 2,))), xw)
        return slot

    @cute.jit
    def _row(self, mData, mScale, tables, masks, hb, pages, bits: cutlass.Constexpr[int], dtype: cutlass.Constexpr,
             head, slot, lane, xw):
        d, L, E = self.head_dim, self.lanes, self.per_lane
        bf16 = const_expr(dtype == cutlass.BFloat16)

        # 1. the signs on the input bits, the Hadamard transform. The masks are loaded per row
        # (``_masks``): hoisted out of the loop, their 16 registers spilled at 80 a thread.
        mask_at = masks + lane * (2 * E)
        for i in cutlass.range_constexpr(E // 8):
            mask = _masks(mask_at + 16 * i)
            for w in cutlass.range_constexpr(4):
                xw[4 * i + w] = xw[4 * i + w] ^ mask[w]
        f = cute.make_rmem_tensor((E,), Float32)
        if const_expr(self.mma_rotation):
            # ||h||^2 = d ||x||^2 (H H^T = d I): the input's norm, also on the tensor cores
            sq = row_norm_sq_mma(xw, bf16) * Float32(d)
            rotate_mma(xw, f, hb, bf16)
        else:
            xs = cute.recast_tensor(xw, dtype)
            for j in cutlass.range_constexpr(E):
                f[j] = Float32(xs[j])
            butterflies(f, E, lane, L)
            sqs = cute.make_rmem_tensor((ACCUMULATORS,), Float32)
            sqs.fill(0.0)
            for j in cutlass.range_constexpr(E):
                sqs[j % ACCUMULATORS] += f[j] * f[j]
            sq = _tree_sum(sqs)
            if const_expr(L > 1):
                sq = cute.arch.warp_reduction(sq, lambda x, y: x + y, threads_in_group=L)
        h_norm = cute.math.sqrt(sq)
        to_unit = Float32(math.sqrt(d)) / (h_norm if h_norm > Float32(0.0) else Float32(1.0))

        # 2. codes (bucket search), the norm of the quantised row, packing
        offset, n = bucket_range(bits, d)
        words = cute.make_rmem_tensor((E * bits // 32,), Uint32)
        words.fill(0)
        gsq = cute.make_rmem_tensor((ACCUMULATORS,), Float32)
        gsq.fill(0.0)
        for j in cutlass.range_constexpr(E):
            w, sh = (bits * j) // 32, (bits * j) % 32
            a = j % ACCUMULATORS
            words[w], gsq[a], code = _search(f[j] * to_unit, *tables, words[w], gsq[a], bits, offset, n, sh)
            if const_expr(sh + bits > 32):  # a 3-bit code straddling two words
                words[w + 1] = words[w + 1] | (code >> (32 - sh))
        gsq = _tree_sum(gsq)
        if const_expr(L > 1):
            gsq = cute.arch.warp_reduction(gsq, lambda x, y: x + y, threads_in_group=L)
        sigma = h_norm * Float32(1.0 / math.sqrt(d)) / cute.math.sqrt(gsq)

        # 3. store where the slot says
        if slot >= 0:
            page, pos_in_page = divmod(slot, pages)
            nbytes = E * bits // 8
            dst = cute.domain_offset((page, pos_in_page, head, lane * nbytes), mData)
            align = math.gcd(16, nbytes, d * bits // 8)
            p = cute.make_ptr(Uint32, dst.iterator.toint(), cute.AddressSpace.gmem, assumed_align=align)
            cute.autovec_copy(words, cute.make_tensor(p, cute.make_layout((E * bits // 32,))))
            if lane == 0:
                mScale[page, head, pos_in_page] = mScale.element_type(sigma)


@cute.jit
def _tree_sum(parts: cute.Tensor) -> Float32:
    """``parts[0] + parts[1] + ...`` pairwise (``parts`` a power-of-two-long rmem tensor)."""
    n = cute.size(parts)
    while const_expr(n > 1):
        n //= 2
        for i in cutlass.range_constexpr(n):
            parts[i] = parts[i] + parts[i + n]
    return parts[0]


@dsl_user_op
def _masks(addr, *, loc=None, ip=None) -> tuple:
    """Four sign-mask words from shared address ``addr`` (16-byte aligned), one ``ld.shared.v4``
    declared with side effects so that the compiler keeps it in the loop (the masks are the same
    every row, and hoisted they take 16 registers)."""
    res = llvm.inline_asm(
        ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>"), [Uint32(addr).ir_value(loc=loc, ip=ip)],
        "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r", has_side_effects=True, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
    )
    return tuple(Uint32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def _search(u: Float32, table: Uint32, c2: Uint32, word: Uint32, gsq: Float32, bits: int, offset: int, n: int,
            shift: int, *, loc=None, ip=None) -> tuple:
    """One value's code and squared centroid from the search table (``search_words``):
    ``(word + (code << shift), gsq + c2[code], code)``; ``table`` is the table's
    shared address plus ``TABLE_BIAS``, ``c2`` the address of its squared centroids.

    The bucket ``floor(u * S) + C`` needs no conversion instruction (quarter rate):
    ``u * S + C + 2**23`` rounded toward zero holds it in its low mantissa bits while
    ``0 <= u * S + C < 2**23``, so its bits are ``0x4B000000 + bucket`` and the bucket's address
    is ``4 * bits + table``, one multiply-add. Below 0 (8-bit tables only) the bits stay
    monotonic and the clamp to bucket 0 is still exact. The block is declared free of side
    effects although it reads shared memory: the table is written only before the CTA's
    barrier, and ``u`` depends on loads issued after it. One PTX block because the compiler,
    given the same steps in the DSL, kept the subtraction of ``0x4B000000`` and selected the
    code in two instructions."""
    scale, add = _f32_bits(float(bucket_scale(bits))), _f32_bits(2.0**23 + offset)
    clamp = ""
    if bits == 8:  # values past the outermost boundaries share the end buckets
        clamp = f" max.s32 a, a, {0x4B000000};\n min.s32 a, a, {0x4B000000 + n - 1};\n"
    res = llvm.inline_asm(
        ir.Type.parse("!llvm.struct<(i32, f32, i32)>"),
        [Float32(u).ir_value(loc=loc, ip=ip), Uint32(table).ir_value(loc=loc, ip=ip),
         Uint32(c2).ir_value(loc=loc, ip=ip), Uint32(word).ir_value(loc=loc, ip=ip),
         Float32(gsq).ir_value(loc=loc, ip=ip)],
        "{ .reg .pred p; .reg .f32 t; .reg .b32 a, e, cand, g2;\n"
        f" fma.rz.f32 t, $3, 0f{scale:08X}, 0f{add:08X};\n mov.b32 a, t;\n{clamp}"
        " mad.lo.u32 a, a, 4, $4;\n ld.shared.b32 e, [a];\n"
        f" and.b32 cand, e, {~CODE_MASK & 0xFFFFFFFF};\n setp.lt.f32 p, cand, $3;\n"
        " sub.u32 $2, e, cand;\n @p add.u32 $2, $2, 1;\n"
        " mad.lo.u32 a, $2, 4, $5;\n ld.shared.b32 g2, [a];\n add.f32 $1, $7, g2;\n"
        f" mad.lo.u32 $0, $2, {1 << shift}, $6;\n}}",
        "=r,=f,=r,f,r,r,r,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
    )
    word_out = Uint32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip))
    gsq_out = Float32(llvm.extractvalue(T.f32(), res, [1], loc=loc, ip=ip))
    code = Uint32(llvm.extractvalue(T.i32(), res, [2], loc=loc, ip=ip))
    return word_out, gsq_out, code
