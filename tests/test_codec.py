import hashlib
import math

import pytest
import torch

import fa4_tq
from fa4_tq.codec import (
    PackedKV, centroids, compress, hadamard, pack, rotate, rotate_rounded, row_bytes, sign_vector, unpack,
    unrotate, unrotate_rounded,
)
from fa4_tq.codec.lloyd_max import lloyd_max_mse
from helpers import realistic_kv

LLOYD_MAX = {b: lloyd_max_mse(centroids(b).double()) for b in (2, 3, 4, 8)}


def _rel_mse(x, xh):
    return float(((x.double() - xh.double()) ** 2).sum() / (x.double() ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_gaussian_near_lloyd_max(bits):
    g = torch.Generator().manual_seed(100 + bits)
    x = torch.randn(20_000, 128, generator=g)
    mse = _rel_mse(x, compress(x, bits).decompress())
    # Upper bound is the spec; the lower one catches a codec that stops quantising.
    assert 0.85 * LLOYD_MAX[bits] <= mse <= 1.1 * LLOYD_MAX[bits]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_heavy_tailed_keys(bits):
    g = torch.Generator().manual_seed(200 + bits)
    x = realistic_kv((20_000, 128), generator=g)
    mse = _rel_mse(x, compress(x, bits, seed=7).decompress())
    assert mse <= 1.1 * LLOYD_MAX[bits]
    assert mse >= 0.5 * LLOYD_MAX[bits]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for d in (64, 128, 256, 512):
        idx = torch.randint(0, 1 << bits, (3, 5, d), generator=g)
        packed = pack(idx, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5, row_bytes(d, bits))
        assert torch.equal(unpack(packed, bits, d), idx)


def test_packing_is_little_endian_as_documented():
    idx = torch.arange(8)
    assert pack(idx % 4, 2).tolist() == [0b11100100, 0b11100100]
    assert pack(idx, 4).tolist() == [0x10, 0x32, 0x54, 0x76]  # even coordinate in the low nibble
    word = sum(i << (3 * i) for i in range(8))  # b=3: 8 indices -> 24-bit little-endian
    assert pack(idx, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack(idx * 31, 8).tolist() == [i * 31 for i in range(8)]


@pytest.mark.parametrize("d", [64, 128, 256, 512])
def test_rotation_is_orthogonal_and_inverts(d):
    r = hadamard(d, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, d, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(x, 3), 3), x, atol=1e-12)
    assert torch.allclose(rotate(x, 3), x @ r.T, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_rounded_rotation_is_the_float32_rotation_rounded_once(d, dtype):
    """The one-matmul rotation the attention paths use equals the butterfly one rounded to the
    dtype (the float32 sums differ only in order: allow a rare 1-ulp difference), for strided
    inputs too."""
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 40, 2 * d, generator=gen) * 4).to(dtype)[..., ::2]  # non-contiguous
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    for fast, slow in ((rotate_rounded, rotate), (unrotate_rounded, unrotate)):
        got, want = fast(x, 7), slow(x, 7)
        assert got.shape == x.shape and got.dtype == dtype
        # one rounding of a float32 value that differs only in its last bits: within an ulp
        assert ((got.float() - want).abs() <= ulp * want.abs() + 1e-6).all()
        assert (got == want.to(dtype)).float().mean() > 0.99
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        rotate_rounded(x.float(), 7)


def test_sign_vector_is_specified():
    # splitmix64(seed << 32 | i) top bit -> -1 (docs/FORMAT.md); pinned so the format cannot drift.
    s = sign_vector(16, 0)
    assert s.tolist() == GOLDEN_SIGNS_SEED0
    assert not torch.equal(sign_vector(64, 0), sign_vector(64, 1))


def test_determinism_and_seed():
    x = torch.randn(2, 33, 2, 128)
    a, b, c = compress(x, 4, seed=5), compress(x, 4, seed=5), compress(x, 4, seed=6)
    assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
    assert not torch.equal(a.data, c.data)


def _golden_input():
    t = torch.arange(2 * 3 * 2 * 128, dtype=torch.float64).reshape(2, 3, 2, 128)
    return (torch.sin(t * 0.37) * (1 + (t % 7)) + 0.01 * t).to(torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_format_v1_bytes_are_pinned(bits):
    p = compress(_golden_input(), bits, seed=11)
    h = hashlib.sha256(p.data.numpy().tobytes() + p.scales.contiguous().numpy().tobytes())
    assert h.hexdigest()[:16] == GOLDEN_HASHES[bits]


@pytest.mark.parametrize("scale_dtype, tol", [(torch.float16, 2.0**-11), (torch.float32, 2.0**-23)])
def test_norms_preserved_up_to_scale_rounding(scale_dtype, tol):
    x = realistic_kv((500, 4, 128))
    for bits in (2, 3, 4, 8):
        xh = compress(x, bits, scale_dtype=scale_dtype).decompress(torch.float64)
        n, nh = x.double().norm(dim=-1), xh.norm(dim=-1)
        assert float(((nh - n) / n).abs().max()) <= tol + 4e-7


def test_layout_of_scales_and_data():
    x = torch.randn(2, 13, 3, 64)
    p = compress(x, 3)
    assert p.data.shape == (2, 13, 3, 24) and p.data.is_contiguous()
    assert p.scales.shape == (2, 3, 13) and p.scales.stride(-1) == 1
    assert all((s * 2) % 16 == 0 for s in p.scales.stride()[:-1])  # token dim padded to 16 B
    assert p.shape == x.shape and p.bits == 3 and p.head_dim == 64
    assert p.nbytes == 2 * 13 * 3 * 24 + 2 * 13 * 3 * 2
    assert compress(torch.randn(128), 4).scales.shape == ()
    assert compress(torch.randn(7, 128), 4).scales.shape == (7,)


def test_decompress_rotated_is_table_lookup_times_scale():
    x = torch.randn(5, 2, 128)
    p = compress(x, 4, seed=2)
    g = centroids(4)
    expect = g[p.indices()] * p.scales.transpose(-1, -2).float().unsqueeze(-1)
    assert torch.equal(p.decompress_rotated(), expect)
    assert torch.allclose(p.decompress(), unrotate(expect, 2))
    # attention is invariant: q.k == (Rq).(Rk_hat) with the packed vector
    q = torch.randn(128)
    assert torch.allclose(p.rotate_query(q) @ p.decompress_rotated()[0, 0], q @ p.decompress()[0, 0], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_sixteen_bit_decode_is_the_rounded_product(dtype, scale_dtype):
    """The kernels' split-sigma multiply + FMA (twinned by decompress_rotated) equals the float32
    product rounded once but for rare double roundings (>99%), and is never off by more than an ulp.
    Rounding sigma itself to bf16 (the cheaper single multiply) fails this."""
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 3
    for bits in (2, 4, 8):
        p = compress(x, bits, scale_dtype=scale_dtype)
        got, exact = p.decompress_rotated(dtype), p.decompress_rotated(torch.float32)
        assert (got == exact.to(dtype)).float().mean() > 0.99  # sigma-to-bf16 gives ~0.75
        ulp = torch.finfo(dtype).eps * exact.abs()
        assert ((got.float() - exact).abs() <= ulp).all()


def test_zero_vector_compresses_to_zero():
    x = torch.zeros(3, 128)
    assert torch.equal(compress(x, 2).decompress(), x)


def test_scale_overflow_is_a_clear_error():
    x = torch.full((2, 128), 70_000.0)  # RMS 7e4 > float16 max 65504
    with pytest.raises(ValueError, match="scale_dtype=torch.float32"):
        compress(x, 4)
    p = compress(x, 4, scale_dtype=torch.float32)
    xh = p.decompress(torch.float64)
    assert float(xh.norm(dim=-1).sub(x.double().norm(dim=-1)).abs().max()) / float(x.norm(dim=-1)[0]) < 1e-6
    assert _rel_mse(x, xh) < 2 * LLOYD_MAX[4]


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim=96"):
        compress(torch.randn(4, 96), 4)
    with pytest.raises(ValueError, match="bits=5"):
        compress(torch.randn(4, 128), 5)
    with pytest.raises(TypeError, match="bfloat16, float16, float32"):
        compress(torch.ones(4, 128, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="inf or NaN"):
        compress(torch.full((4, 128), math.nan), 4)
    with pytest.raises(TypeError, match="scale_dtype"):
        compress(torch.randn(4, 128), 4, scale_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        compress([1.0] * 128, 4)
    with pytest.raises(ValueError, match="seed"):
        compress(torch.randn(4, 128), 4, seed=-1)


def test_packedkv_constructor_checks_consistency():
    p = compress(torch.randn(2, 8, 2, 128), 4)
    with pytest.raises(ValueError, match="format v2"):
        PackedKV(p.data, p.scales, 4, 128, version=2)
    with pytest.raises(ValueError, match="64 bytes"):
        PackedKV(p.data[..., :32], p.scales, 4, 128)
    with pytest.raises(ValueError, match="heads before tokens"):
        PackedKV(p.data, p.scales.transpose(-1, -2), 4, 128)
    with pytest.raises(TypeError, match="uint8"):
        PackedKV(p.data.to(torch.int8), p.scales, 4, 128)


def test_public_names():
    for name in ("compress", "PackedKV", "flash_attn_func", "flash_attn_varlen_func", "PagedKVCache"):
        assert hasattr(fa4_tq, name)


GOLDEN_SIGNS_SEED0 = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0]
# sha256 prefixes of (data bytes + scale bytes) of _golden_input() at seed 11: format v1, pinned.
GOLDEN_HASHES = {2: '73848ef000eba3af', 3: 'e1176fb11e8441b5', 4: '37d676187bcd3a16', 8: 'd82501bff40ccb35'}
