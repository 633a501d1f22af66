"""The decode kernel's register layout on the CPU (kernels/decode.py): the code lookups (the
kernel's byte table, and the ``prmt`` register lookup it replaced) and the two-key interleave,
run on ints with the PTX byte permute's Python model, give the codebook values of the packed
codes in the order the MMA fragments need; the head-dim permutations cover every dim once."""

import struct

import pytest
import torch

from fa4_tq.codec import centroids, pack
from fa4_tq.kernels.decode import (TABLE_BYTES, TABLE_ROW_BYTES, byte_table, decode_pairs, interleave_codes, k_dim,
                                   k_piece, lane_offset, table_offset, v_dim, v_piece, v_slot)
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
    ``widths`` maps a row half to its bits; each half of row ``e`` holds ``byte_table``'s two
    words of ``e`` 16 times."""
    mem = [None] * (TABLE_BYTES // 4)
    for half, bits in widths.items():
        table = byte_table(bits, dtype)
        assert len(table) == 256 and all(len(row) == 2 for row in table)
        for e in range(256):
            for pos in range(32):
                mem[e * TABLE_ROW_BYTES // 4 + half * 32 + pos] = table[e][pos % 2]
    return mem


def _lookup(bits: int, dtype: str, path: str):
    """What ``decode_pairs`` looks bytes up in: the kernel's shared tables (K's width in the first
    half of a row, another width in the second), addressed as the kernel addresses them, by every
    lane of a warp in both halves; or nothing (the ``prmt`` register lookup, 2/4-bit only)."""
    if path == "registers":
        return None
    mem = _shared_tables({0: bits, 1: bits}, dtype)

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
