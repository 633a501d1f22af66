"""The cache-write kernel's codebook search (``kernels/cache_write.py``), modelled in Python by
``code_of``: one bucket lookup and one float compare must give ``torch.bucketize``'s code on the
codebook, for every width and head_dim, at every boundary, one float either side of it, at both
zeros, at bucket edges and up to ``|u| = sqrt(d)``. The squared centroid it returns feeds the
scale. Also the sign-mask words the kernel stages with the table."""

import math
import struct

import pytest
import torch

from fa4_tq.codec.codebook import boundaries, centroids
from fa4_tq.kernels.cache_write import bucket_range, bucket_scale, code_of, signed_boundaries


def _probe_values(bits: int, d: int) -> list[float]:
    """Each boundary and the floats next to it, zeros, bucket edges of both signs, random u."""
    r = math.sqrt(d)
    vals = [0.0, -0.0, r, -r]
    for b in signed_boundaries(bits):
        t = torch.tensor([b], dtype=torch.float32)
        vals += [float(x) for x in (t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1))]
    s = bucket_scale(bits)
    for q in range(-int(r * s), int(r * s) + 1):
        t = torch.tensor([q / s], dtype=torch.float32)
        vals += [float(t), float(torch.nextafter(t, t - 1))]
    vals += torch.randn(2000, generator=torch.Generator().manual_seed(bits)).mul(2).tolist()
    if bits == 8:  # past the outermost boundaries: the clamped end buckets
        vals += [-r, r, -0.99 * r, 0.99 * r]
    return [v for v in vals if abs(v) <= r]


def test_boundaries_are_the_codebooks():
    for bits in (2, 3, 4, 8):
        assert signed_boundaries(bits) == boundaries(bits, "cpu").tolist()


@pytest.mark.parametrize("d", [64, 128, 256, 512])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bucket_search_is_bucketize(bits, d):
    vals = _probe_values(bits, d)
    u = torch.tensor(vals, dtype=torch.float32)
    want = torch.bucketize(u, boundaries(bits, "cpu"))
    c2 = centroids(bits, "cpu").float() ** 2
    for x, w in zip(u.tolist(), want.tolist()):
        code, g2 = code_of(x, bits, d)
        assert code == w, (bits, d, x, code, w)
        assert struct.unpack("<f", struct.pack("<I", g2))[0] == float(c2[w]), (bits, x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_buckets_hold_at_most_one_boundary(bits):
    s = bucket_scale(bits)
    q = [math.floor(b * s) for b in signed_boundaries(bits)]
    assert len(set(q)) == len(q)
    offset, n = bucket_range(bits, 128)
    assert q[0] + offset >= 0 and q[-1] + offset + 1 <= n - 1  # a boundary-free bucket above the last
    if bits < 8:  # every |u| <= sqrt(d) has its own bucket: the kernel does not clamp
        offset, n = bucket_range(bits, 512)
        assert math.floor(-math.sqrt(512) * s) + offset >= 0 and math.floor(math.sqrt(512) * s) + offset < n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sign_mask_words_flip_the_signs_of_pairs(dtype):
    """The kernel applies R's signs as an xor of ``sign_mask_words`` on each pair of input
    values (value 2i in the low 16 bits of word i): that must equal ``x * s``, exactly."""
    from fa4_tq.codec import sign_vector
    from fa4_tq.kernels.cache_write import constant_words, search_words, sign_mask_words, write_constants

    d = 128
    s = sign_vector(d, 3)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(dtype)
    masks = torch.tensor(sign_mask_words(s.tolist()), dtype=torch.int64)
    pairs = x.view(torch.int16).to(torch.int64) & 0xFFFF  # [d] 16-bit patterns
    words = pairs[0::2] | (pairs[1::2] << 16)
    flipped = words ^ masks
    lo, hi = flipped & 0xFFFF, flipped >> 16
    got = torch.stack([lo, hi], -1).reshape(d)
    got = torch.where(got >= 1 << 15, got - (1 << 16), got).to(torch.int16).view(dtype)
    assert torch.equal(got, x * s.to(dtype))
    consts = write_constants(4, d, s.tolist())
    assert consts.numel() == constant_words(4, d) and consts.numel() % 4 == 0
    as_int32 = torch.where(masks >= 1 << 31, masks - (1 << 32), masks).to(torch.int32)
    assert torch.equal(consts[len(search_words(4, d)):], as_int32)
