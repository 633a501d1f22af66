"""The cache write's rotation on the tensor cores (``kernels/hadamard.rotate_128_mma``) on the CPU:
the lanes' fragments, assembled as the PTX ISA lays out ``mma.sync.m16n8k16`` operands and
multiplied, then the in-lane butterfly stages, give ``x @ H_128`` exactly (small integers)."""

import torch

from fa4_tq.codec.rotation import _fwht
from fa4_tq.kernels.hadamard import ONE_BITS, gram_diagonal_lane, h16_fragment, mma_a_words, mma_c_values


def _half(word: int, h: int, one: int) -> float:
    """The +-1 that half ``h`` of a B-fragment word encodes (bf16/fp16 bits of 1.0, sign bit)."""
    bits = word >> (16 * h) & 0xFFFF
    assert bits & 0x7FFF == one, hex(bits)
    return -1.0 if bits >> 15 else 1.0


def _lane_words(x: torch.Tensor) -> dict:
    """Lane (g, q)'s 16 words of ``x`` (8 rows x 128, one warp): pairs (2w, 2w+1) of its values
    32q .. 32q+31 of row g."""
    return {(g, q): [(x[g, 32 * q + 2 * w].item(), x[g, 32 * q + 2 * w + 1].item()) for w in range(16)]
            for g in range(8) for q in range(4)}


def _a_tile(words: dict, t: int) -> torch.Tensor:
    """The A operand (16 x 16, row-major) of m-tile ``t`` as the lanes' registers lay it out:
    a0 (row g, k 2q..), a1 (row g+8, k 2q..), a2 (row g, k 2q+8..), a3 (row g+8, k 2q+8..)."""
    a = torch.zeros(16, 16, dtype=torch.float64)
    for (g, q), w in words.items():
        regs = [w[i] for i in mma_a_words(t)]
        for r, (row, k) in enumerate(((g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8))):
            a[row, k], a[row, k + 1] = regs[r]
    return a


def _b_tile(pairs: dict) -> torch.Tensor:
    """The B operand (16 x 8, "col") from each lane (g, q)'s two registers as value pairs:
    b0 (k 2q, 2q+1; n g), b1 (k 2q+8, 2q+9; n g)."""
    b = torch.zeros(16, 8, dtype=torch.float64)
    for (g, q), (b0, b1) in pairs.items():
        b[2 * q:2 * q + 2, g] = torch.tensor(b0, dtype=torch.float64)
        b[2 * q + 8:2 * q + 10, g] = torch.tensor(b1, dtype=torch.float64)
    return b


def _rotate_like_the_kernel(x: torch.Tensor, one: int) -> torch.Tensor:
    """``x`` (8 rows x 128, one warp) through the kernel's steps; returns what each lane holds,
    laid out as rows x columns (lane (g, q) holds row g, columns 32q .. 32q+31)."""
    words = _lane_words(x)
    out = torch.zeros(8, 128, dtype=torch.float64)
    f = {lane: [0.0] * 32 for lane in words}
    for t in range(4):
        a = _a_tile(words, t)
        for j in range(2):
            b = _b_tile({(g, q): [(_half(w, 0, one), _half(w, 1, one)) for w in h16_fragment(j, g, q, one)]
                         for g in range(8) for q in range(4)})
            c = a @ b
            # C (16 x 8): c0 (row g, col 2q), c1 (row g, col 2q+1), c2 (row g+8, col 2q), c3 (row g+8, col 2q+1)
            for g in range(8):
                for q in range(4):
                    vals = (c[g, 2 * q], c[g, 2 * q + 1], c[g + 8, 2 * q], c[g + 8, 2 * q + 1])
                    for i, at in enumerate(mma_c_values(t, j)):
                        f[(g, q)][at] = vals[i].item()
    for (g, q), v in f.items():
        v = torch.tensor(v, dtype=torch.float64)
        for h in (4, 8, 16):  # butterflies(f, 32, 0, 1, first=4): the in-lane stages left
            v = v.reshape(-1, 2, h)
            v = torch.stack((v[:, 0] + v[:, 1], v[:, 0] - v[:, 1]), dim=1).reshape(32)
        out[g, 32 * q:32 * q + 32] = v
    return out


def test_mma_rotation_is_the_hadamard_transform():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (8, 128), generator=gen).double()
    want = _fwht(x)
    for bf16 in (True, False):
        got = _rotate_like_the_kernel(x, ONE_BITS[bf16])
        assert torch.equal(got, want)


def test_h16_fragments_are_the_factor_over_bits_0_1_5_6():
    """Entry (input e of lane q, output e' of lane q') = H_128 at columns 32q + e, 32q' + e'."""
    h = _fwht(torch.eye(128, dtype=torch.float64))
    one = ONE_BITS[True]
    for j in range(2):
        for g in range(8):
            for q in range(4):
                for h_word, word in enumerate(h16_fragment(j, g, q, one)):
                    for half in range(2):
                        e_in, e_out, q_out = 2 * h_word + half, (g & 1) + 2 * j, g >> 1
                        assert _half(word, half, one) == h[32 * q + e_in, 32 * q_out + e_out]


def test_gram_diagonal_is_the_row_norm():
    """``row_norm_sq_mma``: the products A (a0, a2)^T and A (a1, a3)^T of every m-tile, summed;
    row g's squared norm is read from ``gram_diagonal_lane(g)``."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 9, (8, 128), generator=gen).double()
    words = _lane_words(x)
    lo, hi = torch.zeros(16, 8, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for t in range(4):
        a = _a_tile(words, t)
        regs = {lane: [w[i] for i in mma_a_words(t)] for lane, w in words.items()}
        for acc, (r0, r1) in ((lo, (0, 2)), (hi, (1, 3))):
            acc += a @ _b_tile({lane: (r[r0], r[r1]) for lane, r in regs.items()})
    for g in range(8):
        lane, odd = gram_diagonal_lane(g)
        q = lane % 4
        assert lane // 4 == g
        # lane (g, q) holds lo/hi at (row g, cols 2q, 2q+1) as c0, c1 and (row g+8, ..) as c2, c3
        got = lo[g, 2 * q + odd] + hi[g + 8, 2 * q + odd]
        assert got == (x[g] ** 2).sum()
