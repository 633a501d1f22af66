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
3. The code: the codebook is symmetric, so the magnitude index ``k`` is the number of positive
   boundaries below ``|u|`` (``<=`` on the negative side, as ``torch.bucketize`` puts a value on
   a boundary in the lower code). ``k`` comes from one shared-memory bucket: ``|u| * S`` (``S`` a
   power of two so that a bucket holds at most one boundary, ``search_table``) names the bucket,
   which stores how many boundaries lie below it, its one candidate boundary and the squared
   centroids on both sides; one compare finishes the search, for every width (8 bits included).
   ``u > 0`` takes ``m + k``, else ``m - 1 - k = (m + k) xor (2m - 1)`` (``m = 2**(b-1)``).
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
from cutlass._mlir.dialects import arith, llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..codec.codebook import centroid_values
from .hadamard import butterflies

THREADS = 128
ROTATIONS = ("butterfly", "mma")
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


def positive_boundaries(bits: int) -> list[float]:
    """The 2**(b-1) - 1 positive decision boundaries (float32 midpoints of bf16 centroids): the
    upper half of ``codebook.boundaries(bits)``, computed from Python floats because the kernel
    calls this while tracing, under torch's FakeTensorMode in CPU compiles (no torch ops there)."""
    c = [v for v in centroid_values(bits) if v > 0]
    return [_f32(0.5 * (c[j] + c[j + 1])) for j in range(len(c) - 1)]


def bucket_scale(bits: int) -> int:
    """The smallest power of two ``S`` whose buckets ``[q/S, (q+1)/S)`` hold at most one positive
    boundary each (``|u| * S`` is then exact, so bucket membership is exact too)."""
    pb, s = positive_boundaries(bits), 1
    while len({math.floor(b * s) for b in pb}) < len(pb):
        s *= 2
    return s


def bucket_count(bits: int, head_dim: int) -> int:
    """Buckets in the table. Up to 4 bits, every possible ``|u| <= sqrt(d)`` has its own (a few
    dozen rows), so the kernel needs no clamp; 8-bit tables stop one past the last boundary's
    bucket, which every larger ``|u|`` shares (the kernel clamps)."""
    s = bucket_scale(bits)
    last = math.floor(positive_boundaries(bits)[-1] * s) + 1
    return last + 1 if bits == 8 else max(last, math.floor(_f32(math.sqrt(head_dim)) * s) + 2) + 1


@functools.lru_cache(maxsize=None)
def search_rows(bits: int, head_dim: int) -> tuple[tuple[int, int, int, int], ...]:
    """The bucket table as uint32 rows ``(m + below, candidate, c2[below], c2[below + 1])``:
    ``m = 2**(bits-1)`` plus how many boundaries lie below the bucket, the float32 bits of the
    one boundary inside it (+inf if none), and the squared centroids (float32 bits) for the two
    possible magnitude indices."""
    pb, s, m = positive_boundaries(bits), bucket_scale(bits), 1 << (bits - 1)
    c2 = [_f32_bits(_f32(v * v)) for v in centroid_values(bits) if v > 0]
    rows = []
    for q in range(bucket_count(bits, head_dim)):
        below = sum(1 for b in pb if math.floor(b * s) < q)
        inside = [b for b in pb if math.floor(b * s) == q]
        cand = _f32_bits(inside[0]) if inside else 0x7F800000
        rows.append((m + below, cand, c2[below], c2[min(below + 1, len(c2) - 1)]))
    return tuple(rows)


def search_table(bits: int, head_dim: int):
    """``search_rows`` as an int32 tensor [n, 4] (the bits of the uint32 rows), for the kernel."""
    import torch

    rows = [[v - (1 << 32) if v >= 1 << 31 else v for v in r] for r in search_rows(bits, head_dim)]
    return torch.tensor(rows, dtype=torch.int32)


def magnitude_index(u_bits: int, bits: int, head_dim: int) -> tuple[int, int]:
    """Python model of the kernel's search for one float32 ``u`` (its bits): (code, c2 bits).
    The CPU tests check it against ``torch.bucketize`` on the codebook at every bucket edge."""
    m = 1 << (bits - 1)
    pos = 0 < u_bits < 0x80000000
    a = (u_bits & 0x7FFFFFFF) + (u_bits >> 31)  # the next float up for u < 0: b <= |u|
    af = struct.unpack("<f", struct.pack("<I", a))[0]
    rows = search_rows(bits, head_dim)
    q = int(af * bucket_scale(bits))
    assert bits == 8 or q < len(rows), "bucket past the table: |u| > sqrt(d)"
    code_pos, cand, lo, hi = rows[min(q, len(rows) - 1)]
    above = cand < a
    code = code_pos + above
    return (code if pos else code ^ (2 * m - 1)), (hi if above else lo)


# ----------------------------------------------------------------------------- the rotation as an MMA
# At head_dim 64 and 128 the rotation can run on the tensor cores instead: ``h = x (diag(s) H)``
# for 16 rows of a warp at once, with ``mma.sync.m16n8k16`` (bf16 or fp16 inputs, float32
# accumulation). The +-1 matrix is exact in either dtype and so is every product; only the float32
# sums round, in the tensor core's order rather than the butterflies', so a value near a decision
# boundary can take the neighbouring code (the tests count these ties, as for the norm).
#
# The inputs' and outputs' coordinate order is ours to choose: the matrix's rows and columns are
# permuted so that each lane loads and stores *contiguous* coordinates. Lane ``(g, q) = (lane //
# 4, lane % 4)`` holds rows ``g`` and ``g + 8`` of the warp's 16 and coordinates ``[q*C, q*C + C)``
# of each (``C = d / 4``): its 32-bit words ``2t, 2t + 1`` of a row are the A fragment's k-columns
# ``2q, 2q + 1`` and ``2q + 8, 2q + 9`` of k-tile ``t`` (``input_coordinate``), and n-tile ``j``'s
# accumulator columns ``2q, 2q + 1`` are its coordinates ``2j, 2j + 1`` (``output_coordinate``).


def mma_rotation_supported(head_dim: int, bits) -> bool:
    """Whether the MMA rotation serves this head_dim and these widths: a lane's ``d / 4`` codes
    must fill whole 32-bit words (so 3 bits at head_dim 64 keeps the butterflies), and the
    matrix must fit shared memory beside other CTAs (``d * d`` 16-bit entries: 32 KB at 128)."""
    return head_dim in (64, 128) and all(b is None or (head_dim // 4 * b) % 32 == 0 for b in bits)


def input_coordinate(head_dim: int, t: int, k: int) -> int:
    """The input coordinate that the A fragment's column ``k`` (0-15) of k-tile ``t`` holds, for the
    lane group ``q = (k % 8) // 2`` that loads it."""
    return head_dim // 4 * ((k % 8) // 2) + 4 * t + 2 * (k // 8) + k % 2


def output_coordinate(head_dim: int, j: int, n: int) -> int:
    """The output coordinate of n-tile ``j``'s accumulator column ``n`` (0-7)."""
    return head_dim // 4 * (n // 2) + 2 * j + n % 2


def rotation_fragments(head_dim: int, seed: int, dtype):
    """The B fragments of ``diag(s) H`` (rows and columns permuted as above) in the order the
    kernel reads them: int32 ``[d/8, d/32, 32, 4]``, n-tile ``j``, k-tile pair ``tp``, lane, and
    the registers ``b0, b1`` of k-tile ``2tp`` then of ``2tp + 1`` (each two 16-bit values, the
    lower k in the low half), so that a lane reads a k-tile pair with one conflict-free 16-byte
    load."""
    import torch

    from ..codec.rotation import _fwht, sign_vector

    d = head_dim
    m = sign_vector(d, seed)[:, None] * _fwht(torch.eye(d))  # m[p, o]: h = x @ m
    kt, nt = d // 16, d // 8
    lane = torch.arange(32)
    g, q = lane // 4, lane % 4
    frag = torch.empty(nt, kt // 2, 32, 4, 2)
    for j in range(nt):
        cols = torch.tensor([output_coordinate(d, j, int(n)) for n in g])
        for t in range(kt):
            for reg in range(2):  # b0: k = 2q, 2q + 1; b1: k = 2q + 8, 2q + 9
                for half in range(2):
                    rows = torch.tensor([input_coordinate(d, t, int(2 * qq + 8 * reg + half)) for qq in q])
                    frag[j, t // 2, :, 2 * (t % 2) + reg, half] = m[rows, cols]
    bits = frag.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    words = bits[..., 0] | (bits[..., 1] << 16)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def _mma_16816(a, b, c):
    """Plain PyTorch model of ``mma.sync.m16n8k16.row.col`` on fragments, per the PTX ISA:
    ``a[32, 4, 2]``, ``b[32, 2, 2]``, ``c[32, 4]`` (lane, register, half) -> d ``[32, 4]``."""
    import torch

    A, B = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for r in range(4):  # a0: (g, 2q..), a1: (g + 8, 2q..), a2: (g, 2q + 8..), a3: (g + 8, 2q + 8..)
            A[g + 8 * (r % 2), 2 * q + 8 * (r // 2):][:2] = a[lane, r]
        for r in range(2):  # b0: (2q.., g), b1: (2q + 8.., g)
            B[2 * q + 8 * r:2 * q + 8 * r + 2, g] = b[lane, r]
    D = A @ B
    out = c.clone().double()
    for lane in range(32):
        g, q = lane // 4, lane % 4
        out[lane] += torch.stack([D[g, 2 * q], D[g, 2 * q + 1], D[g + 8, 2 * q], D[g + 8, 2 * q + 1]])
    return out


def mma_rotation_model(x, seed: int):
    """Plain PyTorch model of the kernel's MMA rotation of 16 rows ``x[16, d]`` (float64, from
    the fragments ``rotation_fragments`` makes): each lane's loads, the A/B fragments, the MMAs
    and the lane-to-coordinate mapping of the accumulators, back in coordinate order. Equals
    ``H (s * x)`` (unnormalised) when the layout bookkeeping is right; the CPU tests check that."""
    import torch

    d = x.shape[-1]
    c, kt, nt = d // 4, d // 16, d // 8
    frag = rotation_fragments(d, seed, torch.bfloat16)
    halves = torch.stack([frag & 0xFFFF, (frag >> 16) & 0xFFFF], dim=-1).to(torch.int16)
    bvals = halves.view(torch.bfloat16).double()  # [nt, kt/2, 32, 4, 2]
    xs = x.double()
    out = torch.zeros(16, d, dtype=torch.float64)
    for j in range(nt):
        acc = torch.zeros(32, 4, dtype=torch.float64)
        for t in range(kt):
            a = torch.empty(32, 4, 2, dtype=torch.float64)
            for lane in range(32):
                g, q = lane // 4, lane % 4
                words = [xs[g, q * c:(q + 1) * c].view(-1, 2), xs[g + 8, q * c:(q + 1) * c].view(-1, 2)]
                a[lane] = torch.stack([words[0][2 * t], words[1][2 * t], words[0][2 * t + 1], words[1][2 * t + 1]])
            b = bvals[j, t // 2, :, 2 * (t % 2):2 * (t % 2) + 2]
            acc = _mma_16816(a, b, acc)
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for r in range(4):
                out[g + 8 * (r // 2), q * c + 2 * j + r % 2] = acc[lane, r]
    return out


class CacheWrite:
    """Compile-time configuration of one cache-write kernel: head_dim, K/V bits (``v_bits=None``
    writes one side only, for ``compress_into``), how many CTAs to launch at most (they loop
    over the row blocks, so the constants are staged once per CTA) and the rotation:
    ``"butterfly"`` (float32 butterflies on the CUDA cores, bit-identical to the reference) or
    ``"mma"`` (one tensor-core product, ``mma_rotation_supported`` shapes only)."""

    _prefetch = True  # load the next block's rows while computing these (MMA rotation)

    def __init__(self, head_dim: int, k_bits: int, v_bits: int | None, max_ctas: int, per_lane: int | None = None,
                 rotation: str = "butterfly"):
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.head_dim = head_dim
        self.bits = (k_bits, v_bits)
        self.sides = 1 if v_bits is None else 2
        self.max_ctas = max_ctas
        self.rotation = rotation
        if rotation == "mma":
            if not mma_rotation_supported(head_dim, self.bits) or per_lane not in (None, head_dim // 4):
                raise ValueError(f"the MMA rotation serves head_dim 64/128 with {head_dim // 4} values per lane "
                                 f"and whole words of codes, not head_dim {head_dim}, bits {self.bits}, "
                                 f"per_lane {per_lane}: use rotation='butterfly'")
            self.lanes, self.per_lane = 4, head_dim // 4
            self.rows_per_cta = THREADS // 32 * 16  # 16 rows a warp
        else:
            self.lanes, self.per_lane = lanes_per_row(head_dim, per_lane)
            self.rows_per_cta = THREADS // self.lanes
        self.table_rows = max(bucket_count(b, head_dim) for b in self.bits if b is not None)

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
        mKRot: cute.Tensor,  # butterfly: (d,) float32 +-1 signs; mma: (d*d/8, 4) int32 rotation_fragments
        mVRot: cute.Tensor,
        mKTable: cute.Tensor,  # (n, 4) int32, search_table(k_bits, d)
        mVTable: cute.Tensor,
        stream: cuda.CUstream = None,
    ):
        blocks = (mK.shape[0] * mK.shape[1] + self.rows_per_cta - 1) // self.rows_per_cta
        grid_x = cutlass.min(blocks, self.max_ctas // self.sides)
        self.kernel(mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKRot, mVRot, mKTable, mVTable).launch(
            grid=[cutlass.max(grid_x, 1), self.sides, 1], block=[THREADS, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mK, mV, mSlots, mKData, mVData, mKScale, mVScale, mKRot, mVRot, mKTable, mVTable):
        smem = cutlass.utils.SmemAllocator()
        sTable = smem.allocate_tensor(Uint32, cute.make_layout((self.table_rows, 4), stride=(4, 1)), byte_alignment=16)
        if const_expr(self.rotation == "mma"):
            sRot = smem.allocate_tensor(Uint32, cute.make_layout((self.head_dim * self.head_dim // 8, 4), stride=(4, 1)),
                                        byte_alignment=16)
        else:
            sRot = smem.allocate_tensor(Uint32, cute.make_layout((self.head_dim // 2,)), byte_alignment=16)
        if cute.arch.block_idx()[1] == 0:
            self._side(mK, mSlots, mKData, mKScale, mKRot, mKTable, sTable, sRot, self.bits[0])
        elif const_expr(self.sides == 2):
            self._side(mV, mSlots, mVData, mVScale, mVRot, mVTable, sTable, sRot, self.bits[1])

    @cute.jit
    def _side(self, mX, mSlots, mData, mScale, mRot, mTable, sTable, sRot, bits: cutlass.Constexpr[int]):
        """Stage this side's constants in shared memory, then loop over blocks of rows."""
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        grid_x, _, _ = cute.arch.grid_dim()
        n = bucket_count(bits, self.head_dim)
        for i in cutlass.range(tidx, n * 4, THREADS, unroll=1):
            sTable[i // 4, i % 4] = Uint32(mTable[i // 4, i % 4])
        if const_expr(self.rotation == "mma"):
            for i in cutlass.range(tidx, cute.size(sRot, mode=[0]), THREADS, unroll=1):
                src = cute.domain_offset((i, 0), mRot)
                ptr = cute.make_ptr(Uint32, src.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
                cute.autovec_copy(cute.make_tensor(ptr, cute.make_layout((4,))), sRot[i, None])
        else:
            # sign bits of the bf16/fp16 pairs (bit 15 and bit 31): x * s is one xor on the input
            for i in cutlass.range(tidx, self.head_dim // 2, THREADS, unroll=1):
                lo = Uint32(0x8000) if mRot[2 * i] < Float32(0.0) else Uint32(0)
                hi = Uint32(0x80000000) if mRot[2 * i + 1] < Float32(0.0) else Uint32(0)
                sRot[i] = lo | hi
        cute.arch.sync_threads()
        rows = mX.shape[0] * mX.shape[1]
        blocks = (rows + self.rows_per_cta - 1) // self.rows_per_cta
        if const_expr(self.rotation == "mma"):
            # lane (g, q) of warp w: rows w*16 + g and + 8 of the block, coordinates [q*E, q*E + E)
            lane = tidx % 32
            first = tidx // 32 * 16 + lane // 4
            q = lane % 4
            nxt0 = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
            nxt1 = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
            cur0 = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
            cur1 = cute.make_rmem_tensor((self.per_lane // 2,), Uint32)
            s0n = self._load(mX, mSlots, bidx * self.rows_per_cta + first, rows, q, nxt0)
            s1n = self._load(mX, mSlots, bidx * self.rows_per_cta + first + 8, rows, q, nxt1)
            for blk in cutlass.range(bidx, blocks, grid_x, unroll=1):
                if const_expr(self._prefetch):
                    for i in cutlass.range_constexpr(self.per_lane // 2):
                        cur0[i], cur1[i] = nxt0[i], nxt1[i]
                    s0, s1 = s0n, s1n
                    nb = (blk + grid_x) * self.rows_per_cta + first
                    s0n = self._load(mX, mSlots, nb, rows, q, nxt0)
                    s1n = self._load(mX, mSlots, nb + 8, rows, q, nxt1)
                else:
                    s0 = self._load(mX, mSlots, blk * self.rows_per_cta + first, rows, q, cur0)
                    s1 = self._load(mX, mSlots, blk * self.rows_per_cta + first + 8, rows, q, cur1)
                self._rows_mma(mX, mData, mScale, sTable, sRot, bits, blk * self.rows_per_cta + first, s0, s1,
                               lane, cur0, cur1)
        else:
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
                slot_nxt = self._load(mX, mSlots, (blk + grid_x) * self.rows_per_cta + tidx // self.lanes, rows,
                                      lane, nxt)
                row = blk * self.rows_per_cta + tidx // self.lanes
                self._row(mX, mData, mScale, sTable, sRot, bits, row, slot, lane, cur)

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
        """One row by butterflies: ``L`` lanes of ``E`` values each."""
        d, L, E = self.head_dim, self.lanes, self.per_lane

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
        words = cute.make_rmem_tensor((E * bits // 32,), Uint32)
        words.fill(0)
        gsq = Float32(0.0)
        for j in cutlass.range_constexpr(E):
            gsq += self._code_into(words, j, f[j] * to_unit, sTable, bits)
        if const_expr(L > 1):
            gsq = cute.arch.warp_reduction(gsq, lambda x, y: x + y, threads_in_group=L)
        sigma = h_norm * Float32(1.0 / math.sqrt(d)) / cute.math.sqrt(gsq)
        self._store(mData, mScale, bits, slot, row % mX.shape[1], lane, words, sigma)

    @cute.jit
    def _rows_mma(self, mX, mData, mScale, sTable, sRot, bits: cutlass.Constexpr[int], row, slot0, slot1, lane,
                  x0, x1):
        """Rows ``row`` and ``row + 8`` (``x0``, ``x1``: this lane's ``E`` values of each) with the
        warp's 14 other rows on the tensor cores (see ``input_coordinate``)."""
        E, kt, nt = self.per_lane, self.head_dim // 16, self.head_dim // 8
        fp16 = const_expr(mX.element_type == cutlass.Float16)
        g = lane // 4

        # 1. squared norms: the 16 rows' Gram matrix x x^T (B = the A fragments' own rows), whose
        # diagonal lane (g, g // 2) holds for rows g and g + 8; ||H s x||^2 = d ||x||^2
        glo = [Float32(0.0)] * 4
        ghi = [Float32(0.0)] * 4
        for t in cutlass.range_constexpr(kt):
            a = (x0[2 * t], x1[2 * t], x0[2 * t + 1], x1[2 * t + 1])
            glo = _mma_m16n8k16(a, (x0[2 * t], x0[2 * t + 1]), glo, fp16)
            ghi = _mma_m16n8k16(a, (x1[2 * t], x1[2 * t + 1]), ghi, fp16)
        odd = (g % 2) == 1
        sq0 = cute.arch.shuffle_sync(glo[1] if odd else glo[0], 4 * g + g // 2)
        sq1 = cute.arch.shuffle_sync(ghi[3] if odd else ghi[2], 4 * g + g // 2)
        norm0, norm1 = cute.math.sqrt(sq0), cute.math.sqrt(sq1)
        to_unit0 = Float32(1.0) / (norm0 if norm0 > Float32(0.0) else Float32(1.0))
        to_unit1 = Float32(1.0) / (norm1 if norm1 > Float32(0.0) else Float32(1.0))

        # 2. h = x (diag(s) H), four n-tiles at a time: their MMAs are independent, so one waits
        # less on another's latency than in a single chain, and 16 accumulators stay live, not 64.
        # n-tile j holds coordinates 2j, 2j + 1 of this lane's part of both rows: their codes.
        w0 = cute.make_rmem_tensor((E * bits // 32,), Uint32)
        w1 = cute.make_rmem_tensor((E * bits // 32,), Uint32)
        w0.fill(0)
        w1.fill(0)
        gsq0, gsq1 = Float32(0.0), Float32(0.0)
        group = 4
        for jg in cutlass.range_constexpr(nt // group):
            acc = [[Float32(0.0)] * 4 for _ in range(group)]
            for tp in cutlass.range_constexpr(kt // 2):
                for jj in cutlass.range_constexpr(group):
                    b = cute.make_rmem_tensor((4,), Uint32)
                    cute.autovec_copy(sRot[((jg * group + jj) * (kt // 2) + tp) * 32 + lane, None], b)
                    for h in cutlass.range_constexpr(2):
                        t = 2 * tp + h
                        a = (x0[2 * t], x1[2 * t], x0[2 * t + 1], x1[2 * t + 1])
                        acc[jj] = _mma_m16n8k16(a, (b[2 * h], b[2 * h + 1]), acc[jj], fp16)
            for jj in cutlass.range_constexpr(group):
                for c in cutlass.range_constexpr(2):
                    j = jg * group + jj
                    gsq0 += self._code_into(w0, 2 * j + c, acc[jj][c] * to_unit0, sTable, bits)
                    gsq1 += self._code_into(w1, 2 * j + c, acc[jj][2 + c] * to_unit1, sTable, bits)
        gsq0 = cute.arch.warp_reduction(gsq0, lambda x, y: x + y, threads_in_group=4)
        gsq1 = cute.arch.warp_reduction(gsq1, lambda x, y: x + y, threads_in_group=4)
        H = mX.shape[1]
        self._store(mData, mScale, bits, slot0, row % H, lane % 4, w0, norm0 / cute.math.sqrt(gsq0))
        self._store(mData, mScale, bits, slot1, (row + 8) % H, lane % 4, w1, norm1 / cute.math.sqrt(gsq1))

    @cute.jit
    def _code_into(self, words, j: cutlass.Constexpr[int], u: Float32, sTable, bits: cutlass.Constexpr[int]) -> Float32:
        """Code ``j`` of this lane (for ``u``, the value on the unit-norm scale) into ``words``;
        returns its squared centroid."""
        n, scale = bucket_count(bits, self.head_dim), Float32(bucket_scale(bits))
        flip = Uint32((1 << bits) - 1)  # (m + k) xor flip = m - 1 - k
        ub = _as_u32(u)
        a = (ub & Uint32(0x7FFFFFFF)) + (ub >> 31)  # the next float up for u < 0: b <= |u|
        q = _floor_index(_as_f32(a), scale)
        if const_expr(bits == 8):  # larger |u| share the last bucket
            q = cutlass.min(q, Int32(n - 1))
        entry = cute.make_rmem_tensor((4,), Uint32)
        cute.autovec_copy(sTable[q, None], entry)
        above = entry[1] < a
        c2 = _as_f32(entry[3] if above else entry[2])
        code = entry[0] + (Uint32(1) if above else Uint32(0))
        code = code if Int32(ub) > Int32(0) else code ^ flip  # +0.0 and -0.0 take m - 1
        w, sh = (bits * j) // 32, (bits * j) % 32
        words[w] = words[w] | (code << sh)
        if const_expr(sh + bits > 32):  # a 3-bit code straddling two words
            words[w + 1] = words[w + 1] | (code >> (32 - sh))
        return c2

    @cute.jit
    def _store(self, mData, mScale, bits: cutlass.Constexpr[int], slot, head, lane, words, sigma):
        """This lane's packed codes, and (lane 0 of the row) the scale, where the slot says."""
        d, E = self.head_dim, self.per_lane
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
def _mma_m16n8k16(a, b, c, fp16: bool, *, loc=None, ip=None) -> list:
    """``d = a b + c``, one ``mma.sync.m16n8k16.row.col`` with 16-bit inputs (a: 4 registers,
    b: 2, c and d: 4 float32), the fragments as the PTX ISA lays them out."""
    ab = "f16" if fp16 else "bf16"
    res = llvm.inline_asm(
        ir.Type.parse("!llvm.struct<(f32, f32, f32, f32)>"),
        [Uint32(x).ir_value(loc=loc, ip=ip) for x in (*a, *b)] + [Float32(x).ir_value(loc=loc, ip=ip) for x in c],
        f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, "
        "{$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
    )
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def _floor_index(a: Float32, scale: Float32, *, loc=None, ip=None) -> Int32:
    """``floor(a * scale)`` for ``0 <= a * scale < 2**22`` without a conversion instruction
    (quarter rate): ``a * scale + 2**23`` rounded toward zero has it in its low mantissa bits."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(a).ir_value(loc=loc, ip=ip), Float32(scale).ir_value(loc=loc, ip=ip)],
        "{ .reg .f32 t;\n fma.rz.f32 t, $1, $2, 0f4B000000;\n mov.b32 $0, t;\n sub.s32 $0, $0, 0x4B000000; }",
        "=r,f,f", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dsl_user_op
def _as_u32(x: Float32, *, loc=None, ip=None) -> Uint32:
    return Uint32(arith.bitcast(T.i32(), Float32(x).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))


@dsl_user_op
def _as_f32(x: Uint32, *, loc=None, ip=None) -> Float32:
    return Float32(arith.bitcast(T.f32(), Uint32(x).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))
