"""The split combine (``kernels/combine.py``): its PyTorch twin on the CPU, the kernel against it on
an SM90 GPU. Partials of empty splits (``lse_j = -inf``) hold NaN: they must not be read."""

import itertools
import math

import pytest
import torch

from fa4_tq.kernels.combine import combine_reference


def _partials(splits, batch, seqlen_q, heads, d, *, gen, device="cpu"):
    """Random float32 partials with some empty splits (NaN rows, lse -inf), one row with every
    split empty, and one split far below the others (weight ~0 but not 0)."""
    out_part = torch.randn(splits, batch, seqlen_q, heads, d, generator=gen)
    lse_part = 3 * torch.randn(splits, batch, heads, seqlen_q, generator=gen)
    empty = torch.rand(splits, batch, heads, seqlen_q, generator=gen) < 0.3
    empty[:, 0, 0, 0] = True  # a row without keys in any split
    if splits > 1:
        lse_part[1, -1, -1, -1] = -200.0
        empty[1, -1, -1, -1] = False
    lse_part[empty] = -math.inf
    out_part.permute(0, 1, 3, 2, 4)[empty] = float("nan")
    return out_part.to(device), lse_part.to(device)


def test_reference_weights_the_splits_and_skips_empty_ones():
    gen = torch.Generator().manual_seed(0)
    out_part, lse_part = _partials(3, 2, 2, 4, 64, gen=gen)
    out, lse = combine_reference(out_part, lse_part)
    assert torch.isfinite(out).all()
    assert (out[0, 0, 0] == 0).all() and lse[0, 0, 0] == -math.inf  # every split empty
    checked = 0
    for b, q, h in itertools.product(range(2), range(2), range(4)):
        ls = lse_part[:, b, h, q].double()
        keep = torch.isfinite(ls)
        if not keep.any():
            continue
        want_lse = torch.logsumexp(ls[keep], 0)
        want = sum(math.exp(ls[j] - want_lse) * out_part[j, b, q, h].double() for j in range(3) if keep[j])
        assert abs(lse[b, h, q].item() - want_lse.item()) < 1e-5
        torch.testing.assert_close(out[b, q, h].double(), want, rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked >= 10


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("splits", [1, 2, 5, 40, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("part_dtype", ["float32", "output"])
def test_combine_kernel_is_the_reference(d, splits, dtype, part_dtype):
    """Float32 partials (the decode kernel's) and partials in the output dtype (the packed-KV
    kernel's split launches), against the float64 reference of the same partials."""
    from fa4_tq.kernels.launch import split_combine

    gen = torch.Generator().manual_seed(splits * d)
    batch, seqlen_q, heads = 3, 2, 8
    out_part, lse_part = _partials(splits, batch, seqlen_q, heads, d, gen=gen, device="cuda")
    if part_dtype == "output":
        out_part = out_part.to(dtype)
    want, want_lse = combine_reference(out_part, lse_part)
    for pdl in (True, False):
        out = torch.full((batch, seqlen_q, heads, d), float("nan"), dtype=dtype, device="cuda")
        lse = torch.full((batch, heads, seqlen_q), float("nan"), device="cuda")
        split_combine(out_part, lse_part, out, lse, pdl=pdl)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "an empty split's NaN partial was read, or a row not written"
        err = (out.float() - want).abs().max().item()
        tol = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * want.abs().max().item()
        assert err <= tol, (err, tol)
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        fin = torch.isfinite(want_lse)
        assert (lse[fin] - want_lse[fin]).abs().max().item() < 1e-4
