"""The rotations on the tensor cores on the CPU: the lanes' fragments, assembled as the PTX ISA
lays out the ``mma.sync`` operands and multiplied, then the in-lane butterfly stages, give the
Walsh-Hadamard transform exactly (small integers): ``hadamard.rotate_mma`` (the cache write and
the fused query rotation, m16n8k16) at every row width, and ``fused_rotation.unrotate_acc`` (the
output un-rotation on the wgmma accumulator, m16n8k8 tf32) with its signs."""

import pytest
import torch

from fa4_tq.codec.rotation import _fwht
from fa4_tq.kernels.hadamard import (ONE_BITS, gram_diagonal_lane, h8_sign_bit, h16_fragment, mma_a_words,
                                     mma_c_values, tf32_a_values)


def _half(word: int, h: int, one: int) -> float:
    """The +-1 that half ``h`` of a B-fragment word encodes (bf16/fp16 bits of 1.0, sign bit)."""
    bits = word >> (16 * h) & 0xFFFF
    assert bits & 0x7FFF == one, hex(bits)
    return -1.0 if bits >> 15 else 1.0


def _lane_words(x: torch.Tensor) -> dict:
    """Lane (g, q)'s ``per / 2`` words of ``x`` (8 rows x 4 per, one warp): pairs (2w, 2w+1) of
    its values per*q .. per*q + per - 1 of row g."""
    per = x.shape[1] // 4
    return {(g, q): [(x[g, per * q + 2 * w].item(), x[g, per * q + 2 * w + 1].item()) for w in range(per // 2)]
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
    """``x`` (8 rows x 4 per, one warp) through the kernel's steps; returns what each lane holds,
    laid out as rows x columns (lane (g, q) holds row g, columns per*q .. per*q + per - 1)."""
    per = x.shape[1] // 4
    words = _lane_words(x)
    out = torch.zeros_like(x)
    f = {lane: [0.0] * per for lane in words}
    for t in range(per // 8):
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
        v = _butterfly_stages(torch.tensor(v, dtype=torch.float64), range(2, per.bit_length() - 1))
        out[g, per * q:per * q + per] = v
    return out


def _butterfly_stages(v: torch.Tensor, bits) -> torch.Tensor:
    """The butterflies over the given bits of the last index of ``v`` (unscaled)."""
    n = v.shape[-1]
    for b in bits:
        h = 1 << b
        v = v.reshape(*v.shape[:-1], n // (2 * h), 2, h)
        v = torch.stack((v[..., 0, :] + v[..., 1, :], v[..., 0, :] - v[..., 1, :]), dim=-2).reshape(*v.shape[:-3], n)
    return v


@pytest.mark.parametrize("d", [64, 128, 256])
def test_mma_rotation_is_the_hadamard_transform(d):
    gen = torch.Generator().manual_seed(d)
    x = torch.randint(-8, 9, (8, d), generator=gen).double()
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


def _unrotate_like_the_kernel(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x`` (16 rows x d, one warp's accumulator: lane (g, t) holds rows g, g+8 and columns
    8j + 2t + e) through ``unrotate_acc``'s steps, unscaled."""
    d = x.shape[1]
    x = _butterfly_stages(x, range(3, d.bit_length() - 1))  # 1. the bits of j, in each lane
    out = torch.zeros_like(x)
    rows = lambda g: (g, g + 8)
    for j in range(d // 8):
        a = torch.zeros(16, 8, dtype=torch.float64)  # m16n8k8 A: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
        b = torch.zeros(8, 8, dtype=torch.float64)  # B: b0 (k t, n g), b1 (k t+4, n g)
        for g in range(8):
            for t in range(4):
                regs = [x[rows(g)[r], 8 * j + 2 * t + e] for r, e in tf32_a_values()]
                a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4] = regs
                sg = s[8 * j + g]
                b[t, g] = (-1.0 if h8_sign_bit(2 * t, g) else 1.0) * sg
                b[t + 4, g] = (-1.0 if h8_sign_bit(2 * t + 1, g) else 1.0) * sg
        c = a @ b  # c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
        for g in range(8):
            for t in range(4):
                out[g, 8 * j + 2 * t:8 * j + 2 * t + 2] = c[g, 2 * t:2 * t + 2]
                out[g + 8, 8 * j + 2 * t:8 * j + 2 * t + 2] = c[g + 8, 2 * t:2 * t + 2]
    return out


@pytest.mark.parametrize("d", [64, 128])
def test_accumulator_unrotation_is_signs_times_hadamard(d):
    """``diag(s) H x`` per row: the in-lane stages, then the tf32 fragments with the signs in B
    (head_dim <= 128; at 256 the kernel shuffles instead)."""
    gen = torch.Generator().manual_seed(d + 1)
    x = torch.randint(-8, 9, (16, d), generator=gen).double()
    s = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
    assert torch.equal(_unrotate_like_the_kernel(x, s), _fwht(x) * s)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """The tensor core's view of a float32 operand: the low 13 mantissa bits ignored."""
    return (x.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def test_tf32_split_is_exact_to_2_pow_minus_20():
    """``mma_tf32_split``'s operand: the high part (low 13 bits cleared) plus the remainder, which
    the tensor core truncates in turn; one tf32 part alone is off by up to 2^-10."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 16, generator=gen) * torch.exp(4 * torch.randn(1 << 16, generator=gen))
    hi = _tf32(x)
    lo = x - hi  # exact in float32
    err = ((hi.double() + _tf32(lo).double()) - x.double()).abs() / x.double().abs()
    assert err.max() < 2.0 ** -20
    assert ((hi.double() - x.double()).abs() / x.double().abs()).max() > 2.0 ** -12
