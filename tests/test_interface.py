"""The public API on CPU (reference backend) and its input checks."""

import dataclasses

import pytest
import torch

from fa4_tq import PagedKVCache, attention_reference, compress, flash_attn_func, flash_attn_varlen_func
from helpers import realistic_kv, rel_err


def _qkv(b=2, sq=16, sk=24, h=4, hk=2, d=64, bits=(4, 4), gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    q = torch.randn(b, sq, h, d, generator=gen).to(torch.bfloat16)
    k = compress(realistic_kv((b, sk, hk, d), generator=gen), bits[0], seed=1)
    v = compress(torch.randn(b, sk, hk, d, generator=gen), bits[1], seed=2)
    return q, k, v


def test_flash_attn_func_cpu_runs_reference_and_mirrors_fa4_returns():
    q, k, v = _qkv()
    out, lse = flash_attn_func(q, k, v, causal=True)
    assert lse is None and out.dtype == q.dtype and out.shape == q.shape
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True, dtype=torch.float64)
    assert rel_err(out, ref) < 8e-3  # bf16 output rounding
    assert rel_err(lse, ref_lse) < 1e-5 and lse.shape == (2, 4, 16)


def test_varlen_and_paged_through_the_public_api():
    gen = torch.Generator().manual_seed(4)
    d, h, hk = 128, 8, 2
    lens_q, lens_k = [3, 9], [40, 9]
    cache = PagedKVCache(1, num_pages=8, page_size=16, kv_heads=hk, head_dim=d, k_bits=3, v_bits=2)
    k = realistic_kv((sum(lens_k), hk, d), generator=gen)
    v = torch.randn(sum(lens_k), hk, d, generator=gen)
    table = torch.tensor([[5, 0, 7], [2, 1, 1]], dtype=torch.int32)
    slots = [int(table[0, j // 16]) * 16 + j % 16 for j in range(40)] + [2 * 16 + j for j in range(9)]
    cache.write(0, k, v, torch.tensor(slots))
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(torch.float16)
    cu_q = torch.tensor([0, 3, 12], dtype=torch.int32)
    used = torch.tensor(lens_k, dtype=torch.int32)
    kp, vp = cache.layer(0)
    out, lse = flash_attn_varlen_func(
        q, kp, vp, cu_seqlens_q=cu_q, seqused_k=used, page_table=table, causal=True, return_lse=True
    )
    assert out.shape == q.shape and lse.shape == (h, 12)
    # the same tokens, contiguous and varlen
    kc, vc = compress(k, 3, seed=0), compress(v, 2, seed=1)
    cu_k = torch.tensor([0, 40, 49], dtype=torch.int32)
    out_c, _ = flash_attn_varlen_func(q, kc, vc, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    assert torch.equal(out, out_c)


def test_reference_backend_is_selectable_and_decompress_needs_cuda():
    q, k, v = _qkv()
    a, _ = flash_attn_func(q, k, v, backend="reference")
    b, _ = flash_attn_func(q, k, v, backend="auto")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs CUDA"):
        flash_attn_func(q, k, v, backend="decompress")
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attn_func(q, k, v, backend="fast")


# ---------------------------------------------------------------- bad input
def test_wrong_types_and_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must be a fa4_tq.PackedKV.*fa4_tq.compress"):
        flash_attn_func(q, k.decompress(), v)
    with pytest.raises(TypeError, match=r"q must be torch.bfloat16 or torch.float16.*q.to"):
        flash_attn_func(q.float(), k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_attn_func(None, k, v)


def test_unsupported_bits_or_head_dim():
    with pytest.raises(ValueError, match="bits=6"):
        compress(torch.randn(1, 4, 1, 64), 6)
    with pytest.raises(ValueError, match="head_dim=80"):
        compress(torch.randn(1, 4, 1, 80), 4)
    q, k, v = _qkv(d=64)
    q128 = torch.randn(2, 16, 4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q has head_dim 128 but k was packed with head_dim 64"):
        flash_attn_func(q128, k, v)


def test_heads_not_divisible():
    q, k, v = _qkv(h=5, hk=2)
    with pytest.raises(ValueError, match="5 heads.*multiple of the 2 KV heads"):
        flash_attn_func(q, k, v)


def test_k_and_v_mismatch():
    q, k, _ = _qkv(sk=24)
    _, _, v_short = _qkv(sk=20)
    with pytest.raises(ValueError, match="same leading shape"):
        flash_attn_func(q, k, v_short)
    _, _, v_heads = _qkv(hk=4)
    with pytest.raises(ValueError, match="same leading shape"):
        flash_attn_func(q, k, v_heads)


def test_other_codec_version():
    q, k, v = _qkv()
    old = dataclasses.replace(v)
    object.__setattr__(old, "version", 0)  # what unpickling an old PackedKV gives
    with pytest.raises(ValueError, match="format v0.*recompress"):
        flash_attn_func(q, k, old)


def test_devices_must_match():
    q, k, v = _qkv()
    meta = dataclasses.replace(k, data=k.data.to("meta"), scales=k.scales.to("meta"))
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        flash_attn_func(q, meta, v)


def test_non_contiguous_or_misaligned_buffers():
    q, k, v = _qkv(sk=32)
    # rows not contiguous: take every other byte of a wider buffer
    wide = torch.zeros(*k.data.shape[:-1], 2 * k.row_bytes, dtype=torch.uint8)[..., ::2]
    bad = dataclasses.replace(k, data=wide)
    with pytest.raises(ValueError, match="k.data must hold each token's rows contiguously"):
        flash_attn_func(q, bad, v)
    # misaligned: a view that starts one byte into a buffer
    raw = torch.zeros(k.data.numel() + 1, dtype=torch.uint8)
    shifted = raw[1:].view(k.data.shape)
    bad = dataclasses.replace(k, data=shifted)
    with pytest.raises(ValueError, match="16-byte boundary"):
        flash_attn_func(q, bad, v)
    # scales sliced off their 16-byte grid
    s = torch.zeros(2, 2, 40, dtype=torch.float16)[..., 3:35]
    with pytest.raises(ValueError, match="k.scales must start on a 16-byte boundary"):
        flash_attn_func(q, dataclasses.replace(k, scales=s), v)
    s = torch.zeros(2, 40, 2, dtype=torch.float16).transpose(1, 2)[..., :32]
    with pytest.raises(ValueError, match="k.scales must be contiguous along tokens"):
        flash_attn_func(q, dataclasses.replace(k, scales=s), v)


def test_index_tensor_checks():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(10, 4, 64, generator=gen).to(torch.bfloat16)
    k = compress(torch.randn(12, 2, 64, generator=gen), 4)
    v = compress(torch.randn(12, 2, 64, generator=gen), 4)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"cu_seqlens_k must be torch.int32.*to\(torch.int32\)"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k.long())
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease and end at 10"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 6, 4], dtype=torch.int32), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0.*end at 12"):
        flash_attn_varlen_func(q, k, v, cu_q, torch.tensor([0, 5, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must have shape \(3,\)"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k[:2])
    with pytest.raises(ValueError, match="either cu_seqlens_k or seqused_k"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, seqused_k=torch.tensor([1, 2], dtype=torch.int32))


def test_page_table_checks():
    cache = PagedKVCache(1, num_pages=4, page_size=16, kv_heads=2, head_dim=64)
    kp, vp = cache.layer(0)
    q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
    used = torch.tensor([20, 16], dtype=torch.int32)
    good = torch.tensor([[0, 1, 9], [2, -1, -1]], dtype=torch.int32)  # entries past the used pages are ignored
    out, _ = flash_attn_varlen_func(q, kp, vp, seqused_k=used, page_table=good)
    assert out.shape == q.shape
    bad = torch.tensor([[0, 4, 0], [2, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"page_table\[0, 1\] = 4 is out of range.*\[0, 4\)"):
        flash_attn_varlen_func(q, kp, vp, seqused_k=used, page_table=bad)
    with pytest.raises(ValueError, match=r"seqused_k must lie in \[0, 48\]"):
        flash_attn_varlen_func(q, kp, vp, seqused_k=torch.tensor([49, 1], dtype=torch.int32), page_table=good)
    with pytest.raises(ValueError, match="page_table needs seqused_k"):
        flash_attn_varlen_func(q, kp, vp, page_table=good)
    with pytest.raises(TypeError, match="page_table must be torch.int32"):
        flash_attn_varlen_func(q, kp, vp, seqused_k=used, page_table=good.long())


def test_window_and_scale_checks():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attn_func(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite"):
        flash_attn_func(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="flash_attn_varlen_func"):
        flash_attn_func(q[0], k, v)
