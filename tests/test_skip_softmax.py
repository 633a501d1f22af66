"""The skip-softmax oracle (fa4_tq.skip_softmax): no skip at threshold 0, and with a threshold
the output and LSE stay inside the bound computed from the blocks it skipped. In the data every
head has dominant keys just before the new tokens (so the middle blocks are skippable), and half
the heads of each group also have keys in the first block that weigh a few percent: a vote by
any row instead of every row would skip that block and break the bound."""

import pytest
import torch

from fa4_tq import attention_reference
from fa4_tq.skip_softmax import skip_softmax_attention
from helpers import ragged_paged_cache, rel_err

D, H, HK, PAGE, TILE = 64, 8, 2, 16, 32
LENS = [300, 200, 97]


def _problem(seqlen_q, seed=0):
    gen = torch.Generator().manual_seed(seed)
    group = H // HK
    u = torch.nn.functional.normalize(torch.randn(HK, 2, D, generator=gen), dim=-1)
    q = 0.3 * torch.randn(len(LENS), seqlen_q, H, D, generator=gen)
    for h in range(H):
        q[:, :, h] += 10 * u[h // group, (h % group) // (group // 2)]
    raw = []
    for n in LENS:
        k, v = 0.3 * torch.randn(n, HK, D, generator=gen), torch.randn(n, HK, D, generator=gen)
        for hk in range(HK):
            k[n - seqlen_q - 3:n - seqlen_q, hk] += 10 * (u[hk, 0] + u[hk, 1])  # seen by every query
            k[:3, hk] += 8 * u[hk, 1]  # exp(-2.5) of the top score, for half the heads
        raw.append((k, v))
    (kp, vp), table, used, _ = ragged_paged_cache(LENS, PAGE, HK, D, gen, k_bits=8, v_bits=4, raw=raw)
    return q.to(torch.bfloat16), kp, vp, table, used, raw


@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_threshold_zero_skips_nothing(seqlen_q):
    q, kp, vp, table, used, _ = _problem(seqlen_q)
    out, lse, st = skip_softmax_attention(q, kp, vp, table, used, threshold=0.0, tile_n=TILE)
    ref, ref_lse = attention_reference(q, kp, vp, page_table=table, seqused_k=used, causal=True, dtype=torch.float64)
    assert int(st.skipped.sum()) == 0 and int(st.blocks.sum()) == HK * sum(-(-n // TILE) for n in LENS)
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("threshold", [1e-4, 1e-3, 1e-2])
def test_skipped_blocks_stay_inside_the_bound(seqlen_q, threshold):
    q, kp, vp, table, used, _ = _problem(seqlen_q)
    out, lse, st = skip_softmax_attention(q, kp, vp, table, used, threshold=threshold, tile_n=TILE)
    ref, ref_lse = attention_reference(q, kp, vp, page_table=table, seqused_k=used, causal=True, dtype=torch.float64)
    assert int(st.skipped.sum()) > 0, "the data are built to make blocks skippable"
    group = H // HK
    vmax = vp.decompress().double().norm(dim=-1).amax(dim=(0, 1))  # [kv_heads]: over every cached V
    bound_out = 2 * st.eps * vmax * (1 + 1e-9) + 1e-12  # + float64 rounding (online vs dense)
    err = (out - ref).norm(dim=-1)  # [batch, seqlen_q, heads]
    per_head = bound_out.repeat_interleave(group, 1).unsqueeze(1)
    assert bool((err <= per_head).all()), (err.amax().item(), per_head.amin().item())
    lse_bound = -torch.log1p(-st.eps.clamp_max(0.999)).repeat_interleave(group, 1).unsqueeze(-1) + 1e-12
    assert bool(((ref_lse - lse).abs() <= lse_bound).all())
    assert bool((lse <= ref_lse + 1e-12).all())  # skipping only drops mass
    print(f"threshold {threshold} q{seqlen_q}: skipped {int(st.skipped.sum())}/{int(st.blocks.sum())} "
          f"max err {err.amax():.2e}")


def test_oracle_rejects_what_it_does_not_model():
    q, kp, vp, table, used, _ = _problem(1)
    with pytest.raises(ValueError, match="threshold"):
        skip_softmax_attention(q, kp, vp, table, used, threshold=1.5)
    with pytest.raises(ValueError, match="one 128-row"):
        skip_softmax_attention(torch.zeros(3, 33, H, D, dtype=torch.bfloat16), kp, vp, table, used, threshold=0.1)


def test_scale_factor_is_a_per_sequence_threshold():
    """threshold_scale_factor = lambda * seqlen_k: the same skips as the per-sequence lambda, and
    eps <= factor * tile_n * ceil(n / tile_n) / n (about the factor at any length)."""
    q, kp, vp, table, used, _ = _problem(4)
    factor = 0.5
    out, lse, st = skip_softmax_attention(q, kp, vp, table, used, threshold_scale_factor=factor, tile_n=TILE)
    assert int(st.skipped.sum()) > 0
    for b, n in enumerate(LENS):
        o_b, l_b, st_b = skip_softmax_attention(q[b:b + 1], kp, vp, table[b:b + 1], used[b:b + 1],
                                                threshold=factor / n, tile_n=TILE)
        assert torch.equal(st_b.skipped[0], st.skipped[b])
        assert torch.equal(o_b[0], out[b]) and torch.equal(l_b[0], lse[b])
        assert bool((st.eps[b] <= factor * TILE * (-(-n // TILE)) / n + 1e-12).all())
    with pytest.raises(ValueError, match="exactly one"):
        skip_softmax_attention(q, kp, vp, table, used, threshold=0.1, threshold_scale_factor=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        skip_softmax_attention(q, kp, vp, table, used)
