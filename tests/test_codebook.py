import pytest
import torch

from fa4_tq.codec import boundaries, centroids
from fa4_tq.codec.lloyd_max import lloyd_max_mse, lloyd_max_normal

# DESIGN section 1 / the TurboQuant paper: Lloyd-Max MSE of N(0,1).
KNOWN_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_literals_are_lloyd_max_rounded_to_bf16(bits):
    recomputed = lloyd_max_normal(bits).to(torch.bfloat16).to(torch.float32)
    assert torch.equal(centroids(bits), recomputed)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_mse_matches_published_values(bits):
    mse = lloyd_max_mse(centroids(bits).double())
    assert mse == pytest.approx(KNOWN_MSE[bits], rel=2e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_shape_order_symmetry_and_boundaries(bits):
    c = centroids(bits)
    assert c.shape == (1 << bits,) and c.dtype == torch.float32
    assert bool((c[1:] > c[:-1]).all())
    assert torch.equal(c, -c.flip(0))
    assert torch.equal(boundaries(bits), 0.5 * (c[1:] + c[:-1]))


def test_bad_bits():
    with pytest.raises(ValueError, match="bits=5"):
        centroids(5)
    with pytest.raises(TypeError, match="bits must be an int"):
        centroids(4.0)
