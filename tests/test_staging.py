"""Host side of the kernels' load stage: the lookup tables and the staging plan (CPU only)."""

import pytest
import torch

from fa4_tq.codec import centroids, compress
from fa4_tq.kernels.staging import StagingPlan, choose_staging, pair_table, table_floats


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_table_decodes_two_codes_per_lookup(bits):
    g = centroids(bits, "cpu")
    t = pair_table(bits, "cpu").view(-1, 2)
    assert t.shape[0] * 2 == table_floats(bits)
    lo, hi = torch.randint(0, 1 << bits, (2, 1000))
    assert torch.equal(t[lo | (hi << bits), 0], g[lo]) and torch.equal(t[lo | (hi << bits), 1], g[hi])


def test_pair_table_matches_packed_bytes():
    """A 4-bit byte is two codes, even coordinate in the low nibble: the byte *is* the pair index."""
    x = torch.randn(3, 128)
    p = compress(x, 4)
    pairs = pair_table(4, "cpu").view(-1, 2)[p.data.long()].reshape(3, 128)
    assert torch.equal(pairs, centroids(4, "cpu")[p.indices()])


def test_eight_bit_table_is_the_codebook():
    assert torch.equal(pair_table(8, "cpu"), centroids(8, "cpu"))


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
