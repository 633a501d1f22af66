"""Host side of the kernels' load stage: the lookup tables and the staging plan (CPU only)."""

import pytest
import torch

from fa4_tq.codec import PackedKV, centroids
from fa4_tq.codec.packing import pack
from fa4_tq.kernels.staging import (
    StagingPlan, choose_staging, code_planes, decode_eight, decode_four, entry_pairs, lookup_table,
    planes_from_pairs, prmt_reference, table_floats, uses_shared_table,
)


def _decode_row(packed_row: bytes, bits: int, dtype: str, planes=None) -> list[int]:
    """The kernel's register decode of one packed row, on the CPU: 8 codes per ``bits`` bytes."""
    out = []
    for c in range(len(packed_row) // bits):
        chunk = int.from_bytes(packed_row[bits * c: bits * (c + 1)], "little")
        for h in range(2):
            for w in decode_four(chunk >> (4 * bits * h), bits, dtype, prmt_reference, planes):
                out += [w & 0xFFFF, w >> 16]
    return out


def _halves(word: int, dtype) -> torch.Tensor:
    """A 32-bit word as its two 16-bit floats (low half first), in float32."""
    raw = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return raw.view(dtype).float()


def _word(pair: torch.Tensor, dtype) -> int:
    lo, hi = (int(v) & 0xFFFF for v in pair.to(dtype).view(torch.int16))
    return lo | (hi << 16)


def _scaled_pair(g_word: int, sigma: float, dtype) -> int:
    """The kernel's ``fma_x2(g, s_hi, mul_x2(g, s_lo))`` on one entry pair, emulated in float32
    (each product of two 16-bit floats and the final sum are exact there, so one rounding)."""
    s = torch.tensor(sigma, dtype=torch.float32)
    s_hi = s.to(dtype).float()
    s_lo = (s - s_hi).to(dtype).float()
    g = _halves(g_word, dtype)
    return _word(g * s_hi + (g * s_lo).to(dtype).float(), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_register_decode_is_the_codebook(bits, dtype):
    """Every code at every position of the packed stream decodes to its centroid's 16-bit value
    (the selector arithmetic that turns packed codes into prmt nibbles, checked exhaustively)."""
    g = centroids(bits).to(getattr(torch, dtype)).view(torch.int16).to(torch.int64) & 0xFFFF
    n = 1 << bits
    idx = torch.stack([torch.arange(n).roll(s) for s in range(8)]).reshape(-1)  # each code in each slot
    idx = torch.cat([idx, torch.randint(0, n, (4096,), generator=torch.Generator().manual_seed(bits))])
    got = _decode_row(bytes(pack(idx.view(-1, 8), bits).reshape(-1).tolist()), bits, dtype)
    assert got == g[idx].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scaled_codebook_lookup_is_the_decompressed_value(bits, dtype):
    """A row's codes looked up in its scaled codebook (what the kernel does: scale the 2**bits
    entries once per row) give ``PackedKV.decompress_rotated(dtype)`` bit for bit, for every code
    and for sigmas of every magnitude, including 0 (rows past the end of the sequence)."""
    name = str(dtype).removeprefix("torch.")
    n, d = 1 << bits, 128
    gen = torch.Generator().manual_seed(10 + bits)
    sigmas = [0.0, 1.0, 3.0e-5, 7.25, 1234.5] + (torch.rand(11, generator=gen) * 40).tolist()
    idx = torch.stack([torch.arange(d) % n, torch.randint(0, n, (d,), generator=gen)])
    for sigma in sigmas:
        scales = torch.tensor([sigma, sigma], dtype=torch.float32)
        packed = PackedKV(data=pack(idx, bits), scales=scales, bits=bits, head_dim=d, seed=0)
        want = packed.decompress_rotated(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        planes = planes_from_pairs([_scaled_pair(w, sigma, dtype) for w in entry_pairs(bits, name)],
                                   prmt_reference)
        for r in range(2):
            row = bytes(packed.data[r].tolist())
            assert _decode_row(row, bits, name, planes) == want[r].tolist(), (bits, sigma)


def test_register_decode_ignores_higher_bits():
    for bits in (2, 3, 4):
        low = 0b0110_0100_0001_0011 & ((1 << 4 * bits) - 1)
        want = decode_four(low, bits, "bfloat16", prmt_reference)
        assert decode_four(low | (0xABCDEF << 4 * bits), bits, "bfloat16", prmt_reference) == want


def test_decode_eight_is_two_decode_fours():
    """The 4-bit word decode (selectors made once a word) against decode_four on each half, on
    every code in every position and on random words."""
    g = torch.Generator().manual_seed(3)
    words = [sum(c << (4 * i) for i in range(8)) for c in range(16)]
    words += [sum(((c + i) % 16) << (4 * i) for i in range(8)) for c in range(16)]
    words += torch.randint(0, 2 ** 32, (200,), generator=g, dtype=torch.int64).tolist()
    for dtype in ("bfloat16", "float16"):
        for w in words:
            want = [*decode_four(w, 4, dtype, prmt_reference), *decode_four(w >> 16, 4, dtype, prmt_reference)]
            assert decode_eight(w, dtype, prmt_reference) == want, hex(w)


def test_prmt_reference_follows_ptx():
    a, b = 0x33221100, 0x77665544
    assert prmt_reference(a, b, 0x3210) == a and prmt_reference(a, b, 0x7654) == b
    assert prmt_reference(a, b, 0x5140) == 0x55114400
    assert prmt_reference(0x80, 0, 0x0008) == 0x808080FF  # nibble bit 3: replicate the sign bit


def test_only_eight_bit_codes_use_a_shared_table():
    assert [b for b in (2, 3, 4, 8) if uses_shared_table(b)] == [8]
    assert table_floats(8) == 256 and table_floats(4) == 0
    assert torch.equal(lookup_table(8, "cpu"), centroids(8, "cpu"))
    with pytest.raises(ValueError, match="2/3/4-bit"):
        code_planes(8, "bfloat16")


@pytest.mark.parametrize("d,bits,tile_n", [(64, 3, 128), (128, 4, 128), (256, 8, 64), (128, 2, 128)])
def test_staging_plan_covers_each_row_once(d, bits, tile_n):
    plan = StagingPlan(tile_n, d, bits)
    assert plan.threads_per_row * plan.cols == d
    assert plan.part_bytes * plan.threads_per_row * 8 == d * bits
    assert plan.part_bytes % plan.copy_bytes == 0
    assert plan.stride >= plan.part_bytes and plan.stride % 16 == 0 and (plan.stride // 16) % 2 == 1


def test_staging_fits_or_says_why():
    assert choose_staging(128, 128, 128, 4, 4) == (2, True)
    assert choose_staging(128, 32, 256, 8, 8)[0] >= 1  # K8V8 at head_dim 256 needs tile_n 32
    with pytest.raises(ValueError, match="no staging ring fits"):
        choose_staging(128, 128, 256, 8, 8)
    with pytest.raises(ValueError, match="tile_n"):
        StagingPlan(96, 128, 4)
