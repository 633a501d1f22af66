"""The cache-write kernel's tensor-core rotation (``kernels/cache_write.py``), modelled in plain
PyTorch by ``mma_rotation_model``: the lanes' loads, the A/B fragments of ``mma.m16n8k16`` as the
PTX ISA lays them out, the MMAs and the accumulators' coordinates must give ``H (s * x)`` for
every row, in coordinate order. A wrong permutation of the matrix or of a fragment fails here."""

import math

import pytest
import torch

from fa4_tq.codec.rotation import rotate
from fa4_tq.kernels.cache_write import (input_coordinate, mma_rotation_model, mma_rotation_supported,
                                        output_coordinate, rotation_fragments)
from helpers import realistic_kv


@pytest.mark.parametrize("d", [64, 128])
def test_lane_coordinates_are_permutations(d):
    """Every input and output coordinate is held exactly once, and a lane's are contiguous."""
    ins = sorted(input_coordinate(d, t, k) for t in range(d // 16) for k in range(16))
    outs = sorted(output_coordinate(d, j, n) for j in range(d // 8) for n in range(8))
    assert ins == list(range(d)) and outs == list(range(d))
    for q in range(4):  # lane group q: words 2t, 2t + 1 of its chunk are k-tile t's
        held = [input_coordinate(d, t, 2 * q + c + 8 * e) for t in range(d // 16) for e in range(2) for c in range(2)]
        assert held == list(range(q * d // 4, (q + 1) * d // 4))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seed", [0, 12345])
def test_mma_model_is_the_rotation(d, seed):
    gen = torch.Generator().manual_seed(d + seed)
    for x in (torch.randn(16, d, generator=gen), realistic_kv((16, d), generator=gen)):
        x = x.bfloat16().double()
        want = rotate(x, seed) * math.sqrt(d)
        got = mma_rotation_model(x, seed)
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_fragments_shape_and_entries():
    frag = rotation_fragments(128, 3, torch.bfloat16)
    assert frag.shape == (16, 4, 32, 4) and frag.dtype == torch.int32
    halves = torch.stack([frag & 0xFFFF, (frag >> 16) & 0xFFFF], -1).to(torch.int16).view(torch.bfloat16)
    assert set(halves.float().unique().tolist()) == {-1.0, 1.0}
    h16 = rotation_fragments(128, 3, torch.float16)
    assert not torch.equal(frag, h16)  # +-1 has other bits in fp16


def test_mma_rotation_supported_shapes():
    assert mma_rotation_supported(128, (2, 3)) and mma_rotation_supported(128, (8, None))
    assert mma_rotation_supported(64, (4, 2)) and not mma_rotation_supported(64, (3, 4))
    assert not mma_rotation_supported(256, (4, 4)) and not mma_rotation_supported(512, (2, 2))
