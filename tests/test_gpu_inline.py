"""On an SM90 GPU: the inline-dequant kernel (backend="inline") against the float64 reference on
the same packed K/V. Every output starts as NaN (the ``poisoned`` fixture). The yardstick is
FA4's own end-to-end bf16 error on the same K/V: ours must stay within 2x of it + 1e-3."""

import dataclasses
import itertools

import pytest
import torch

from fa4_tq import attention_reference, compress, flash_attn_func, flash_attn_varlen_func
from helpers import bf16_baseline_err, paged_problem, realistic_kv, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]  # the SM90 kernels (conftest skips them elsewhere)
DEV = "cuda"
BITS = (2, 3, 4, 8)


def _check(q, k, v, *, causal=False, window=(None, None), tag=""):
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True, backend="inline")
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, dtype=torch.float64)
    err = rel_err(out, ref)
    base, base_lse = bf16_baseline_err(q, k.decompress(), v.decompress(), causal, window)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    lse_err = rel_err(lse[fin], ref_lse[fin])
    print(f"ERRS {tag}: out {err:.2e} (FA4 bf16 {base:.2e}) lse {lse_err:.2e} (FA4 {base_lse:.2e})")
    assert err <= 2 * base + 1e-3, (err, base)
    assert lse_err <= 2 * base_lse + 1e-3, (lse_err, base_lse)


def _problem(seed, b, sq, sk, h, hk, d, kbits, vbits, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=gen).to(dtype).to(DEV)
    k = compress(realistic_kv((b, sk, hk, d), generator=gen).to(DEV), kbits, seed=seed)
    v = compress(torch.randn(b, sk, hk, d, generator=gen).to(DEV), vbits, seed=seed + 1)
    return q, k, v


@pytest.mark.parametrize("kbits,vbits", list(itertools.product(BITS, BITS)))
def test_every_bit_pair_hdim128(poisoned, kbits, vbits):
    # 300 keys: three tiles, the last one partial; GQA 4:1 (pack-GQA)
    q, k, v = _problem(kbits * 10 + vbits, 2, 300, 300, 8, 2, 128, kbits, vbits)
    _check(q, k, v, causal=True, tag=f"k{kbits}v{vbits} d128 causal gqa4")


# Each head_dim meets each mask, bit pairs and head layouts rotating through the cases.
# (6, 2): 3 query heads per KV head, which does not divide the 128-row tile: FA4 then loads Q by
# cp.async (PackGQA) instead of TMA, and so do we.
MASKS = {"causal": (True, (None, None)), "full": (False, (None, None)), "window": (False, (100, 20))}
CASES = [
    (d, kb, vb, mask, h, hk)
    for i, (d, mask) in enumerate(itertools.product((64, 128, 256), MASKS))
    for (kb, vb), (h, hk) in [(((4, 4), (3, 2), (8, 4))[i % 3], ((4, 4), (8, 1), (6, 2))[(i // 3) % 3]),
                              (((2, 8), (4, 3), (3, 3))[i % 3], ((8, 1), (6, 2), (4, 4))[(i // 3) % 3])]
]


@pytest.mark.parametrize("d,kbits,vbits,mask,h,hk", CASES)
def test_head_dims_masks_and_heads(poisoned, d, kbits, vbits, mask, h, hk):
    causal, window = MASKS[mask]
    q, k, v = _problem(d + kbits + h, 2, 257, 515, h, hk, d, kbits, vbits)
    _check(q, k, v, causal=causal, window=window, tag=f"k{kbits}v{vbits} d{d} {mask} h{h}/{hk}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(1, 700), (128, 4096), (700, 700)])
def test_dtypes_and_chunked_prefill(poisoned, dtype, sq, sk):
    # sq < sk with causal: the queries are the last sq positions (bottom-right alignment)
    q, k, v = _problem(sq + sk, 1, sq, sk, 8, 2, 128, 4, 4, dtype)
    _check(q, k, v, causal=True, tag=f"{dtype} sq{sq} sk{sk}")


def test_seed_matters():
    """A wrong rotation seed must be visible: the kernel is checked against the right answer."""
    q, k, v = _problem(5, 1, 128, 256, 4, 4, 128, 8, 8)
    out, _ = flash_attn_func(q, k, v, backend="inline")
    ref, _ = attention_reference(q, k, v, dtype=torch.float64)
    wrong, _ = flash_attn_func(q, dataclasses.replace(k, seed=k.seed + 7), v, backend="inline")
    assert rel_err(out, ref) < 2e-2 < rel_err(wrong, ref)


def test_varlen(poisoned):
    gen = torch.Generator().manual_seed(3)
    d, h, hk = 128, 8, 2
    lens_q, lens_k = [37, 200, 1, 130], [300, 200, 513, 130]
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(torch.bfloat16).to(DEV)
    k = compress(realistic_kv((sum(lens_k), hk, d), generator=gen).to(DEV), 4, seed=3)
    v = compress(torch.randn(sum(lens_k), hk, d, generator=gen).to(DEV), 3, seed=4)
    cu = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEV)
    args = dict(cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), causal=True)
    _check_varlen(q, k, v, args, "varlen")


@pytest.mark.parametrize("page_size", [16, 64, 128, 256])
@pytest.mark.parametrize("d", [64, 128])
def test_paged(poisoned, page_size, d):
    q, kp, vp, args = paged_problem(page_size, d, torch.Generator().manual_seed(page_size + d), DEV)
    _check_varlen(q, kp, vp, args, f"paged page_size={page_size} d{d}")


def _check_varlen(q, k, v, args, tag):
    """Inline kernel vs the float64 reference, with decompress + FA4 (same tiles) as yardstick."""
    out, lse = flash_attn_varlen_func(q, k, v, **args, return_lse=True, backend="inline")
    ref, ref_lse = attention_reference(q, k, v, **args, dtype=torch.float64)
    dec, _ = flash_attn_varlen_func(q, k, v, **args, return_lse=True, backend="decompress")
    err, base = rel_err(out, ref), rel_err(dec, ref)
    print(f"ERRS {tag}: out {err:.2e} (decompress+FA4 {base:.2e}) lse {rel_err(lse, ref_lse):.2e}")
    assert err <= 1.1 * base + 1e-3
    assert rel_err(lse, ref_lse) < 3e-3


def test_inline_equals_decompress_tiles_bit_for_bit():
    """With one key the softmax is exactly 1, so the output row *is* the dequantised V row
    (rounded once to bf16 by the epilogue): the kernel's tile must equal the reference decode."""
    from fa4_tq.codec import rotate
    from fa4_tq.kernels.launch import packed_attention

    gen = torch.Generator().manual_seed(11)
    for vbits in BITS:
        q = torch.randn(1, 1, 2, 128, generator=gen).to(torch.bfloat16).to(DEV)
        v = compress(torch.randn(1, 1, 2, 128, generator=gen).to(DEV), vbits, seed=5)
        qr = rotate(q, v.seed).to(q.dtype)
        out_rot, _ = packed_attention(qr, v, v, softmax_scale=0.1, causal=False, window_size=(None, None),
                                      rotation="none")
        want = v.decompress_rotated(torch.bfloat16)  # [1, 1, 2, 128]
        assert torch.equal(out_rot, want), vbits


@pytest.mark.parametrize("d,h,hk,causal,paged", [
    (128, 32, 4, True, None),  # TMA Q, LPT order replaced
    (64, 8, 8, False, None),  # MHA
    (128, 6, 2, True, None),  # GQA 3: Q by cp.async (PackGQA)
    (128, 16, 2, True, 64),  # paged
])
def test_persistent_scheduler_equals_one_tile_per_cta(poisoned, d, h, hk, causal, paged):
    """Persistent, a CTA runs several tiles (here ~4-16 a CTA) and each tile's arithmetic is the
    same: outputs and LSE equal the one-tile-per-CTA kernel's bit for bit, and the reference."""
    from fa4_tq.kernels.launch import packed_attention

    b, s = 4, 1000
    q, k, v = _problem(d + h + hk, b, s, s, h, hk, d, 4, 4)
    args = dict(softmax_scale=d ** -0.5, causal=causal, window_size=(None, None))
    if paged:
        from helpers import ragged_paged_cache

        (k, v), args["page_table"], args["seqused_k"], _ = ragged_paged_cache(
            [s] * b, paged, hk, d, torch.Generator().manual_seed(3), k_bits=4, v_bits=4, device=DEV)
    one, one_lse = packed_attention(q, k, v, **args, _persistent=False)
    per, per_lse = packed_attention(q, k, v, **args, _persistent=True)
    assert torch.equal(per, one) and torch.equal(per_lse, one_lse)
    if not paged:  # the reference on the first sequence: the kernels are equal, so this checks both
        k1, v1 = (dataclasses.replace(x, data=x.data[:1], scales=x.scales[:1]) for x in (k, v))
        ref, _ = attention_reference(q[:1], k1, v1, causal=causal, dtype=torch.float64)
        base, _ = bf16_baseline_err(q[:1], k1.decompress(), v1.decompress(), causal, (None, None))
        err = rel_err(per[:1], ref)
        print(f"ERRS persistent d{d} h{h}/{hk} causal={causal}: out {err:.2e} (FA4 bf16 {base:.2e})")
        assert err <= 2 * base + 1e-3, (err, base)
