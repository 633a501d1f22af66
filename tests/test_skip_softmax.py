"""The skip-softmax oracle (fa4_tq.skip_softmax): no skip at threshold 0, and with a threshold
the output and LSE stay inside the bound computed from the blocks it skipped. In the data every
head has dominant keys just before the new tokens (so the middle blocks are skippable), and half
the heads of each group also have keys in the first block that weigh a few percent: a vote by
any row instead of every row would skip that block and break the bound."""

import pytest
import torch

from fa4_tq import attention_reference
from fa4_tq.skip_softmax import skip_softmax_attention
from helpers import greedy_accept_lengths, ragged_paged_cache, rel_err

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


def _check_bound(out, lse, st, ref, ref_lse, vp, seqlen_q, rows_per_vote=64):
    """||out - dense|| <= 2 eps max||v|| per row, 0 <= lse_dense - lse <= -log(1 - eps)."""
    group = H // HK
    vmax = vp.decompress().double().norm(dim=-1).amax(dim=(0, 1))  # [kv_heads]: over every cached V
    eps = st.row_eps(seqlen_q, group, rows_per_vote)  # [batch, seqlen_q, heads]
    bound_out = 2 * eps * vmax.repeat_interleave(group) * (1 + 1e-9) + 1e-12  # + float64 rounding
    err = (out - ref).norm(dim=-1)  # [batch, seqlen_q, heads]
    assert bool((err <= bound_out).all()), (err.amax().item(), bound_out.amin().item())
    lse_bound = -torch.log1p(-eps.clamp_max(0.999)).transpose(1, 2) + 1e-12
    assert bool(((ref_lse - lse).abs() <= lse_bound).all())
    assert bool((lse <= ref_lse + 1e-12).all())  # skipping only drops mass
    return err


@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("threshold", [1e-4, 1e-3, 1e-2])
def test_skipped_blocks_stay_inside_the_bound(seqlen_q, threshold):
    q, kp, vp, table, used, _ = _problem(seqlen_q)
    out, lse, st = skip_softmax_attention(q, kp, vp, table, used, threshold=threshold, tile_n=TILE)
    ref, ref_lse = attention_reference(q, kp, vp, page_table=table, seqused_k=used, causal=True, dtype=torch.float64)
    assert int(st.skipped.sum()) > 0, "the data are built to make blocks skippable"
    assert st.skipped.shape == (len(LENS), HK, 1)  # seqlen_q x 4 rows: one vote group of 64
    err = _check_bound(out, lse, st, ref, ref_lse, vp, seqlen_q)
    print(f"threshold {threshold} q{seqlen_q}: skipped {int(st.skipped.sum())}/{int(st.blocks.sum())} "
          f"max err {err.amax():.2e}")


@pytest.mark.parametrize("rows_per_vote", [1, 2, 64])
def test_vote_groups_vote_apart(rows_per_vote):
    """Groups of rows_per_vote packed rows vote on their own (the kernel: one per consumer
    warpgroup). Half the heads of a KV group (rows 0-1 and 2-3 of each token) see the first
    block with a few percent of their weight: groups of 2 rows keep it for those rows only,
    groups of 1 or 2 skip at least as often as one group, and the bound holds per row."""
    q, kp, vp, table, used, _ = _problem(4)
    out, lse, st = skip_softmax_attention(q, kp, vp, table, used, threshold=1e-2, tile_n=TILE,
                                          rows_per_vote=rows_per_vote)
    ref, ref_lse = attention_reference(q, kp, vp, page_table=table, seqused_k=used, causal=True, dtype=torch.float64)
    assert st.skipped.shape == (len(LENS), HK, -(-4 * (H // HK) // rows_per_vote))
    _check_bound(out, lse, st, ref, ref_lse, vp, 4, rows_per_vote)
    _, _, one = skip_softmax_attention(q, kp, vp, table, used, threshold=1e-2, tile_n=TILE)
    mean_skipped = st.skipped.double().mean(-1)  # per (sequence, KV head), over its groups
    assert bool((mean_skipped >= one.skipped[..., 0]).all())
    if rows_per_vote < 64:
        assert bool((mean_skipped > one.skipped[..., 0]).any())


def test_oracle_rejects_what_it_does_not_model():
    q, kp, vp, table, used, _ = _problem(1)
    with pytest.raises(ValueError, match="threshold"):
        skip_softmax_attention(q, kp, vp, table, used, threshold=1.5)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        skip_softmax_attention(q, kp, vp, table, used, threshold=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="rows_per_vote"):
        skip_softmax_attention(q, kp, vp, table, used, threshold=0.1, rows_per_vote=0)


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
    o_t, l_t, st_t = skip_softmax_attention(q, kp, vp, table, used, tile_n=TILE,
                                            threshold=torch.tensor([factor / n for n in LENS], dtype=torch.float64))
    assert torch.equal(st_t.skipped, st.skipped) and torch.equal(o_t, out) and torch.equal(l_t, lse)
    with pytest.raises(ValueError, match="exactly one"):
        skip_softmax_attention(q, kp, vp, table, used, threshold=0.1, threshold_scale_factor=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        skip_softmax_attention(q, kp, vp, table, used)


@pytest.mark.parametrize("seqlen_q", [4, 8])
def test_greedy_decisions_hold_at_the_default_threshold(seqlen_q):
    """The documented default (lambda = SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR / seqlen_k) on
    verification batches with peaked attention, GQA 8, all 64 rows of a KV head in one vote: most
    blocks are skipped, and neither any position's greedy token nor any accept length changes."""
    from fa4_tq.decode import SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR
    from fa4_tq.skip_softmax import peaked_attention_inputs

    gen = torch.Generator().manual_seed(seqlen_q)
    lens, heads, kv_heads, d = [3000, 1200, 2500, 700], 32, 4, 64
    q, raw = peaked_attention_inputs(lens, seqlen_q, heads, kv_heads, d, generator=gen)
    (kp, vp), table, used, _ = ragged_paged_cache(lens, 64, kv_heads, d, gen, k_bits=4, v_bits=4, raw=raw)
    q = q.to(torch.bfloat16)
    out, _, st = skip_softmax_attention(q, kp, vp, table, used, tile_n=128,
                                        threshold_scale_factor=SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR)
    dense, _ = attention_reference(q, kp, vp, page_table=table, seqused_k=used, causal=True, dtype=torch.float64)
    proj = torch.randn(heads * d, 1000, generator=gen, dtype=torch.float64)
    dense_choice, _ = greedy_accept_lengths(dense, proj, torch.zeros(len(lens), seqlen_q, dtype=torch.long))
    drafts = dense_choice.clone()  # a draft that the dense model rejects at a different place per sequence
    for b in range(len(lens)):
        drafts[b, b % seqlen_q] += 1
    choice, accepted = greedy_accept_lengths(out, proj, drafts)
    dense_choice, dense_accepted = greedy_accept_lengths(dense, proj, drafts)
    assert torch.equal(choice, dense_choice) and torch.equal(accepted, dense_accepted)
    frac = st.skipped.sum() / st.blocks.sum()
    assert frac > 0.5, f"only {frac:.0%} of blocks skipped: the test would not exercise skipping"
    print(f"q{seqlen_q}: skipped {frac:.0%} of blocks, rel err {rel_err(out, dense):.1e}, accepted {accepted.tolist()}")
