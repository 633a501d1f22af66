"""The decode kernel's register layout on the CPU (kernels/decode.py): the code lookups (the
kernel's byte table, and the ``prmt`` register lookup it replaced) and the two-key interleave,
run on ints with the PTX byte permute's Python model, give the codebook values of the packed
codes in the order the MMA fragments need; the head-dim permutations cover every dim once."""

import struct

import pytest
import torch

from fa4_tq.codec import centroids, pack
from fa4_tq.kernels.decode import byte_table, decode_pairs, interleave_codes, k_dim, v_dim
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


def _lookup(bits: int, dtype: str, path: str):
    """What ``decode_pairs`` looks bytes up in: the kernel's byte table, or nothing (the ``prmt``
    register lookup, 2/4-bit only)."""
    if path == "registers":
        return None
    table = byte_table(bits, dtype)
    assert len(table) == 256 and all(len(row) == 2 for row in table)
    return lambda byte: table[byte]


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
