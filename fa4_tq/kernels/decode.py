"""Decode kernel (CuTeDSL, SM90): up to 32 query rows of one KV head against its packed context,
the codes dequantised straight into ``mma.sync`` registers.

Why a kernel of its own: FA4's SM90 forward (and our subclass of it) computes 64-row wgmma tiles
from shared memory. A decode step has 1 to 8 query rows per KV head (seqlen_q x GQA), so 7/8 of
that tensor work is padding (verification of a few draft tokens, 16-32 rows: 3/4 to half of
it), and every dequantised K/V value makes a round trip through shared memory; measured, that
kernel stays at 15-36% of copy bandwidth (perf/results/decode-*.md). Here the tile is
transposed ("swap AB"): keys and head-dim columns are the MMA's M side (16) and the query rows
its N side (8), so nothing is padding at GQA 8:1, and each thread turns its own packed bytes
into the A fragments it multiplies.

One CTA = (KV split, KV head and row group, sequence): 12 warps and 8 query rows (one n-tile)
or, past 8 rows, 8 warps and 16 rows (two n-tiles: each dequantised fragment feeds two MMAs), in
as many row groups as the rows need (32 rows: two CTAs on the same keys). Each warp walks its own
blocks of ``CHUNKS x 16`` keys (blocks ``warp, warp + W, ...`` of the split, W warps) with its
own online softmax, the next block's bytes loading while this one is computed; the warps merge
through shared memory and write the split's normalised output and LSE (float32), which
``kernels/combine.py`` merges across splits. With ``combine_in_kernel`` (off until tested on a
GPU) the CTA of a (sequence, KV head, row group) that finishes last merges them instead
(``_combine_if_last``, with the combine's ``merge_row``), and one split writes the output
directly: one launch a call. Per 16-key chunk a warp does:

- ``S^T = K Q^T``: ``d/16`` m16n8k16 MMAs; lane ``(quad, qi)`` owns keys ``quad`` and
  ``quad + 8`` and the head-dim slice ``[qi*d/4, (qi+1)*d/4)``: one contiguous load per key. The
  MMA's k positions are a permutation of the head dims, the same for K and for Q (held in
  registers for the whole kernel), so the dot products are unchanged (``k_dim`` below).
- the codes are looked up in the unscaled codebook a byte at a time, in a shared-memory table
  with one copy per lane (``byte_table``: no bank conflicts, one load per byte and one ``prmt``
  to address it, ``table_offset``, where the register lookup of prefill takes ~6 a byte), and
  the key's scale multiplies its score instead (``s = sigma_k * q.g``): no per-element multiply.
- ``O^T += V^T P^T``: the scores' 8x8 halves are transposed in registers (``movmatrix``) into the
  B fragments; P is multiplied by the value's scale ``sigma_v`` first. Lane ``(quad, qi)`` owns
  keys ``2qi, 2qi+1, 2qi+8, 2qi+9`` and the head dims ``[quad*d/8, (quad+1)*d/8)``; a fragment
  register holds one head dim of two keys, so the two keys' codes are interleaved
  (``interleave_codes``) before the lookup and come out paired.
- 3-bit codes (head_dim 128 only) are not byte-aligned: their 48-byte rows are copied whole and
  row-major into the ring (``_issue_rows3``), a lane reads its K slice as three words and its V
  slice (6 bytes at ``6 quad``) from the two words around it (``v3_slice_at``, ``v3_groups``: a
  ``prmt`` a group of eight codes), and each pair of codes (6 bits) is one lookup in a table whose
  rows repeat every 64, at the offset one ``prmt`` makes from the stream shifted to put the pair
  at a byte's start (``pair_offsets``).

The kernel rotates the query rows itself (K's R: signs, then the float32 butterflies of
``codec.rotation``, one rounding) and un-rotates each split's output (V's R^T) before writing it:
the rotation is linear, so the splits' combine may come after it. A decode call is then this
kernel and ``kernels/combine.py`` (one cast, unsplit). The plain PyTorch twins:
``fa4_tq.reference`` for the attention, ``decode_pairs`` and ``byte_table`` (on ints) for the
register layout, tested in tests/test_decode_layout.py.
"""

from __future__ import annotations

import functools
import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from flash_attn.cute import utils as fa_utils

from .combine import SplitCombine, merge_row
from .hadamard import butterflies
from .load_stage import copy_part_async, mma_16816, pack_x2, prmt
from .staging import decode_four, entry_bits

ROWS = 8  # query rows of one MMA n-tile: the MMA's N
# Query rows per KV head (seqlen_q x GQA) the kernel takes, in CTAs of 8 or 16 rows. Past 32 the
# packed-KV prefill kernel (64-row wgmma tiles) is faster: at 64 rows this kernel measured 1.5x
# slower (perf/results/decode-*.md).
MAX_ROWS = 32
CHUNK = 16  # keys per MMA: M of K Q^T, K of V^T P^T
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_HEAD_DIMS = (64, 128)
# 3-bit rows run at head_dim 128 only: there a row is 48 bytes (three 16-byte pieces), a lane's K
# slice three whole words; at 64 a K slice would be 6 bytes at 6-byte offsets, a V slice 3 bytes.
ROW3_BYTES = 48
# The byte tables: row ``e`` (a byte value) is 256 bytes, K's width in the first 128 (one word a
# lane; 2-bit: two words a lane pair), a second width's in the other 128. 256, not 128, so that one
# ``prmt`` makes a lookup's offset (``table_offset``).
TABLE_ROW_BYTES = 256
TABLE_BYTES = 256 * TABLE_ROW_BYTES
SMEM_PER_SM = 233472  # shared memory of an SM90 SM; each CTA also takes 1 KB of it
# Warps per SM the registers allow, by n-tiles (ptxas, `compile_check decode-kernel --ptxas`:
# 74-151 registers a thread at one tile, 128-237 at two; 64K registers an SM)
REGISTER_WARPS = {1: 12, 2: 8}


def chunks_per_block(k_bits: int, v_bits: int) -> int:
    """16-key chunks per warp loop trip: two, so each load in flight carries more bytes; one at 8
    bits, whose bytes would not fit twice (current and next block) in registers."""
    return 1 if max(k_bits, v_bits) == 8 else 2


def supports(head_dim: int, k_bits: int, v_bits: int, rows: int, page_size: int) -> bool:
    """Whether this kernel runs a decode call of ``rows`` query rows per KV head: every lane's
    share of a row must be whole 32-bit words (a V slice at head_dim 64 and 2 bits is 2 bytes),
    and 3-bit rows are read whole (head_dim 128, ``ROW3_BYTES``)."""
    if 3 in (k_bits, v_bits) and head_dim != 128:
        return False
    return (head_dim in SUPPORTED_HEAD_DIMS and k_bits in SUPPORTED_BITS and v_bits in SUPPORTED_BITS
            and 1 <= rows <= MAX_ROWS and page_size % CHUNK == 0
            and (v_bits == 3 or head_dim // 8 * v_bits % 32 == 0))


def n_tiles(rows: int) -> int:
    """8-row MMA n-tiles a CTA computes for ``rows`` query rows per KV head: one up to 8 rows;
    two above, so each dequantised K/V fragment feeds two MMAs (halving the decode work per row)
    while the accumulators still fit the registers; more rows take more CTAs (row groups)."""
    return 1 if rows <= ROWS else 2


def row_groups(rows: int) -> int:
    """CTAs per (split, KV head, sequence): ``rows`` query rows in CTAs of ``n_tiles(rows)`` n-tiles."""
    return -(-rows // (n_tiles(rows) * ROWS))


# ----------------------------------------------------------------------------- the code layout
def interleave_codes(x, y, bits: int):
    """Two words of ``bits``-bit codes (codes ``x_0, x_1, ...`` and ``y_0, y_1, ...``) -> the
    streams ``x_0 y_0 x_2 y_2 ...`` and ``x_1 y_1 x_3 y_3 ...``: two ops each, where a ``prmt``
    per output register would be needed after the lookup. Plain Python over ``&, |, <<, >>``:
    the kernel calls it on registers, the tests on ints."""
    m = {2: 0x33333333, 3: 0x001C71C7, 4: 0x0F0F0F0F, 8: 0x00FF00FF}[bits]  # 3-bit: one 24-bit group
    even = (x & m) | ((y & m) << bits)
    odd = ((x >> bits) & m) | (y & ((m << bits) & 0xFFFFFFFF))
    return even, odd


def byte_table(bits: int, dtype: str, crossed: bool = False) -> tuple[tuple[int, int], ...]:
    """Row ``e`` of the kernel's lookup table: the two words a byte ``e`` of ``bits``-bit codes
    decodes to. 2-bit: codes 0-1 and 2-3 of the byte (code 0 in the low half), or ``crossed``
    (``decode_value_pairs2``): codes 0 and 2, then 1 and 3; 4-bit: both codes
    in one word, repeated; 8-bit: the code's value in the low half, repeated; 3-bit: rows are
    indexed by a pair of codes (6 bits, ``pair_offsets``), its two values in one word, repeated
    (rows 64-255 repeat 0-63: a lookup's byte may carry two bits of the next pair). In shared
    memory each row holds these two words 16 times (``PackedDecode._fill_table``)."""
    v = entry_bits(bits, dtype)
    if bits == 2 and crossed:
        return tuple((v[e & 3] | v[e >> 4 & 3] << 16, v[e >> 2 & 3] | v[e >> 6] << 16) for e in range(256))
    if bits == 2:
        return tuple((v[e & 3] | v[e >> 2 & 3] << 16, v[e >> 4 & 3] | v[e >> 6] << 16) for e in range(256))
    if bits == 3:
        return tuple((v[e & 7] | v[e >> 3 & 7] << 16,) * 2 for e in range(256))
    if bits == 4:
        return tuple((v[e & 15] | v[e >> 4] << 16,) * 2 for e in range(256))
    return tuple((v[e],) * 2 for e in range(256))


def lane_offset(half: int, bits: int, lane):
    """Where a lane's words sit in a table row (bytes): in the row's half ``half`` (K's width 0, a
    second width 1), word ``lane``; 2-bit entries are two words, one copy per lane pair (a warp
    loads 64-bit words half a warp at a time, so 16 copies are conflict-free). Always < 256."""
    return half * (TABLE_ROW_BYTES // 2) + (8 * (lane % 16) if bits == 2 else 4 * lane)


def table_offset(codes, i: int, lane_off, prmt_op):
    """Byte offset, in the tables, of the lane's words of the row that byte ``i`` of the word
    ``codes`` names: ``byte * 256 + lane_off``, one ``prmt`` (byte 0 from ``lane_off``, byte 1 the
    code byte, bytes 2-3 zero)."""
    return prmt_op(codes, lane_off, 0x7604 | i << 4)


def shifted_words(words, s: int) -> list:
    """The little-endian stream ``words`` shifted right by ``s`` bits (0-7), a word at a time: one
    funnel shift a word (the last word a plain shift). Plain Python operators: on registers the
    shifts drop the bits past 32; on ints the bits past 32 stay, and ``prmt`` ignores them."""
    if s == 0:
        return list(words)
    n = len(words)
    return [(words[w] >> s) | (words[w + 1] << (32 - s)) if w + 1 < n else words[w] >> s for w in range(n)]


def pair_offsets(words, pairs: int, lane_off, prmt_op) -> list:
    """3-bit codes: byte offsets, in the tables, of the lane's word of the rows that pairs ``0`` to
    ``pairs - 1`` of the stream ``words`` name (pair ``p``: codes ``2p`` and ``2p + 1``, bits ``6p``
    to ``6p + 5``): ``pair * 256 + lane_off``. Pair ``p`` starts ``6p % 8`` bits into byte
    ``6p // 8``; in the stream shifted right by that much (``shifted_words``: 0, 6, 4 or 2 bits,
    each shift computed once) it is the low six bits of a byte, and the offset is one ``prmt``
    (``table_offset``), where a shift and an and-or were needed. The two bits above the pair pick
    rows 64-255, which repeat rows 0-63 (``byte_table``). A K slice (three words, 16 pairs): nine
    shifts and 16 ``prmt``."""
    streams, out = {}, []
    for p in range(pairs):
        s = 6 * p % 8
        if s not in streams:
            streams[s] = shifted_words(words, s)
        w, i = divmod(6 * p // 8, 4)
        out.append(table_offset(streams[s][w], i, lane_off, prmt_op))
    return out


def v3_slice_at(quad) -> tuple:
    """3-bit V at head_dim 128: lane ``(quad, *)``'s 16 codes of a key are the 6 bytes at ``6 quad``
    of its 48-byte row. They lie in the two 32-bit words from word ``3 (quad // 2) + quad % 2`` of
    the row, from byte ``2 (quad % 2)`` of the pair: (that word, that byte)."""
    return 3 * (quad // 2) + quad % 2, 2 * (quad % 2)


def v3_selectors(byte) -> tuple:
    """The ``prmt`` selectors that cut the 6 bytes from ``byte`` (0 or 2, a run-time value: fixed per
    lane) of two words into two 24-bit groups of eight codes: bytes ``byte`` to ``byte + 3`` and
    ``byte + 3`` to ``byte + 5`` (the top byte of each group is garbage; ``interleave_codes``
    masks it)."""
    return 0x3210 + 0x1111 * byte, 0x5543 + 0x1111 * byte


def v3_groups(a, b, sel, prmt_op) -> tuple:
    """A V slice's two 24-bit groups out of the words ``a``, ``b``: one ``prmt`` each
    (``v3_selectors``), where shifts by the slice's bit offset took about nine operations."""
    return prmt_op(a, b, sel[0]), prmt_op(a, b, sel[1])


def decode_pairs3(words, lane_off, word_at, prmt_op) -> list:
    """3-bit K: a lane's slice of a key (three words, 32 codes) -> 16 words, word ``i`` holding
    the codebook values of codes ``2i`` (low half) and ``2i + 1``; ``word_at(offset)`` is the
    table word at a ``pair_offsets`` offset (the kernel: its shared tables; tests: a model of them)."""
    return [word_at(off) for off in pair_offsets(words, 16, lane_off, prmt_op)]


def decode_key_pairs3(x, y, sel, lane_off, word_at, prmt_op) -> list:
    """3-bit V: the two-word slices ``x`` and ``y`` of two keys (16 codes each, cut out by the
    selectors ``sel``, ``v3_selectors``) -> 16 words, word ``k`` holding dim ``k`` of key x (low
    half) and of key y: the keys interleaved a 24-bit group at a time, then one lookup a pair."""
    xg, yg = v3_groups(*x, sel, prmt_op), v3_groups(*y, sel, prmt_op)
    out = []
    for g in range(2):
        even, odd = interleave_codes(xg[g], yg[g], 3)
        ev, od = pair_offsets([even], 4, lane_off, prmt_op), pair_offsets([odd], 4, lane_off, prmt_op)
        for i in range(4):
            out += [word_at(ev[i]), word_at(od[i])]
    return out


def decode_pairs(w, bits: int, dtype: str, prmt_op, byte_lookup=None) -> list:
    """One word of a code stream -> ``16 // bits`` words, word ``i`` holding the codebook values
    of codes ``2i`` (low half) and ``2i + 1`` in ``dtype``.

    With ``byte_lookup(w, i)`` (the words byte ``i`` of ``w`` names; the kernel: its shared
    table; tests: ``byte_table`` behind ``table_offset``), each byte of ``w`` is looked up: 2-bit
    bytes give two words, 4-bit bytes one, 8-bit bytes one value, paired with the next byte's by
    a ``prmt``. Without, 2/4-bit codes go through ``decode_four`` (the prefill kernel's register
    lookup), which the tests hold the table path to."""
    if byte_lookup is None:
        out = []
        for p in range(8 // bits):
            out += list(decode_four(w >> (4 * bits * p), bits, dtype, prmt_op))
        return out
    words = [byte_lookup(w, i) for i in range(4)]
    if bits == 8:
        return [prmt_op(words[2 * i][0], words[2 * i + 1][0], 0x5410) for i in range(2)]
    return [x for ws in words for x in ws[:4 // bits]]


def decode_key_pairs2(x, y, byte_lookup) -> tuple[list, list]:
    """2-bit K in MMA fragment order: one word of codes of key ``quad`` (``x``) and of key
    ``quad + 8`` (``y``) -> their 8 decoded words each (word ``k``: codes ``2k``, ``2k + 1``), with
    each 64-bit lookup returning one word of each key, the ``(a0, a1)`` or ``(a2, a3)`` register
    pair of an MMA's A fragment (the nibbles of the two keys interleaved first, four ops), where
    a byte of one key gave words ``2k`` and ``2k + 1``, which sit two registers apart in the
    fragment and cost a move each. ``byte_lookup``: the plain 2-bit table (``byte_table``)."""
    even, odd = interleave_codes(x, y, 4)  # byte b: nibble 2b (even) or 2b + 1 (odd) of x, then of y
    kx, ky = [None] * 8, [None] * 8
    for b in range(4):
        kx[2 * b], ky[2 * b] = byte_lookup(even, b)
        kx[2 * b + 1], ky[2 * b + 1] = byte_lookup(odd, b)
    return kx, ky


def decode_value_pairs2(x, y, byte_lookup) -> list:
    """2-bit V in MMA fragment order: one word of codes of two keys (``x``, ``y``; 16 dims) -> 16
    words, word ``m`` holding dim ``m`` of key x (low half) and of key y, with each 64-bit lookup
    returning dims ``2j`` and ``2j + 1``, the ``(a0, a1)`` or ``(a2, a3)`` register pair of m-tile
    ``j``'s A fragment. The keys' nibbles are interleaved (as ``interleave_codes`` at 4 bits: the
    same four ops as at 2), so a byte holds dims ``2j``, ``2j + 1`` of x then of y, and the table
    crosses them (``byte_table(2, dtype, crossed=True)``: codes 0 and 2, then 1 and 3). The same
    lookups as ``decode_key_pairs2``, listed pair by pair."""
    wx, wy = decode_key_pairs2(x, y, byte_lookup)
    return [w for pair in zip(wx, wy) for w in pair]


def v_slot(quad, qi, v_words: int):
    """Where lane ``(quad, qi)``'s V slice of a key sits among the 32 slices of the ring's row of
    that key index ``t`` (in slices): the ``g = 4 / v_words`` quads of one 16-byte piece of a V row
    side by side (so one 16-byte ``cp.async`` fills them: an 8- or 4-byte one would go through L1),
    the pieces of the four ``qi`` interleaved so that no two lanes of a half warp share a bank."""
    if v_words >= 4:
        return quad * 4 + qi
    g = 4 // v_words
    return quad // g * 4 * g + qi * g + quad % g


def k_piece(u, k_words: int):
    """The 16-byte piece ``u`` (0 to ``16 k_words - 1``) of a chunk's K rows, when a lane's slice is
    4 or 8 bytes (``k_words`` 1 or 2; a row is ``k_words`` pieces): (the chunk key, the piece of
    its row, the slice slot of the ring's row ``key // 8`` where it goes). The ring keeps a slice
    of lane ``(quad, qi)`` at slot ``4 quad + qi``, so a piece's ``4 / k_words`` slices, of one
    key and consecutive ``qi``, are side by side and one 16-byte ``cp.async`` copies them (an 8-
    or 4-byte one would go through L1)."""
    key, m = u // k_words, u % k_words
    return key, m, key % 8 * 4 + m * (4 // k_words)


def v_key(qi, t: int):
    """The chunk key whose V slices lanes ``(*, qi)`` read as their key index ``t`` (0-3): the
    keys ``2qi, 2qi+1, 2qi+8, 2qi+9`` of the B fragment of ``V^T P^T``."""
    return 2 * qi + t % 2 + 8 * (t // 2)


def v_piece(u, v_words: int):
    """The 16-byte piece ``u`` (0 to ``32 v_words - 1``) of a chunk's V rows, when a lane's slice is
    4 or 8 bytes (``v_words`` 1 or 2; a row is ``2 v_words`` pieces): (the key index ``t`` of the
    lanes that read it, the chunk key, the piece of its row, its slot in the ring's row ``t``:
    ``v_slot`` of its first quad). Consecutive pieces are consecutive bytes of a row."""
    tq, m = u // (2 * v_words), u % (2 * v_words)
    t, qi = tq // 4, tq % 4
    return t, v_key(qi, t), m, v_slot(m * (4 // v_words), qi, v_words)


def k_dim(d: int, kk: int, pos: int, qi: int) -> int:
    """The head dim at MMA k position ``pos`` (0-15) of k-step ``kk`` for lanes ``qi`` (their
    positions are ``2qi, 2qi+1, 2qi+8, 2qi+9``): word ``2kk`` (+1 for the upper eight) of the
    lane's decoded slice ``[qi*d/4, (qi+1)*d/4)``."""
    assert pos // 2 % 4 == qi
    return qi * (d // 4) + 4 * kk + 2 * (pos >= 8) + pos % 2


def v_dim(d: int, j: int, m: int) -> int:
    """The head dim at row ``m`` (0-15) of the output's m-tile ``j``: lanes ``quad = m % 8`` own
    ``[quad*d/8, (quad+1)*d/8)``; rows ``quad`` and ``quad + 8`` are its dims ``2j`` and ``2j+1``."""
    return (m % 8) * (d // 8) + 2 * j + m // 8


@functools.lru_cache(maxsize=None)
def resident_ctas(head_dim: int, k_bits: int, v_bits: int, tiles: int) -> int:
    """``PackedDecode.ctas_per_sm`` of the (head_dim, K bits, V bits, n-tiles) variants, computed
    once (the split planner asks on every call)."""
    return PackedDecode(head_dim, k_bits, v_bits, 1, tiles * ROWS, False).ctas_per_sm()


# ----------------------------------------------------------------------------- register ops
@dsl_user_op
def transpose_8x8(x: Uint32, *, loc=None, ip=None) -> Uint32:
    """The warp's 8x8 matrix of 16-bit values (lane ``l`` holds row ``l/4``, columns ``2(l%4)``
    and ``+1``) transposed, in the same layout."""
    return Uint32(llvm.inline_asm(
        T.i32(), [Uint32(x).ir_value(loc=loc, ip=ip)], "movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;",
        "=r,r", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
    ))


# ----------------------------------------------------------------------------- the kernel
class PackedDecode:
    """Compile-time configuration: head_dim, K/V bits, query rows (seqlen_q x GQA <= 32), the GQA
    group, causal (bottom-right, for verification). A CTA takes ``cta_rows`` (8 or 16) of the
    rows; more rows are ``row_groups`` CTAs on the same keys."""

    # Blocks in flight per warp (the cp.async ring). Three measured fastest with the byte tables in
    # shared memory (perf/results/decode-*); 12 warps of three stages and the tables take 225 KB at
    # K4V4, four would not fit.
    stages = 3
    # Warps per CTA, by n-tiles; each walks its own blocks of the split. One CTA an SM, so that
    # all its warps share one copy of the byte tables (64 KB): 12 warps at one tile (two CTAs of 4
    # measured 1.04-1.09x slower at K4V4, 1.17x at K2V4, level at K2V2, 1.02x faster at K8V8);
    # 8 at two tiles, all the registers allow, level with two CTAs of 4 (perf/results/decode-*.md).
    warps_by_tiles = {1: 12, 2: 8}
    # The page and slot of a chunk's first key by FA4's own ``FastDivmodDivisorV2`` (a multiply-high
    # and a shift, as its paged K/V loads do) instead of a division by the run-time page size
    # (SASS: ~20 instructions each, two a block, in the loop). Off until its GPU tests have run
    # (written 2026-12-08 with no GPU lent; ``scripts/ab_decode.py --set`` measures it).
    fast_page_divmod = False
    # 2-bit lookups in MMA fragment order (``decode_key_pairs2``, ``decode_value_pairs2``): each
    # 64-bit lookup fills an A fragment's register pair, where ptxas moved nearly every word it
    # loaded (SASS of K2V2's loop: 138 moves in 706 instructions a block, K4V4: 15 in 785). Off
    # until its GPU tests have run (written 2026-12-08 with no GPU lent).
    paired_2bit_lookups = False

    def __init__(self, head_dim: int, k_bits: int, v_bits: int, seqlen_q: int, group: int, causal: bool,
                 pdl: bool = True, combine_in_kernel: bool = False):
        rows = seqlen_q * group
        if not supports(head_dim, k_bits, v_bits, rows, CHUNK):
            raise ValueError(f"PackedDecode does not run head_dim {head_dim}, K{k_bits}V{v_bits}, {rows} rows")
        self.d, self.kb, self.vb = head_dim, k_bits, v_bits
        # A programmatic dependent launch: the CTAs fill their byte tables while the kernel before
        # them finishes, then wait for it (``griddepcontrol.wait``) before they read q, the page
        # table or the cache, or write a partial. The codebooks read before the wait are made on
        # the host and copied once (``staging.lookup_table``): no kernel writes them.
        self.pdl = pdl
        # Whether the kernel merges its splits itself (``_combine_if_last``; at one split it writes
        # the output directly) instead of leaving float32 partials to ``kernels/combine.py``
        # (``fa4_tq.decode.DECODE_COMBINE_IN_KERNEL`` says which the calls use, and why).
        self.combine_in_kernel = combine_in_kernel
        self.seqlen_q, self.group, self.rows = seqlen_q, group, rows
        self.causal = causal and seqlen_q > 1
        self.tiles = n_tiles(rows)
        self.warps = self.warps_by_tiles[self.tiles]
        self.cta_rows = self.tiles * ROWS
        self.row_groups = row_groups(rows)
        self.chunks = chunks_per_block(k_bits, v_bits)
        # One byte table a kind (bits, crossed): K's and V's, one if they are the same kind.
        paired = self.paired_2bit_lookups
        self.k_table, self.v_table = (k_bits, False), (v_bits, paired and v_bits == 2)
        self.table_kinds = tuple(sorted({self.k_table, self.v_table}))
        self.block = self.chunks * CHUNK
        self.k_words = head_dim // 4 * k_bits // 32  # per key and lane
        self.v_words = head_dim // 8 * v_bits // 32
        # One warp's stage of the ring (bytes): K pieces [chunk][key r][piece][lane], V pieces
        # [chunk][key t][piece][lane] (16-byte pieces at most, lanes adjacent: conflict-free
        # shared loads), then the scale rows [chunk][K/V][16 keys] (float32 room, either dtype).
        self.k_piece, self.v_piece = min(16, 4 * self.k_words), min(16, 4 * self.v_words)
        # Each lane copies its own 4- or 8-byte V slices where the other side is 8 bits (one
        # chunk a block): K8V4 measured 1.15x faster so (197.8 vs 228.0 us at b8 32K), where K4V4
        # and K2V4 are 1.04-1.06x faster with the 16-byte pieces (perf/results/decode-*.md).
        self.v_lane_copies = self.v_piece == 16 or self.chunks == 1
        self.k_bytes = self.chunks * 2 * 32 * 4 * self.k_words
        self.v_bytes = self.chunks * 4 * 32 * 4 * self.v_words
        # 3-bit rows are copied whole, row-major (``_issue_rows3``): a lane's K slice is three
        # words at 12 qi (the K size above is already 16 rows of 48 bytes a chunk), its V slice 6
        # bytes at 6 quad (``v3_slice_at``; the V words and pieces above are then unused)
        if v_bits == 3:
            self.v_bytes = self.chunks * CHUNK * ROW3_BYTES
        # After the loop a warp's ring holds its unnormalised output rows (float32) for the merge:
        # a stage is padded where they would not fit (K2V8 at 16 rows).
        self.stage_bytes = max(self.k_bytes + self.v_bytes + self.chunks * 2 * CHUNK * 4,
                               -(-self.cta_rows * head_dim * 4 // (16 * self.stages)) * 16)

    def smem_bytes(self) -> int:
        """Shared memory a CTA allocates: the rings, the byte tables, the merge's row stats, the
        rotated query rows, the combine's ticket."""
        return (self.warps * self.stages * self.stage_bytes + TABLE_BYTES
                + self.warps * self.cta_rows * 2 * 4 + self.cta_rows * self.d * 2
                + 4 * self.combine_in_kernel)

    def ctas_per_sm(self) -> int:
        """CTAs of this kernel an SM holds at once (shared memory and registers); the same for every
        query shape of a (head_dim, K bits, V bits, n-tiles): see ``resident_ctas``."""
        return max(1, min(REGISTER_WARPS[self.tiles] // self.warps, SMEM_PER_SM // (self.smem_bytes() + 1024)))

    # Shared addresses in the ring stage at ``stage``, for the copies that fill it and the loads
    # that read it.
    def _k_at(self, stage, c, r, piece, lane):
        return stage + (((2 * c + r) * (4 * self.k_words // self.k_piece) + piece) * 32 + lane) * self.k_piece

    def _v_at(self, stage, c, t, piece, lane):
        return stage + self.k_bytes + (((4 * c + t) * (4 * self.v_words // self.v_piece) + piece) * 32 + lane) * self.v_piece

    def _v_reader_slot(self, lane, quad, qi):
        """The slot of lane ``(quad, qi)``'s V slices in a ring row: its own lane where it copied
        them itself (``v_lane_copies``), else where the 16-byte pieces put them (``v_slot``)."""
        return lane if self.v_lane_copies else v_slot(quad, qi, self.v_words)

    def _row3_at(self, region, c, key):
        """A 3-bit row's shared address: chunk ``c``'s key ``key`` of the side stored at ``region``."""
        return region + (c * CHUNK + key) * ROW3_BYTES

    def _scales_at(self, stage, c, side):
        return stage + self.k_bytes + self.v_bytes + (2 * c + side) * CHUNK * 4

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (batch, seqlen_q, heads, d) bf16/fp16, not rotated
        mKData: cute.Tensor,  # (pages, page_size, kv_heads, d*kb/8) uint8
        mVData: cute.Tensor,
        mKScale: cute.Tensor,  # (pages, kv_heads, page_size) fp16/fp32
        mVScale: cute.Tensor,
        mKTable: cute.Tensor,  # (2**bits,) float32 codebook: the byte table is built from it
        mVTable: cute.Tensor,
        mKSigns: cute.Tensor,  # (d,) float32: the signs of K's R (the query's rotation)
        mVSigns: cute.Tensor,  # (d,) float32: the signs of V's R (the output's un-rotation)
        mPageTable: cute.Tensor,  # (batch, max_pages) int32
        mSeqused: cute.Tensor,  # (batch,) int32
        mO: cute.Tensor,  # (splits, batch, seqlen_q, heads, d) float32, un-rotated
        mLSE: cute.Tensor,  # (splits, batch, heads, seqlen_q) float32
        # with ``combine_in_kernel`` only (the partials are then unused at one split):
        mOut: cute.Tensor,  # (batch, seqlen_q, heads, d) q's dtype: the output
        mLseOut: cute.Tensor,  # (batch, heads, seqlen_q) float32
        mTickets: cute.Tensor,  # (batch * kv_heads * row_groups,) int32, zeros; left zeros
        softmax_scale: Float32,
        stream: cuda.CUstream = None,
    ):
        splits, batch = mO.shape[0], mO.shape[1]
        kv_heads = mKData.shape[2]
        self.kernel(mQ, mKData, mVData, mKScale, mVScale, mKTable, mVTable, mKSigns, mVSigns, mPageTable, mSeqused,
                    mO, mLSE, mOut, mLseOut, mTickets, softmax_scale).launch(
            grid=[kv_heads * self.row_groups, splits, batch], block=[32 * self.warps, 1, 1], stream=stream,
            use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mQ, mKData, mVData, mKScale, mVScale, mKTable, mVTable, mKSigns, mVSigns, mPageTable, mSeqused,
               mO, mLSE, mOut, mLseOut, mTickets, softmax_scale: Float32):
        d = self.d
        bf16 = const_expr(mQ.element_type == cutlass.BFloat16)
        tidx, _, _ = cute.arch.thread_idx()
        # KV heads innermost: CTAs launched together read neighbouring heads' rows, which share
        # 128-byte L2 lines (ptxas's cp.async fetch size); with the splits innermost the same
        # kernel read 1.3x the bytes from DRAM at 2 splits (perf/results/decode-*.md).
        head_group, split, b = cute.arch.block_idx()
        kv_head = head_group // self.row_groups
        first_row = head_group % self.row_groups * self.cta_rows  # this CTA's first query row
        NT, R, W = self.tiles, self.cta_rows, self.warps
        splits = cute.arch.grid_dim()[1]
        warp, lane = tidx // 32, tidx % 32
        quad, qi = lane // 4, lane % 4

        smem = cutlass.utils.SmemAllocator()
        S, C = self.stages, self.chunks
        warp_bytes = S * self.stage_bytes
        ring = smem.allocate_tensor(cutlass.Uint8, cute.make_layout((W * warp_bytes,)), byte_alignment=128)
        # after the loop each warp's ring holds its unnormalised output rows for the merge
        sO = cute.make_tensor(cute.recast_ptr(ring.iterator, dtype=Float32),
                              cute.make_layout((W, R, d), stride=(warp_bytes // 4, d, 1)))
        sML = smem.allocate_tensor(Float32, cute.make_layout((W, R, 2), stride=(2 * R, 2, 1)), byte_alignment=16)
        # the rotated query rows, as pairs (row-major: a lane's fragment words are contiguous)
        sQ = smem.allocate_tensor(Uint32, cute.make_layout((R, d // 2), stride=(d // 2, 1)), byte_alignment=128)
        tab = smem.allocate_tensor(Uint32, cute.make_layout((TABLE_BYTES // 4,)), byte_alignment=16)
        sTicket = None
        if const_expr(self.combine_in_kernel):
            sTicket = smem.allocate_tensor(Int32, cute.make_layout((1,)), byte_alignment=4)
        tables = {}  # kind -> (the table's shared address, this lane's offset in a row)
        for half, kind in enumerate(self.table_kinds):
            self._fill_table(mKTable if kind == self.k_table else mVTable, tab, half, kind, tidx, bf16)
            tables[kind] = (tab.iterator.toint(), lane_offset(half, kind[0], lane))
        if const_expr(self.pdl):
            cute.arch.griddepcontrol_wait()
        self._rotate_query(mQ, mKSigns, sQ, b, kv_head, first_row, warp, lane, bf16)
        cute.arch.sync_threads()

        # This split's keys: splits cut the longest table into equal runs of whole blocks.
        page_size = mKData.shape[1]
        page_div = cute.FastDivmodDivisorV2(page_size) if const_expr(self.fast_page_divmod) else page_size
        seqlen = mSeqused[b]
        max_keys = mPageTable.shape[1] * page_size
        per_split = (max_keys + splits * self.block - 1) // (splits * self.block) * self.block
        start = split * per_split
        end = cutlass.min(start + per_split, seqlen)
        nblk = (end - start + self.block - 1) // self.block if end > start else Int32(0)

        # Q^T B fragments, whole kernel: per n-tile n, row 8n + quad's slice [qi*d/4, (qi+1)*d/4)
        # (rows past ``rows``: zeros).
        qw = cute.make_rmem_tensor((NT * d // 8,), Uint32)
        for n in cutlass.range_constexpr(NT):
            row_at = sQ.iterator.toint() + ((ROWS * n + quad) * (d // 2) + qi * (d // 8)) * 4
            _shared_words(row_at, qw, n * d // 8, d // 8)

        acc = cute.make_rmem_tensor((d // 16, NT, 4), Float32)  # O^T m-tiles, per n-tile
        acc.fill(0.0)
        # rows 8n + 2qi + h: max (log2 domain) at [2n + h], this lane's row sum at [2NT + 2n + h]
        ml = cute.make_rmem_tensor((4 * NT,), Float32)
        for i in cutlass.range_constexpr(2 * NT):
            ml[i], ml[2 * NT + i] = -Float32.inf, Float32(0.0)
        scale_log2 = softmax_scale * Float32(math.log2(math.e))

        # The ring: block warp + j*W goes to stage j % S, S - 1 blocks ahead of the one
        # computed; page ids are read one block before their bytes are requested.
        ring_base = ring.iterator.toint() + warp * warp_bytes
        src = (mKData, mVData, mKScale, mVScale)
        pages = cute.make_rmem_tensor((2 * C,), Int32)  # page ids, then slots of each chunk's first key
        for j in cutlass.range_constexpr(S - 1):
            if warp + j * W < nblk:
                key0 = start + (warp + j * W) * self.block
                self._pages(mPageTable, b, key0, end, page_div, pages)
                self._issue(ring_base + j * self.stage_bytes, src, kv_head, key0, end, pages, lane, quad, qi)
            cute.arch.cp_async_commit_group()
        if warp + (S - 1) * W < nblk:
            self._pages(mPageTable, b, start + (warp + (S - 1) * W) * self.block, end, page_div, pages)
        for blk in cutlass.range(warp, nblk, W, unroll=1):
            j = (blk - warp) // W
            cute.arch.sync_warp()  # every lane is done reading the stage refilled next
            ahead = blk + (S - 1) * W
            if ahead < nblk:
                self._issue(ring_base + (j + S - 1) % S * self.stage_bytes, src, kv_head, start + ahead * self.block,
                            end, pages, lane, quad, qi)
                if ahead + W < nblk:
                    self._pages(mPageTable, b, start + (ahead + W) * self.block, end, page_div, pages)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(S - 1)
            cute.arch.sync_warp()  # the scale rows were copied by other lanes
            self._block(ring_base + j % S * self.stage_bytes, src, qw, acc, ml, tables, start + blk * self.block,
                        end, seqlen, first_row, scale_log2, lane, quad, qi, bf16)
        cute.arch.cp_async_wait_group(0)
        cute.arch.sync_warp()

        self._merge(sO, sML, acc, ml, warp, quad, qi)
        cute.arch.sync_threads()
        self._epilogue(sO, sML, mO, mLSE, mOut, mLseOut, mVSigns, splits, split, b, kv_head, first_row, warp, lane)
        if const_expr(self.combine_in_kernel):
            if splits > 1:
                self._combine_if_last(mO, mLSE, mOut, mLseOut, mTickets, sTicket, splits, b, head_group, kv_head,
                                      first_row, tidx, warp, lane)

    # ------------------------------------------------------------------------- loads
    @cute.jit
    def _rotate_query(self, mQ, mSigns, sQ, b, kv_head, first_row, warp, lane, bf16):
        """This CTA's query rows of the KV head (``first_row`` on) times K's R into ``sQ`` as pairs of
        ``mQ``'s dtype: half a warp a row, ``d/16`` consecutive dims a lane
        (``hadamard.butterflies``), so each value is ``rotate(q).to(dtype)`` of the reference bit
        for bit. Rows past ``rows`` are zeros."""
        d, per, part, W = self.d, self.d // 16, lane % 16, self.warps
        for rr in cutlass.range_constexpr(-(-self.cta_rows // (2 * W))):
            row = (warp + W * rr) * 2 + lane // 16
            if row < self.cta_rows:  # both halves of a warp alike: the butterflies shuffle
                f = cute.make_rmem_tensor((per,), Float32)
                f.fill(0.0)
                if first_row + row < self.rows:
                    i, g = (first_row + row) // self.group, (first_row + row) % self.group
                    for j in cutlass.range_constexpr(per):
                        f[j] = Float32(mQ[b, i, kv_head * self.group + g, part * per + j]) * mSigns[part * per + j]
                butterflies(f, per, part, 16)
                for j in cutlass.range_constexpr(per // 2):
                    sQ[row, part * per // 2 + j] = pack_x2(f[2 * j] * Float32(d ** -0.5),
                                                           f[2 * j + 1] * Float32(d ** -0.5), bf16)

    @cute.jit
    def _fill_table(self, mTable, sTab, half: cutlass.Constexpr[int], kind: cutlass.Constexpr, tidx, bf16):
        """``byte_table(*kind)`` from the float32 codebook ``mTable`` into half ``half`` of each row
        of ``sTab``, the row's two words 16 times (``kind``: bits, crossed)."""
        threads = 32 * self.warps
        bits, crossed = kind
        for it in cutlass.range_constexpr(-(-256 // threads)):
            e = tidx + threads * it
            if e < 256:
                if const_expr(bits == 2 and crossed):
                    w = (pack_x2(mTable[e % 4], mTable[e // 16 % 4], bf16),
                         pack_x2(mTable[e // 4 % 4], mTable[e // 64], bf16))
                elif const_expr(bits == 2):
                    w = (pack_x2(mTable[e % 4], mTable[e // 4 % 4], bf16),
                         pack_x2(mTable[e // 16 % 4], mTable[e // 64], bf16))
                elif const_expr(bits == 3):
                    w = (pack_x2(mTable[e % 8], mTable[e // 8 % 8], bf16),) * 2
                elif const_expr(bits == 4):
                    w = (pack_x2(mTable[e % 16], mTable[e // 16], bf16),) * 2
                else:
                    w = (pack_x2(mTable[e], Float32(0.0), bf16),) * 2
                for i in cutlass.range_constexpr(16):
                    pos = (tidx + i) % 16 * 2  # threads of a warp start in different banks
                    sTab[e * (TABLE_ROW_BYTES // 4) + half * 32 + pos] = w[0]
                    sTab[e * (TABLE_ROW_BYTES // 4) + half * 32 + pos + 1] = w[1]

    @cute.jit
    def _pages(self, mPageTable, b, key0, end, page_div, pages):
        """Page and slot of each chunk's first key (``min(chunk start, end - 1)``) of the block at
        ``key0``: a 16-key chunk never straddles a page, so one division a chunk places all its
        keys (a division or remainder by the run-time page size costs ~20 instructions;
        ``page_div``: the page size, or its ``FastDivmodDivisorV2`` with ``fast_page_divmod``)."""
        for c in cutlass.range_constexpr(self.chunks):
            key = cutlass.min(key0 + c * CHUNK, end - 1)
            if const_expr(self.fast_page_divmod):
                idx, slot = divmod(key, page_div)
                pages[c] = mPageTable[b, idx]
                pages[self.chunks + c] = slot
            else:
                idx = key // page_div
                pages[c] = mPageTable[b, idx]
                pages[self.chunks + c] = key - idx * page_div

    @cute.jit
    def _issue(self, stage, src, kv_head, key0, end, pages, lane, quad, qi):
        """cp.async of the block at ``key0`` into the ring stage at shared address ``stage``: per
        chunk the K slices of keys ``quad``, ``quad + 8`` and the V slices of keys ``2qi, 2qi+1,
        2qi+8, 2qi+9`` that lane ``(quad, qi)`` reads (each copied by that lane where slices are 16
        bytes or more, and V's also at 4-8 bytes where a block is one chunk (``v_lane_copies``);
        else as 16-byte pieces of rows: ``k_piece``, ``v_piece``); lanes 0-7 copy the chunk's two
        rows of 16 scales.
        Keys past ``end`` read the last key (their scores are masked, their scales finite)."""
        mKData, mVData, mKScale, mVScale = src
        kw, vw, kp, vp = self.k_words, self.v_words, self.k_piece, self.v_piece
        for c in cutlass.range_constexpr(self.chunks):
            base = key0 + c * CHUNK
            page, first = pages[c], cutlass.min(base, end - 1)
            slot0 = pages[self.chunks + c] - first  # + a key of this chunk = its slot
            if const_expr(self.kb == 3):
                self._issue_rows3(self._row3_at(stage, c, 0), mKData, kv_head, base, end, page, slot0, lane)
            elif const_expr(kp == 16):
                for r in cutlass.range_constexpr(2):
                    slot = slot0 + cutlass.min(base + quad + 8 * r, end - 1)
                    g = cute.domain_offset((page, slot, kv_head, qi * kw * 4), mKData).iterator.toint()
                    for pc in cutlass.range_constexpr(4 * kw // kp):
                        _async_copy(g + pc * kp, self._k_at(stage, c, r, pc, lane))
            else:  # a lane's slices are 4 or 8 bytes: 16-byte pieces of the rows (``k_piece``)
                for j in cutlass.range_constexpr(-(-CHUNK * kw // 32)):
                    u = lane + 32 * j
                    if u < CHUNK * kw:
                        key, m, at = k_piece(u, kw)
                        slot = slot0 + cutlass.min(base + key, end - 1)
                        g = cute.domain_offset((page, slot, kv_head, m * 16), mKData).iterator.toint()
                        _async_copy(g, self._k_at(stage, c, key // 8, 0, at))
            if const_expr(self.vb == 3):
                self._issue_rows3(self._row3_at(stage + self.k_bytes, c, 0), mVData, kv_head, base, end, page,
                                  slot0, lane)
            elif const_expr(self.v_lane_copies):  # 16-byte slices, or one chunk a block
                for t in cutlass.range_constexpr(4):
                    slot = slot0 + cutlass.min(base + v_key(qi, t), end - 1)
                    g = cute.domain_offset((page, slot, kv_head, quad * vw * 4), mVData).iterator.toint()
                    for pc in cutlass.range_constexpr(4 * vw // vp):
                        _async_copy(g + pc * vp, self._v_at(stage, c, t, pc, lane), vp)
            else:  # 16-byte pieces of the rows (``v_piece``)
                for j in cutlass.range_constexpr(vw):
                    t, key, m, at = v_piece(lane + 32 * j, vw)
                    slot = slot0 + cutlass.min(base + key, end - 1)
                    g = cute.domain_offset((page, slot, kv_head, m * 16), mVData).iterator.toint()
                    _async_copy(g, self._v_at(stage, c, t, 0, at))
            row = slot0 + _scale_row_key(base, end)
            for side in cutlass.range_constexpr(2):
                mS = (mKScale, mVScale)[side]
                pieces = mS.element_type.width // 8  # 16 scales: 2 or 4 pieces of 16 bytes
                if lane // 4 == side and lane % 4 < pieces:
                    gs = cute.domain_offset((page, kv_head, row), mS).iterator.toint()
                    _async_copy(gs + lane % 4 * 16, self._scales_at(stage, c, side) + lane % 4 * 16)

    @cute.jit
    def _issue_rows3(self, region, mData, kv_head, base, end, page, slot0, lane):
        """A chunk's 16 rows of 3-bit codes as they are, row-major at shared address ``region``:
        48 pieces of 16 bytes (three a row), lanes 0-31 then lanes 0-15."""
        for j in cutlass.range_constexpr(2):
            u = lane + 32 * j
            if u < CHUNK * ROW3_BYTES // 16:
                key = u // 3
                slot = slot0 + cutlass.min(base + key, end - 1)
                g = cute.domain_offset((page, slot, kv_head, (u - 3 * key) * 16), mData).iterator.toint()
                _async_copy(g, region + u * 16)

    @cute.jit
    def _block(self, stage, src, qw, acc, ml, tables, key0, end, seqlen, first_row, scale_log2, lane, quad, qi, bf16):
        d, C, NT = self.d, self.chunks, self.tiles
        kw, vw, kp, vp = self.k_words, self.v_words, self.k_piece, self.v_piece
        dt = "bfloat16" if bf16 else "float16"
        # this lane's bytes and its keys' scales, from its ring stage
        ck = cute.make_rmem_tensor((C * 2 * kw,), Uint32)
        cv = cute.make_rmem_tensor((C * 4 * (2 if const_expr(self.vb == 3) else vw),), Uint32)
        cs = cute.make_rmem_tensor((C * 4,), Float32)
        v3_word, v3_byte = v3_slice_at(quad)
        v3_sel = tuple(Uint32(x) for x in v3_selectors(v3_byte))
        for c in cutlass.range_constexpr(C):
            for r in cutlass.range_constexpr(2):
                if const_expr(self.kb == 3):  # three words at 12 qi of the row
                    for w in cutlass.range_constexpr(kw):
                        _shared_words(self._row3_at(stage, c, quad + 8 * r) + 4 * (qi * kw + w), ck,
                                      (2 * c + r) * kw + w, 1)
                else:
                    for pc in cutlass.range_constexpr(4 * kw // kp):
                        _shared_words(self._k_at(stage, c, r, pc, lane), ck, (2 * c + r) * kw + pc * kp // 4, kp // 4)
            for t in cutlass.range_constexpr(4):
                if const_expr(self.vb == 3):  # the two words holding the 6 bytes at 6 quad
                    at = self._row3_at(stage + self.k_bytes, c, v_key(qi, t)) + 4 * v3_word
                    for w in cutlass.range_constexpr(2):
                        _shared_words(at + 4 * w, cv, (4 * c + t) * 2 + w, 1)
                else:
                    for pc in cutlass.range_constexpr(4 * vw // vp):
                        _shared_words(self._v_at(stage, c, t, pc, self._v_reader_slot(lane, quad, qi)), cv,
                                      (4 * c + t) * vw + pc * vp // 4, vp // 4)
            base = key0 + c * CHUNK
            row0 = _scale_row_key(base, end)
            for side in cutlass.range_constexpr(2):
                dtype = src[2 + side].element_type
                row = cute.make_tensor(cute.make_ptr(dtype, self._scales_at(stage, c, side), cute.AddressSpace.smem,
                                                     assumed_align=16), cute.make_layout((CHUNK,)))
                for r in cutlass.range_constexpr(2):
                    cs[4 * c + 2 * side + r] = Float32(row[cutlass.min(base + quad + 8 * r, end - 1) - row0])
        ktab = lambda w, i: _table_row(*tables[self.k_table], w, i, self.kb)
        vtab = lambda w, i: _table_row(*tables[self.v_table], w, i, self.vb)
        word3 = lambda off: _table_word(tables[(3, False)][0], off)  # 3-bit: one word a pair of codes

        # Scores: s[si(c, r, n, h)] = key quad + 8r of chunk c, row 8n + 2qi + h, in the log2 domain.
        si = lambda c, r, n, h: ((2 * c + r) * NT + n) * 2 + h
        s = cute.make_rmem_tensor((C * 4 * NT,), Float32)
        for c in cutlass.range_constexpr(C):
            kdec = [[], []]
            if const_expr(self.paired_2bit_lookups and self.kb == 2):  # both keys at once
                for w in cutlass.range_constexpr(kw):
                    kx, ky = decode_key_pairs2(ck[2 * c * kw + w], ck[(2 * c + 1) * kw + w], ktab)
                    kdec[0] += kx
                    kdec[1] += ky
            else:
                for r in cutlass.range_constexpr(2):
                    if const_expr(self.kb == 3):
                        kdec[r] = decode_pairs3([ck[(2 * c + r) * kw + w] for w in range(kw)], tables[(3, False)][1],
                                                word3, prmt)
                    else:
                        for w in cutlass.range_constexpr(kw):
                            kdec[r] += decode_pairs(ck[(2 * c + r) * kw + w], self.kb, dt, prmt, ktab)
            for n in cutlass.range_constexpr(NT):
                sc = [Float32(0.0)] * 4
                for kk in cutlass.range_constexpr(d // 16):
                    sc = mma_16816((kdec[0][2 * kk], kdec[1][2 * kk], kdec[0][2 * kk + 1], kdec[1][2 * kk + 1]),
                                   (qw[n * d // 8 + 2 * kk], qw[n * d // 8 + 2 * kk + 1]), sc, bf16)
                for r in cutlass.range_constexpr(2):
                    f = cs[4 * c + r] * scale_log2
                    for h in cutlass.range_constexpr(2):
                        s[si(c, r, n, h)] = sc[2 * r + h] * f
        # Masks: keys past the split (and past the sequence), and bottom-right causal rows.
        last = end - 1
        if key0 + self.block - 1 > (last - (self.seqlen_q - 1) if const_expr(self.causal) else last):
            for c in cutlass.range_constexpr(C):
                for r in cutlass.range_constexpr(2):
                    key = key0 + c * CHUNK + quad + 8 * r
                    for n in cutlass.range_constexpr(NT):
                        for h in cutlass.range_constexpr(2):
                            lim = last
                            if const_expr(self.causal):
                                qrow = first_row + ROWS * n + 2 * qi + h
                                lim = cutlass.min(last, seqlen - self.seqlen_q + qrow // self.group)
                            if key > lim:
                                s[si(c, r, n, h)] = -Float32.inf

        # Online softmax over the block (rows 8n + 2qi + h; the 8 lanes of a column share them).
        p = cute.make_rmem_tensor((C * 4 * NT,), Float32)
        for n in cutlass.range_constexpr(NT):
            for h in cutlass.range_constexpr(2):
                mx = ml[2 * n + h]
                for c in cutlass.range_constexpr(C):
                    for r in cutlass.range_constexpr(2):
                        mx = fa_utils.fmax(mx, s[si(c, r, n, h)])
                for off in (4, 8, 16):
                    mx = fa_utils.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=off))
                base = Float32(0.0) if mx == -Float32.inf else mx
                alpha = cute.math.exp2(ml[2 * n + h] - base, fastmath=True)
                ml[2 * n + h] = mx
                total = Float32(0.0)
                for c in cutlass.range_constexpr(C):
                    for r in cutlass.range_constexpr(2):
                        e = cute.math.exp2(s[si(c, r, n, h)] - base, fastmath=True)
                        p[si(c, r, n, h)] = e
                        total += e
                ml[2 * NT + 2 * n + h] = ml[2 * NT + 2 * n + h] * alpha + total
                # Two n-tiles rescale only where the max moved: 3-4% faster at 16 rows; at 8 rows
                # the branch measured 1-2% slower than rescaling always.
                if const_expr(NT > 1):
                    if alpha != Float32(1.0):
                        _rescale_row(acc, n, h, alpha, d)
                else:
                    _rescale_row(acc, n, h, alpha, d)

        # O^T += V^T (sigma_v P)^T, per chunk: each V fragment feeds the NT n-tiles' MMAs.
        for c in cutlass.range_constexpr(C):
            bfr = []
            for n in cutlass.range_constexpr(NT):
                for r in cutlass.range_constexpr(2):
                    f = cs[4 * c + 2 + r]
                    bfr.append(transpose_8x8(pack_x2(p[si(c, r, n, 0)] * f, p[si(c, r, n, 1)] * f, bf16)))
            vdec = [[], []]  # key pairs (2qi, 2qi+1) and (2qi+8, 2qi+9): dims 2j, 2j+1 alternate
            for pr in cutlass.range_constexpr(2):
                if const_expr(self.vb == 3):
                    key = lambda t: (cv[(4 * c + t) * 2], cv[(4 * c + t) * 2 + 1])
                    vdec[pr] = decode_key_pairs3(key(2 * pr), key(2 * pr + 1), v3_sel, tables[(3, False)][1], word3,
                                                 prmt)
                elif const_expr(self.paired_2bit_lookups and self.vb == 2):
                    for w in cutlass.range_constexpr(vw):
                        vdec[pr] += decode_value_pairs2(cv[(4 * c + 2 * pr) * vw + w], cv[(4 * c + 2 * pr + 1) * vw + w],
                                                        vtab)
                else:
                    for w in cutlass.range_constexpr(vw):
                        x = cv[(4 * c + 2 * pr) * vw + w]
                        y = cv[(4 * c + 2 * pr + 1) * vw + w]
                        even, odd = interleave_codes(x, y, self.vb)
                        ev = decode_pairs(even, self.vb, dt, prmt, vtab)
                        od = decode_pairs(odd, self.vb, dt, prmt, vtab)
                        for i in cutlass.range_constexpr(len(ev)):
                            vdec[pr] += [ev[i], od[i]]
            for j in cutlass.range_constexpr(d // 16):
                for n in cutlass.range_constexpr(NT):
                    o = mma_16816((vdec[0][2 * j], vdec[0][2 * j + 1], vdec[1][2 * j], vdec[1][2 * j + 1]),
                                  (bfr[2 * n], bfr[2 * n + 1]), tuple(acc[j, n, t] for t in range(4)), bf16)
                    for t in cutlass.range_constexpr(4):
                        acc[j, n, t] = o[t]

    # ------------------------------------------------------------------------- merge, store
    @cute.jit
    def _merge(self, sO, sML, acc, ml, warp, quad, qi):
        """Each warp's unnormalised output, row max and row sum into shared memory."""
        d, NT = self.d, self.tiles
        for n in cutlass.range_constexpr(NT):
            for h in cutlass.range_constexpr(2):
                total = ml[2 * NT + 2 * n + h]
                for off in (4, 8, 16):
                    total += cute.arch.shuffle_sync_bfly(total, offset=off)
                if quad == 0:
                    sML[warp, ROWS * n + 2 * qi + h, 0] = ml[2 * n + h]
                    sML[warp, ROWS * n + 2 * qi + h, 1] = total
            for j in cutlass.range_constexpr(d // 16):
                for t in cutlass.range_constexpr(4):
                    sO[warp, ROWS * n + 2 * qi + t % 2, v_dim(d, j, quad + 8 * (t // 2))] = acc[j, n, t]

    @cute.jit
    def _epilogue(self, sO, sML, mO, mLSE, mOut, mLseOut, mSigns, splits, split, b, kv_head, first_row, warp, lane):
        """Merge the warps' rows, un-rotate them (V's R^T: the butterflies, then the signs and
        1/sqrt(d)) and write the split's output and LSE (empty split: 0, -inf): the partials, or,
        combining in the kernel at one split, the output itself. Half a warp a row, ``d/16``
        consecutive dims a lane, as in ``_rotate_query``."""
        per, part, W = self.d // 16, lane % 16, self.warps
        for rr in cutlass.range_constexpr(-(-self.cta_rows // (2 * W))):
            row = (warp + W * rr) * 2 + lane // 16
            if row < self.cta_rows:  # both halves of a warp alike: the butterflies shuffle
                mx = sML[0, row, 0]
                for w in cutlass.range_constexpr(1, W):
                    mx = fa_utils.fmax(mx, sML[w, row, 0])
                base = Float32(0.0) if mx == -Float32.inf else mx
                total = Float32(0.0)
                o = cute.make_rmem_tensor((per,), Float32)
                o.fill(0.0)
                for w in cutlass.range_constexpr(W):
                    f = cute.math.exp2(sML[w, row, 0] - base, fastmath=True)
                    total += sML[w, row, 1] * f
                    for j in cutlass.range_constexpr(per):
                        o[j] += sO[w, row, part * per + j] * f
                inv = Float32(1.0) / total if total > Float32(0.0) else Float32(0.0)
                for j in cutlass.range_constexpr(per):
                    o[j] = o[j] * inv
                butterflies(o, per, part, 16)
                if first_row + row < self.rows:
                    i, g = (first_row + row) // self.group, (first_row + row) % self.group
                    head = kv_head * self.group + g
                    if const_expr(self.combine_in_kernel):
                        if splits == 1:
                            self._store_output(o, base, total, mOut, mLseOut, mSigns, b, i, head, part)
                        else:
                            self._store_partial(o, base, total, mO, mLSE, mSigns, split, b, i, head, part)
                    else:
                        self._store_partial(o, base, total, mO, mLSE, mSigns, split, b, i, head, part)

    @cute.jit
    def _store_partial(self, o, base, total, mO, mLSE, mSigns, split, b, i, head, part):
        """A lane's slice of a row's split partial (un-rotated: the signs and 1/sqrt(d)) and its LSE."""
        d, per = self.d, self.d // 16
        for j in cutlass.range_constexpr(per):
            mO[split, b, i, head, part * per + j] = o[j] * mSigns[part * per + j] * Float32(d ** -0.5)
        if part == 0:
            mLSE[split, b, head, i] = _row_lse(base, total)

    @cute.jit
    def _store_output(self, o, base, total, mOut, mLseOut, mSigns, b, i, head, part):
        """The same slice as the output itself, in its dtype (one split: what the combine's cast of
        the partial gives, bit for bit), one vector store a lane."""
        d, per = self.d, self.d // 16
        res = cute.make_rmem_tensor((per,), mOut.element_type)
        for j in cutlass.range_constexpr(per):
            res[j] = (o[j] * mSigns[part * per + j] * Float32(d ** -0.5)).to(mOut.element_type)
        dst = cute.domain_offset((b, i, head, part * per), mOut).iterator.toint()
        dst = cute.make_ptr(mOut.element_type, dst, cute.AddressSpace.gmem, assumed_align=2 * per)
        cute.autovec_copy(res, cute.make_tensor(dst, cute.make_layout((per,))))
        if part == 0:
            mLseOut[b, head, i] = _row_lse(base, total)

    @cute.jit
    def _combine_if_last(self, mO, mLSE, mOut, mLseOut, mTickets, sTicket, splits, b, head_group, kv_head, first_row,
                         tidx, warp, lane):
        """The split combine, by the CTA of this (sequence, KV head and row group) that finishes last:
        each CTA takes a ticket (an atomic add on its counter) once its partials are written and
        fenced; the one that draws ``splits - 1`` knows every partial is visible, merges its rows
        as ``kernels/combine.py`` would (``merge_row``, the same bits) and puts the counter back to
        0 for the next launch. This saves the combine's launch and its wait on this kernel."""
        cute.arch.fence_acq_rel_gpu()  # this thread's partials, before the CTA's ticket
        cute.arch.sync_threads()
        counter = b * cute.arch.grid_dim()[0] + head_group
        if tidx == 0:
            sTicket[0] = cute.arch.atomic_add(mTickets.iterator + counter, Int32(1), sem="acq_rel", scope="gpu")
        cute.arch.sync_threads()
        if sTicket[0] == splits - 1:
            cute.arch.fence_acq_rel_gpu()  # the other CTAs' partials, for every thread's loads
            W = self.warps
            for rr in cutlass.range_constexpr(-(-self.cta_rows // W)):
                row = warp + W * rr
                if row < self.cta_rows and first_row + row < self.rows:  # warp-uniform
                    i, g = (first_row + row) // self.group, (first_row + row) % self.group
                    merge_row(mO, mLSE, mOut, mLseOut, b, i, kv_head * self.group + g, lane, self.d // 32,
                              SplitCombine.unroll)
            if tidx == 0:
                mTickets[counter] = Int32(0)


@cute.jit
def _row_lse(base, total):
    """A row's natural-log LSE from its max (log2 domain, 0 for an empty row) and its sum."""
    return ((base + cute.math.log2(total, fastmath=True)) * Float32(math.log(2.0))
            if total > Float32(0.0) else -Float32.inf)


@cute.jit
def _rescale_row(acc, n: cutlass.Constexpr[int], h: cutlass.Constexpr[int], alpha, d: cutlass.Constexpr[int]):
    """The O^T accumulators of row ``8n + 2qi + h`` (both of its m-tile halves) times ``alpha``."""
    for j in cutlass.range_constexpr(d // 16):
        acc[j, n, h] = acc[j, n, h] * alpha
        acc[j, n, 2 + h] = acc[j, n, 2 + h] * alpha


# ----------------------------------------------------------------------------- memory helpers
@cute.jit
def _table_row(table, lane_off, codes, i: cutlass.Constexpr[int], bits: cutlass.Constexpr[int]):
    """This lane's words of the table row that byte ``i`` of ``codes`` names (``table``: the
    tables' shared address, warp-uniform; ``lane_off``: ``lane_offset``): two words at 2 bits (one
    64-bit load), one otherwise. One ``prmt`` and the load (ptxas adds a uniform base in the
    load), where a shift, a mask and an add made the offset of a 128-byte row."""
    w = cute.make_rmem_tensor((2,), Uint32)
    n = 2 if bits == 2 else 1
    _shared_words(table + Int32(table_offset(codes, i, lane_off, prmt)), w, 0, n)
    return (w[0], w[1]) if const_expr(n == 2) else (w[0],)


@cute.jit
def _table_word(table, off):
    """The word at byte offset ``off`` (``pair_offsets``) of the tables at shared address ``table``."""
    w = cute.make_rmem_tensor((1,), Uint32)
    _shared_words(table + Int32(off), w, 0, 1)
    return w[0]


def _scale_row_key(base, end):
    """The first key of the 16 scales a chunk starting at ``base`` copies: its own, or, for a
    chunk wholly past ``end``, those of the chunk holding key ``end - 1``."""
    return cutlass.min(base, (end - 1) // CHUNK * CHUNK)


@cute.jit
def _async_copy(gaddr, saddr, nbytes: cutlass.Constexpr[int] = 16):
    """cp.async of ``nbytes`` (16, 8 or 4) from global to shared memory, by address: a 16-byte
    copy bypasses L1 (``cp.async.cg``), an 8- or 4-byte one allocates there."""
    src = cute.make_ptr(cutlass.Uint8, gaddr, cute.AddressSpace.gmem, assumed_align=nbytes)
    dst = cute.make_ptr(cutlass.Uint8, saddr, cute.AddressSpace.smem, assumed_align=nbytes)
    copy_part_async(src, cute.make_tensor(dst, cute.make_layout((nbytes,))), nbytes, nbytes)


@cute.jit
def _shared_words(saddr, dst: cute.Tensor, off: cutlass.Constexpr[int], words: cutlass.Constexpr[int]):
    """``words`` 32-bit words at shared address ``saddr`` (one vector load) into ``dst[off:]``."""
    src = cute.make_ptr(Uint32, saddr, cute.AddressSpace.smem, assumed_align=4 * words)
    cute.autovec_copy(cute.make_tensor(src, cute.make_layout((words,))), cute.local_tile(dst, (words,), (off // words,)))
