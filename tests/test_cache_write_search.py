"""The cache-write kernel's codebook search (``kernels/cache_write.py``), modelled in Python by
``magnitude_index``: one bucket lookup and one compare must give ``torch.bucketize``'s code on
the codebook, for every width and head_dim, at every boundary, one float either side of it, at
both zeros and up to ``|u| = sqrt(d)``. The squared centroid it returns feeds the scale."""

import math
import struct

import pytest
import torch

from fa4_tq.codec.codebook import boundaries, centroids
from fa4_tq.kernels.cache_write import bucket_count, bucket_scale, magnitude_index, positive_boundaries


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _probe_values(bits: int, d: int) -> list[float]:
    """Each boundary and the floats next to it, both signs, zeros, bucket edges, random |u|."""
    vals = [0.0, -0.0, math.sqrt(d), -math.sqrt(d)]
    for b in positive_boundaries(bits):
        t = torch.tensor([b], dtype=torch.float32)
        for x in (t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)):
            vals += [float(x), -float(x)]
    s = bucket_scale(bits)
    vals += [q / s for q in range(int(math.sqrt(d) * s))]
    vals += torch.randn(2000, generator=torch.Generator().manual_seed(bits)).mul(2).tolist()
    return [v for v in vals if abs(v) <= math.sqrt(d)]


@pytest.mark.parametrize("d", [64, 128, 256, 512])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bucket_search_is_bucketize(bits, d):
    vals = _probe_values(bits, d)
    u = torch.tensor(vals, dtype=torch.float32)
    want = torch.bucketize(u, boundaries(bits, "cpu"))
    c2 = centroids(bits, "cpu").float() ** 2
    for x, w in zip(u.tolist(), want.tolist()):
        code, g2 = magnitude_index(_bits(x), bits, d)
        assert code == w, (bits, d, x, code, w)
        assert struct.unpack("<f", struct.pack("<I", g2))[0] == float(c2[w]), (bits, x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_buckets_hold_at_most_one_boundary(bits):
    s = bucket_scale(bits)
    q = [math.floor(b * s) for b in positive_boundaries(bits)]
    assert len(set(q)) == len(q)
    assert bucket_count(bits, 128) >= q[-1] + 2
    if bits < 8:  # every |u| <= sqrt(d) has its own bucket: the kernel does not clamp
        assert bucket_count(bits, 512) > math.sqrt(512) * s + 1
