"""The decode kernel's register layout on the CPU (kernels/decode.py): the code lookups (the
kernel's byte table, and the ``prmt`` register lookup it replaced) and the two-key interleave,
run on ints with the PTX byte permute's Python model, give the codebook values of the packed
codes in the order the MMA fragments need; the head-dim permutations cover every dim once."""

import struct

import pytest
import torch

from fa4_tq.codec import centroids, pack
from fa4_tq.kernels.decode import (ROW3_BYTES, TABLE_BYTES, TABLE_ROW_BYTES, byte_table, decode_key_pairs2,
                                   decode_key_pairs3, decode_pairs, decode_pairs3, decode_value_pairs2,
                                   interleave_codes, k_dim, k_piece, lane_offset, pair_offsets, table_offset,
                                   v3_selectors, v3_slice_at, v_dim, v_key, v_piece, v_slot)
from fa4_tq.kernels.staging import prmt_reference


def _bits16(x: float, dtype: str) -> int:
    """A codebook value's 16 bits in bf16 (the top of its float32 bits) or fp16."""
    if dtype == "bfloat16":
        return struct.unpack("<I", struct.pack("<f", x))[0] >> 16
    return int.from_bytes(struct.pack("<e", x), "little")


def _words(codes: torch.Tensor, bits: int) -> list[int]:
    """Codes packed as the cache stores them (format v1), read as little-endian 32-bit words."""
    raw = pack(codes, bits).tolist()
    return [int.from_bytes(bytes(raw[i:i + 4]), "little") for i in range(0, len(raw), 4)]


def _shared_tables(widths: dict, dtype: str) -> list[int]:
    """The kernel's shared tables as words, filled as ``PackedDecode._fill_table`` fills them:
    ``widths`` maps a row half to its bits (or its table kind, ``(bits, crossed)``); each half of
    row ``e`` holds ``byte_table``'s two words of ``e`` 16 times."""
    mem = [None] * (TABLE_BYTES // 4)
    for half, kind in widths.items():
        bits, crossed = kind if isinstance(kind, tuple) else (kind, False)
        table = byte_table(bits, dtype, crossed)
        assert len(table) == 256 and all(len(row) == 2 for row in table)
        for e in range(256):
            for pos in range(32):
                mem[e * TABLE_ROW_BYTES // 4 + half * 32 + pos] = table[e][pos % 2]
    return mem


def _lookup(bits: int, dtype: str, path: str, crossed: bool = False):
    """What ``decode_pairs`` looks bytes up in: the kernel's shared tables (K's width in the first
    half of a row, another width in the second), addressed as the kernel addresses them, by every
    lane of a warp in both halves; or nothing (the ``prmt`` register lookup, 2/4-bit only).
    ``crossed``: the 2-bit table of ``decode_value_pairs2``."""
    if path == "registers":
        return None
    mem = _shared_tables({0: (bits, crossed), 1: (bits, crossed)}, dtype)

    def lookup(w, i):
        seen = set()
        for half in (0, 1):
            for lane in range(32):
                at = table_offset(w, i, lane_offset(half, bits, lane), prmt_reference)
                assert at % (8 if bits == 2 else 4) == 0 and at < TABLE_BYTES
                seen.add((mem[at // 4], mem[at // 4 + 1]) if bits == 2 else (mem[at // 4],) * 2)
        assert len(seen) == 1, seen
        return seen.pop()
    return lookup


def _halves(w: int) -> tuple[int, int]:
    return w & 0xFFFF, w >> 16


LOOKUPS = [(2, "table"), (4, "table"), (8, "table"), (2, "registers"), (4, "registers")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits,path", LOOKUPS)
def test_one_key_decodes_to_consecutive_pairs(bits, dtype, path):
    """K side: a lane's slice of one key -> words holding dims (2i, 2i+1)."""
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (32,), generator=gen)
    vals = centroids(bits).float().tolist()
    out = []
    for w in _words(codes, bits):
        out += decode_pairs(w, bits, dtype, prmt_reference, _lookup(bits, dtype, path))
    assert len(out) == 16
    for i, w in enumerate(out):
        assert _halves(w) == (_bits16(vals[codes[2 * i]], dtype), _bits16(vals[codes[2 * i + 1]], dtype)), i


@pytest.mark.parametrize("bits,path", LOOKUPS)
def test_two_keys_interleave_into_pairs_of_one_dim(bits, path):
    """V side: two keys' slices -> words holding (key x, key y) of one dim, dims in order, as the
    kernel lists them (even stream's pair i, then odd stream's pair i)."""
    gen = torch.Generator().manual_seed(10 + bits)
    cx, cy = (torch.randint(0, 1 << bits, (32,), generator=gen) for _ in range(2))
    vals = centroids(bits).float().tolist()
    out = []
    for x, y in zip(_words(cx, bits), _words(cy, bits)):
        even, odd = interleave_codes(x, y, bits)
        ev = decode_pairs(even, bits, "bfloat16", prmt_reference, _lookup(bits, "bfloat16", path))
        od = decode_pairs(odd, bits, "bfloat16", prmt_reference, _lookup(bits, "bfloat16", path))
        for a, b in zip(ev, od):
            out += [a, b]
    assert len(out) == 32
    for dim, w in enumerate(out):
        assert _halves(w) == (_bits16(vals[cx[dim]], "bfloat16"), _bits16(vals[cy[dim]], "bfloat16")), dim


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paired_2bit_key_lookups_give_each_fragment_register_pair(dtype):
    """``paired_2bit_lookups``, K side: the codes of keys quad and quad + 8 (one word each, 16
    codes) nibble-interleaved, then one 64-bit lookup a byte, give the same decoded words as each
    key's own lookups (``decode_pairs``), word ``k`` of each key = codes ``2k``, ``2k + 1``; and each
    lookup returns word ``k`` of both keys, the fragment's ``(a0, a1)`` (even ``k``) or ``(a2, a3)``."""
    gen = torch.Generator().manual_seed(22)
    vals = centroids(2).float().tolist()
    for _ in range(20):
        cx, cy = (torch.randint(0, 4, (16,), generator=gen) for _ in range(2))
        (x,), (y,) = _words(cx, 2), _words(cy, 2)
        calls = []
        table = _lookup(2, dtype, "table")

        def lookup(w, i):
            calls.append(table(w, i))
            return calls[-1]
        kx, ky = decode_key_pairs2(x, y, lookup)
        assert kx == decode_pairs(x, 2, dtype, prmt_reference, table)
        assert ky == decode_pairs(y, 2, dtype, prmt_reference, table)
        for k in range(8):
            assert _halves(kx[k]) == (_bits16(vals[cx[2 * k]], dtype), _bits16(vals[cx[2 * k + 1]], dtype))
            assert _halves(ky[k]) == (_bits16(vals[cy[2 * k]], dtype), _bits16(vals[cy[2 * k + 1]], dtype))
        assert sorted(calls) == sorted((kx[k], ky[k]) for k in range(8))  # one key x word, one key y word


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paired_2bit_value_lookups_give_each_fragment_register_pair(dtype):
    """``paired_2bit_lookups``, V side: two keys' words (16 dims) nibble-interleaved and looked up
    in the crossed table give the words the plain path gives (word ``m``: dim ``m`` of key x, then
    of key y), each 64-bit lookup returning dims ``2j`` and ``2j + 1``, an ``(a0, a1)`` pair."""
    gen = torch.Generator().manual_seed(23)
    vals = centroids(2).float().tolist()
    crossed = _lookup(2, dtype, "table", crossed=True)
    plain = _lookup(2, dtype, "table")
    for _ in range(20):
        cx, cy = (torch.randint(0, 4, (16,), generator=gen) for _ in range(2))
        (x,), (y,) = _words(cx, 2), _words(cy, 2)
        calls = []

        def lookup(w, i):
            calls.append(crossed(w, i))
            return calls[-1]
        out = decode_value_pairs2(x, y, lookup)
        even, odd = interleave_codes(x, y, 2)
        ev, od = (decode_pairs(w, 2, dtype, prmt_reference, plain) for w in (even, odd))
        assert out == [w for pair in zip(ev, od) for w in pair]
        for dim, w in enumerate(out):
            assert _halves(w) == (_bits16(vals[cx[dim]], dtype), _bits16(vals[cy[dim]], dtype)), dim
        assert sorted(calls) == sorted((out[2 * j], out[2 * j + 1]) for j in range(8))


@pytest.mark.parametrize("d", [64, 128])
def test_head_dim_permutations_are_bijections(d):
    ks = sorted(k_dim(d, kk, pos, pos // 2 % 4) for kk in range(d // 16) for pos in range(16))
    vs = sorted(v_dim(d, j, m) for j in range(d // 16) for m in range(16))
    assert ks == list(range(d)) and vs == list(range(d))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_warps_table_lookups_hit_distinct_banks_in_their_own_half(bits):
    """32 lanes looking up 32 random bytes load from 32 different banks (2-bit: each half warp's
    16 64-bit loads from 32 different banks), inside their half of the row the byte names."""
    gen = torch.Generator().manual_seed(bits)
    for half in (0, 1):
        for _ in range(20):
            words = torch.randint(0, 1 << 32, (32,), generator=gen, dtype=torch.int64).tolist()
            i = int(torch.randint(0, 4, (1,), generator=gen))
            at = [table_offset(words[lane], i, lane_offset(half, bits, lane), prmt_reference) for lane in range(32)]
            for lane in range(32):
                row = (words[lane] >> (8 * i)) & 0xFF
                start = row * TABLE_ROW_BYTES + half * TABLE_ROW_BYTES // 2
                assert start <= at[lane] < start + TABLE_ROW_BYTES // 2
            if bits == 2:
                for group in (at[:16], at[16:]):
                    assert len({a // 4 % 32 for a in group} | {(a // 4 + 1) % 32 for a in group}) == 32
            else:
                assert len({a // 4 % 32 for a in at}) == 32


@pytest.mark.parametrize("d,bits", [(128, 2), (128, 4), (128, 8), (64, 2), (64, 4), (64, 8)])
def test_ring_pieces_land_where_each_lane_reads_its_slices(d, bits):
    """One chunk's 16 K and V rows (random bytes) copied into a model of the ring stage as the
    kernel copies them (16-byte pieces, ``k_piece``/``v_piece``, where a lane's slice is shorter;
    else each lane its own slices), then read back as lane ``(quad, qi)`` reads: every lane gets
    the slices of its keys (K: keys quad, quad + 8, dims of qi; V: keys 2qi, 2qi+1, 2qi+8, 2qi+9,
    dims of quad), every piece is 16-byte aligned, and a warp's V reads hit distinct banks (8-byte
    reads: within each half warp). (2-bit V at head_dim 64, 2 bytes a lane, is not supported.)"""
    gen = torch.Generator().manual_seed(d + bits)
    kw, vw = d // 4 * bits // 32, d // 8 * bits // 32
    v_bytes = 32 * vw if vw else 0
    k_rows = torch.randint(0, 256, (16, 16 * kw), generator=gen).tolist()
    v_rows = torch.randint(0, 256, (16, v_bytes), generator=gen).tolist()
    ring_k = [[None] * (32 * 4 * kw) for _ in range(2)]  # rows r: 32 slices of 4 kw bytes
    ring_v = [[None] * (32 * 4 * vw) for _ in range(4)]  # rows t
    if 4 * kw < 16:
        for u in range(16 * kw):
            key, m, at = k_piece(u, kw)
            assert at * 4 * kw % 16 == 0
            ring_k[key // 8][at * 4 * kw:at * 4 * kw + 16] = k_rows[key][16 * m:16 * m + 16]
    else:
        for lane in range(32):
            for r in range(2):
                quad, qi = lane // 4, lane % 4
                ring_k[r][4 * kw * lane:4 * kw * (lane + 1)] = k_rows[quad + 8 * r][4 * kw * qi:4 * kw * (qi + 1)]
    if 0 < 4 * vw < 16:
        for u in range(32 * vw):
            t, key, m, at = v_piece(u, vw)
            assert at * 4 * vw % 16 == 0
            ring_v[t][at * 4 * vw:at * 4 * vw + 16] = v_rows[key][16 * m:16 * m + 16]
    else:
        for lane in range(32):
            for t in range(4):
                quad, qi = lane // 4, lane % 4
                key = 2 * qi + t % 2 + 8 * (t // 2)
                ring_v[t][4 * vw * lane:4 * vw * (lane + 1)] = v_rows[key][4 * vw * quad:4 * vw * (quad + 1)]
    for lane in range(32):
        quad, qi = lane // 4, lane % 4
        for r in range(2):
            assert ring_k[r][4 * kw * lane:4 * kw * (lane + 1)] == k_rows[quad + 8 * r][4 * kw * qi:4 * kw * (qi + 1)]
        at = v_slot(quad, qi, vw) if vw else None
        for t in range(4 if vw else 0):
            key = 2 * qi + t % 2 + 8 * (t // 2)
            assert ring_v[t][4 * vw * at:4 * vw * (at + 1)] == v_rows[key][4 * vw * quad:4 * vw * (quad + 1)]
    if not vw:
        return
    slots = [v_slot(lane // 4, lane % 4, vw) for lane in range(32)]
    assert sorted(slots) == list(range(32))
    if vw == 2:  # 64-bit reads: bank conflicts count within a half warp
        for half in (slots[:16], slots[16:]):
            assert len({(2 * s + w) % 32 for s in half for w in (0, 1)}) == 32


# ----------------------------------------------------------------------------- 3-bit codes
def _decode3(dtype: str, half: int, decode, *args) -> list:
    """``decode`` (``decode_pairs3`` or ``decode_key_pairs3``) run by every lane of a warp on the
    same codes, looking up the tables filled as the kernel fills them (3-bit in row half
    ``half``), each lane at its own ``lane_offset``: the words, checked equal across the lanes."""
    mem = _shared_tables({half: 3}, dtype)

    def word_at(at):
        assert at % 4 == 0 and at < TABLE_BYTES
        return mem[at // 4]
    outs = {tuple(decode(*args, lane_offset(half, 3, lane), word_at, prmt_reference)) for lane in range(32)}
    assert len(outs) == 1
    return list(outs.pop())


def _row_words(raw: list, at: int, n: int) -> list[int]:
    return [int.from_bytes(bytes(raw[at + 4 * i:at + 4 * i + 4]), "little") for i in range(n)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("half", [0, 1])
def test_3bit_key_slices_decode_to_consecutive_pairs(dtype, half):
    """K side, 3-bit at head_dim 128: lane qi's three words at 12 qi of a packed row -> 16 words
    holding dims (2i, 2i+1) of its slice, pairs 5 and 10 straddling two words included."""
    gen = torch.Generator().manual_seed(30 + half)
    vals = centroids(3).float().tolist()
    for _ in range(8):
        codes = torch.randint(0, 8, (128,), generator=gen)
        raw = pack(codes, 3).tolist()
        assert len(raw) == ROW3_BYTES
        for qi in range(4):
            out = _decode3(dtype, half, decode_pairs3, _row_words(raw, 12 * qi, 3))
            assert len(out) == 16
            for i, w in enumerate(out):
                dim = 32 * qi + 2 * i
                assert _halves(w) == (_bits16(vals[codes[dim]], dtype), _bits16(vals[codes[dim + 1]], dtype)), (qi, i)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_3bit_value_slices_of_two_keys_interleave_into_pairs_of_one_dim(dtype):
    """V side, 3-bit at head_dim 128: lane ``quad`` reads the two words ``v3_slice_at`` names in
    each of two keys' rows; ``decode_key_pairs3`` cuts its 16 codes out (``v3_selectors``),
    pairs the keys and looks them up: 16 words, dims ``16 quad + k`` in order, key x in the low
    half. Every quad, many random rows."""
    gen = torch.Generator().manual_seed(33)
    vals = centroids(3).float().tolist()
    for _ in range(8):
        cx, cy = (torch.randint(0, 8, (128,), generator=gen) for _ in range(2))
        rx, ry = pack(cx, 3).tolist(), pack(cy, 3).tolist()
        for quad in range(8):
            word, byte = v3_slice_at(quad)
            assert 4 * word + byte == 6 * quad and 4 * word + 8 <= ROW3_BYTES
            out = _decode3(dtype, 1, decode_key_pairs3, _row_words(rx, 4 * word, 2), _row_words(ry, 4 * word, 2),
                           v3_selectors(byte))
            assert len(out) == 16
            for k, w in enumerate(out):
                dim = 16 * quad + k
                assert _halves(w) == (_bits16(vals[cx[dim]], dtype), _bits16(vals[cy[dim]], dtype)), (quad, k)


def test_3bit_pair_offsets_name_each_pair_and_a_lanes_word():
    """Every pair of a three-word stream, at every bit position (pairs 5 and 10 straddle two
    words): its ``prmt`` offset lands in a table row congruent to the pair's six bits mod 64 (rows
    repeat every 64), at the lane's word; a stream of one word (a V group) likewise for its four."""
    gen = torch.Generator().manual_seed(34)
    for _ in range(64):
        words = [int(x) for x in torch.randint(0, 2**32, (3,), generator=gen, dtype=torch.int64)]
        stream = words[0] | words[1] << 32 | words[2] << 64
        for lane_off in (0, 4 * 31, 128 + 4 * 7):
            offs = pair_offsets(words, 16, lane_off, prmt_reference)
            assert [o % TABLE_ROW_BYTES for o in offs] == [lane_off] * 16
            assert [o // TABLE_ROW_BYTES % 64 for o in offs] == [stream >> 6 * p & 63 for p in range(16)]
            assert all(o < TABLE_BYTES for o in offs)
            one = pair_offsets([words[0] & 0xFFFFFF], 4, lane_off, prmt_reference)
            assert [o // TABLE_ROW_BYTES % 64 for o in one] == [words[0] >> 6 * p & 63 for p in range(4)]


def test_3bit_ring_reads_hit_banks_evenly():
    """The 3-bit rows sit row-major in the ring (48 bytes a row). A warp's K reads (lane
    ``(quad, qi)``: word ``w`` of key ``quad + 8r`` at ``12 qi``) hit 32 distinct banks; its V reads
    (word ``w`` of ``v3_slice_at(quad)`` of key ``v_key(qi, t)``) at most two lanes a bank."""
    for r in range(2):
        for w in range(3):
            banks = [((lane // 4 + 8 * r) * ROW3_BYTES // 4 + 3 * (lane % 4) + w) % 32 for lane in range(32)]
            assert len(set(banks)) == 32
    for t in range(4):
        for w in range(2):
            banks = [(v_key(lane % 4, t) * ROW3_BYTES // 4 + v3_slice_at(lane // 4)[0] + w) % 32 for lane in range(32)]
            assert max(banks.count(b) for b in banks) <= 2
