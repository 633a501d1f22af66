"""The oracle against torch SDPA on the decompressed tensors (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fa4_tq import attention_reference, compress
from helpers import realistic_kv, rel_err


def _sdpa(q, k, v, scale, mask=None):
    """q[sq,H,d], k/v[sk,Hk,d] float64 -> (out[sq,H,d], lse[H,sq]) with an explicit bool mask."""
    group = q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), kh.transpose(0, 1), vh.transpose(0, 1), attn_mask=mask, scale=scale
    ).transpose(0, 1)
    s = torch.einsum("qhd,khd->hqk", q, kh) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return out, torch.logsumexp(s, -1)


def _mask(sq, sk, causal, window):
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq).view(-1, 1) + sk - sq
    j = torch.arange(sk).view(1, -1)
    m = torch.ones(sq, sk, dtype=torch.bool)
    if right is not None:
        m &= j <= i + right
    if left is not None:
        m &= j >= i - left
    return m


def _packed(shape, kb, vb, gen):
    k = realistic_kv(shape, generator=gen)
    v = torch.randn(*shape, generator=gen)
    return compress(k, kb, seed=3), compress(v, vb, seed=4)


@pytest.mark.parametrize(
    "heads,kv_heads,sq,sk,causal,window",
    [
        (4, 4, 33, 33, False, (None, None)),  # MHA
        (8, 2, 17, 50, True, (None, None)),  # GQA, chunked prefill (sq < sk)
        (6, 1, 40, 40, True, (None, None)),  # MQA
        (4, 2, 30, 45, False, (8, 3)),  # sliding window
        (4, 2, 30, 45, True, (5, None)),  # causal + left window
    ],
)
@pytest.mark.parametrize("bits", [(4, 4), (2, 8)])
def test_batched_matches_sdpa(heads, kv_heads, sq, sk, causal, window, bits):
    gen = torch.Generator().manual_seed(heads * 100 + sq)
    d = 64
    q = torch.randn(2, sq, heads, d, generator=gen)
    kp, vp = _packed((2, sk, kv_heads, d), *bits, gen)
    out, lse = attention_reference(
        q, kp, vp, causal=causal, window_size=window, softmax_scale=0.3, dtype=torch.float64
    )
    kd, vd = kp.decompress(torch.float64), vp.decompress(torch.float64)
    mask = _mask(sq, sk, causal, window)
    for b in range(2):
        o_ref, l_ref = _sdpa(q[b].double(), kd[b], vd[b], 0.3, mask)
        assert rel_err(out[b], o_ref) < 1e-10
        assert rel_err(lse[b], l_ref) < 1e-12
    assert lse.shape == (2, heads, sq)


def test_varlen_and_seqused_and_paged_agree_with_per_sequence_sdpa():
    gen = torch.Generator().manual_seed(0)
    d, H, Hk, page = 128, 4, 2, 16
    lens_q, lens_k = [5, 1, 12], [20, 37, 12]
    q = torch.randn(sum(lens_q), H, d, generator=gen)
    k = realistic_kv((sum(lens_k), Hk, d), generator=gen)
    v = torch.randn(sum(lens_k), Hk, d, generator=gen)
    kp, vp = compress(k, 3), compress(v, 4, seed=9)
    cu_q = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 57, 69], dtype=torch.int32)
    out, lse = attention_reference(q, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, dtype=torch.float64)
    assert out.shape == q.shape and lse.shape == (H, q.shape[0])

    # the same sequences in shuffled pages
    n_pages = 12
    perm = torch.randperm(n_pages, generator=gen)
    kpages = torch.zeros(n_pages, page, Hk, d)
    vpages = torch.zeros(n_pages, page, Hk, d)
    table = torch.zeros(3, 3, dtype=torch.int32)
    nxt = 0
    for b in range(3):
        ks, vs = k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        for j in range(0, lens_k[b], page):
            pid = int(perm[nxt]); nxt += 1
            table[b, j // page] = pid
            kpages[pid, : len(ks[j : j + page])] = ks[j : j + page]
            vpages[pid, : len(vs[j : j + page])] = vs[j : j + page]
    out_p, lse_p = attention_reference(
        q, compress(kpages, 3), compress(vpages, 4, seed=9), cu_seqlens_q=cu_q,
        seqused_k=torch.tensor(lens_k, dtype=torch.int32), page_table=table, causal=True,
        dtype=torch.float64,
    )
    assert rel_err(out_p, out) < 1e-12 and torch.allclose(lse_p, lse)

    kd, vd = kp.decompress(torch.float64), vp.decompress(torch.float64)
    for b in range(3):
        qs = slice(int(cu_q[b]), int(cu_q[b + 1]))
        ksl = slice(int(cu_k[b]), int(cu_k[b + 1]))
        o_ref, l_ref = _sdpa(q[qs].double(), kd[ksl], vd[ksl], 1 / math.sqrt(d), _mask(lens_q[b], lens_k[b], True, (None, None)))
        assert rel_err(out[qs], o_ref) < 1e-10
        assert rel_err(lse[:, qs], l_ref) < 1e-12


def test_seqused_k_trims_batched_kv():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 2, 64, generator=gen)
    kp, vp = _packed((2, 24, 2, 64), 4, 4, gen)
    used = torch.tensor([10, 24], dtype=torch.int32)
    out, _ = attention_reference(q, kp, vp, seqused_k=used, dtype=torch.float64)
    short, _ = attention_reference(
        q[:1], compress(kp.decompress()[:1, :10].contiguous(), 4, seed=3),
        compress(vp.decompress()[:1, :10].contiguous(), 4, seed=4), dtype=torch.float64,
    )
    assert rel_err(out[:1], short) < 5e-3  # re-compression of decoded vectors is near-idempotent


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 2, 64, generator=gen)
    kp, vp = _packed((1, 3, 2, 64), 4, 4, gen)
    out, lse = attention_reference(q, kp, vp, causal=True)  # sq > sk: first 3 rows see nothing
    assert torch.all(out[0, :3] == 0) and torch.all(torch.isneginf(lse[0, :, :3]))
    assert torch.isfinite(lse[0, :, 3:]).all()


def test_float32_is_close_to_float64():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 64, 4, 128, generator=gen)
    kp, vp = _packed((1, 64, 4, 128), 4, 4, gen)
    o32, _ = attention_reference(q, kp, vp, causal=True)
    o64, _ = attention_reference(q, kp, vp, causal=True, dtype=torch.float64)
    assert o32.dtype == torch.float32 and rel_err(o32, o64) < 1e-5
