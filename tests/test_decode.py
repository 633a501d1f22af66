"""flash_attn_with_kvcache on the CPU: what it computes (the last rows of a causal prefill), the
split-KV decomposition of fa4_tq.decode (each launch run by the float64 reference in the
kernel's place, partials merged by LSE as FA4's combine does), the split planner, and the input
checks."""

import pytest
import torch

from fa4_tq import attention_reference, compress, flash_attn_func, flash_attn_with_kvcache
from fa4_tq.decode import plan_decode_splits, plan_num_splits, split_launches
from fa4_tq.kernels.combine import combine_reference
from helpers import ragged_paged_cache, rel_err

D, H, HK = 64, 8, 2


def _paged(lens, page_size, gen):
    return ragged_paged_cache(lens, page_size, HK, D, gen)


@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_decode_is_the_last_rows_of_a_causal_prefill(seqlen_q):
    gen = torch.Generator().manual_seed(seqlen_q)
    lens = [seqlen_q, 37, 130]
    (kp, vp), table, used, raw = _paged(lens, 16, gen)
    q_full = [torch.randn(n, H, D, generator=gen).to(torch.bfloat16) for n in lens]
    q = torch.stack([qf[-seqlen_q:] for qf in q_full])
    out, lse = flash_attn_with_kvcache(q, (kp, vp), table, used, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (3, H, seqlen_q)
    for b, ((k, v), qf) in enumerate(zip(raw, q_full)):
        kc, vc = compress(k[None], 4, seed=3), compress(v[None], 2, seed=4)
        ref, ref_lse = attention_reference(qf[None], kc, vc, causal=True, dtype=torch.float64)
        assert rel_err(out[b], ref[0, -seqlen_q:]) < 8e-3  # bf16 output rounding
        assert rel_err(lse[b], ref_lse[0, :, -seqlen_q:]) < 1e-5


CASES = [  # (lens, seqlen_q, causal, page_size, num_splits)
    ([1, 37, 200, 513], 1, True, 16, 2),
    ([1, 37, 200, 513], 1, True, 16, 7),
    ([1, 37, 200, 513], 1, False, 64, 3),
    ([4, 17, 129, 300], 4, True, 16, 2),  # 129 - 4 = 125: the tail starts mid-page
    ([4, 17, 129, 300], 4, True, 16, 5),
    ([16, 33, 64, 95], 16, True, 16, 3),  # tail spans two pages
    ([4, 17, 129, 300], 4, False, 16, 4),
    ([5, 300], 4, True, 64, 40),  # more splits than pages
]


@pytest.mark.parametrize("lens,seqlen_q,causal,page_size,num_splits", CASES)
def test_split_launches_merge_to_the_unsplit_answer(lens, seqlen_q, causal, page_size, num_splits):
    gen = torch.Generator().manual_seed(sum(lens) + num_splits)
    (kp, vp), table, used, _ = _paged(lens, page_size, gen)
    q = torch.randn(len(lens), seqlen_q, H, D, generator=gen).to(torch.bfloat16)
    ref, ref_lse = attention_reference(q, kp, vp, page_table=table, seqused_k=used, causal=causal, dtype=torch.float64)

    launches, empty = split_launches(q, table, used, causal, page_size, num_splits)
    parts = empty.shape[0]
    assert parts <= num_splits + (causal and seqlen_q > 1)
    out_part = torch.empty(parts, len(lens), seqlen_q, H, D, dtype=torch.float64)
    lse_part = torch.empty(parts, len(lens), H, seqlen_q, dtype=torch.float64)
    for ln in launches:
        vb = ln.q.shape[0]
        keys = ln.seqused_k.clamp_min(1)  # an empty chunk: the kernel's result is garbage, made finite here
        o, lse = attention_reference(ln.q, kp, vp, page_table=ln.page_table, seqused_k=keys, causal=ln.causal,
                                     dtype=torch.float64)
        out_part[ln.parts] = o.view(-1, len(lens), seqlen_q, H, D)
        lse_part[ln.parts] = lse.view(-1, len(lens), H, seqlen_q)
        assert vb == (ln.parts.stop - ln.parts.start) * len(lens)
    lse_part.masked_fill_(empty.view(parts, len(lens), 1, 1), float("-inf"))
    out, lse = combine_reference(out_part, lse_part)  # what the combine kernels compute
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    # every key is in exactly one chunk
    assert torch.equal(sum(ln.seqused_k.view(-1, len(lens)).sum(0) for ln in launches), used)


def test_plan_num_splits_fills_the_gpu_and_stops_at_the_pages():
    # batch 1, 8 KV heads, GQA 8 (8 rows): 8 tiles on 132 SMs -> 16 chunks
    assert plan_num_splits(1, 8, 8, 256, 128, 132) == 16
    assert plan_num_splits(128, 8, 8, 256, 128, 132) == 1  # 1024 tiles: no split
    assert plan_num_splits(1, 8, 8, 3, 128, 132) == 1  # 3 KV tiles: too short to split
    assert plan_num_splits(1, 1, 8, 6, 128, 132) == 6  # never more chunks than pages


def test_decode_kernel_fits_its_shared_memory_and_its_plan_one_wave():
    """Every decode-kernel variant fits one CTA's shared memory (227 KB), its warps' output rows
    fit their rings for the merge, and the split plan never asks for more CTAs than one wave at
    the residency the kernel reports."""
    from fa4_tq.kernels.decode import REGISTER_WARPS, SUPPORTED_BITS, PackedDecode

    for d in (64, 128):
        for kb in SUPPORTED_BITS:
            for vb in SUPPORTED_BITS:
                if d == 64 and (vb == 2 or 3 in (kb, vb)):
                    continue  # not supported (a lane's V slice would be 2 bytes; 3-bit rows: head_dim 128)
                for seqlen_q, group, cta_rows, groups in ((1, 8, 8, 1), (2, 8, 16, 1), (3, 4, 16, 1), (4, 8, 16, 2)):
                    kernel = PackedDecode(d, kb, vb, seqlen_q, group, True)
                    assert (kernel.cta_rows, kernel.row_groups) == (cta_rows, groups)
                    assert kernel.smem_bytes() <= 227 * 1024, (d, kb, vb)
                    assert kernel.cta_rows * d * 4 <= kernel.stages * kernel.stage_bytes
                    ctas = kernel.ctas_per_sm()
                    assert 1 <= ctas <= 3
                    assert ctas * kernel.warps <= REGISTER_WARPS[kernel.tiles]
                    for batch in (1, 3, 8, 32, 256):
                        for keys in (16, 4096, 131072):
                            splits = plan_decode_splits(batch, 8, keys, 132, ctas, groups)
                            assert splits == 1 or splits * batch * 8 * groups <= ctas * 132
                            assert splits == 1 or keys // splits >= 512
    # K4V4 at head_dim 128: one CTA an SM, of 12 warps at 8 rows, of 8 at 16 (registers); so batch
    # 8 takes 2 splits
    for seqlen_q, warps in ((1, 12), (2, 8)):
        kernel = PackedDecode(128, 4, 4, seqlen_q, 8, True)
        assert (kernel.ctas_per_sm(), kernel.warps) == (1, warps)
    assert plan_decode_splits(8, 8, 32768, 132, 1) == 2


def _small():
    gen = torch.Generator().manual_seed(0)
    (kp, vp), table, used, _ = _paged([20, 40], 16, gen)
    q = torch.randn(2, 1, H, D, generator=gen).to(torch.bfloat16)
    return q, (kp, vp), table, used


def test_split_tickets_one_zeroed_buffer_per_stream(monkeypatch):
    """The in-kernel combine's counters (``launch.split_tickets``), host logic with the CUDA calls
    stubbed: one zeroed buffer per (device, stream), reused while large enough, replaced (zeros)
    when a call needs more; under graph capture always a fresh one, never cached."""
    from types import SimpleNamespace

    import fa4_tq.kernels.launch as L

    current = {"stream": SimpleNamespace(device_index=0, cuda_stream=111), "capturing": False}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current["capturing"])
    monkeypatch.setattr(L, "_tickets", {})
    dev = torch.device("cpu")
    a = L.split_tickets(dev, 64)
    assert a.dtype == torch.int32 and a.numel() >= 64 and not a.any()
    assert L.split_tickets(dev, 32) is a  # same stream, fits: reused
    current["stream"] = SimpleNamespace(device_index=0, cuda_stream=222)
    b = L.split_tickets(dev, 64)
    assert b is not a and not b.any()  # another stream: its own
    c = L.split_tickets(dev, 5000)
    assert c is not b and c.numel() >= 5000 and not c.any()  # grown
    assert L.split_tickets(dev, 64) is c
    current["capturing"] = True
    d = L.split_tickets(dev, 64)
    assert d is not c and d.numel() == 64 and not d.any() and L.split_tickets(dev, 64) is not d
    assert set(L._tickets) == {(0, 111), (0, 222)}


def test_decode_shaped_calls_take_the_64_row_tile():
    """q_len x GQA <= 64 in the batch layout: one consumer warpgroup on 64 rows (the second of a
    128-row tile would hold only padding); more rows, or varlen q, keep prefill's 128-row tile.
    tile_n is prefill's either way (split planning and skip-softmax bounds use it)."""
    from fa4_tq.kernels.launch import sm90_config, sm90_tile_n

    assert sm90_config(128, 4, 4, 8, True) == (64, 128)  # decode, GQA 8
    assert sm90_config(128, 4, 4, 64, True) == (64, 128)  # verification of 8 tokens, GQA 8
    assert sm90_config(128, 4, 4, 65, True) == (128, 128)
    assert sm90_config(128, 4, 4, 8, False) == (128, 128)  # varlen q: rows per tile unknown
    for d, kb, vb in ((64, 2, 2), (256, 8, 8), (256, 4, 4)):
        assert sm90_config(d, kb, vb, 16, True) == (64, sm90_tile_n(d, kb, vb))


def test_decode_inputs_are_checked():
    q, cache, table, used = _small()
    with pytest.raises(TypeError, match="cache must be the pair"):
        flash_attn_with_kvcache(q, cache[0], table, used)
    with pytest.raises(ValueError, match="seqlen_q must be 1 to 16"):
        flash_attn_with_kvcache(q.expand(2, 17, H, D), cache, table, used)
    with pytest.raises(ValueError, match=r"q must be \[batch, seqlen_q"):
        flash_attn_with_kvcache(q[:, 0], cache, table, used)
    with pytest.raises(ValueError, match="needs page_table"):
        flash_attn_with_kvcache(q, cache, None, used)
    for bad in (0, 129, 2.0, True):
        with pytest.raises(ValueError, match="num_splits"):
            flash_attn_with_kvcache(q, cache, table, used, num_splits=bad)
    for bad in (1.0, -0.1, "0.1", True, torch.zeros(3)):
        with pytest.raises(ValueError, match="skip_softmax_threshold"):
            flash_attn_with_kvcache(q, cache, table, used, skip_softmax_threshold=bad)
    for bad in (-1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="skip_softmax_threshold_scale_factor"):
            flash_attn_with_kvcache(q, cache, table, used, skip_softmax_threshold_scale_factor=bad)
    with pytest.raises(ValueError, match="not both"):
        flash_attn_with_kvcache(q, cache, table, used, skip_softmax_threshold=0.1,
                                skip_softmax_threshold_scale_factor=1.0)
    with pytest.raises(ValueError, match="return_skip_stats needs"):
        flash_attn_with_kvcache(q, cache, table, used, return_skip_stats=True)
    with pytest.raises(ValueError, match="seqused_k must be >= 4"):
        flash_attn_with_kvcache(q.expand(2, 4, H, D), cache, table, torch.tensor([3, 40], dtype=torch.int32))
    with pytest.raises(TypeError, match="seqused_k must be torch.int32"):
        flash_attn_with_kvcache(q, cache, table, used.long())
    with pytest.raises(ValueError, match="page_table"):
        flash_attn_with_kvcache(q, cache, table.clamp_max(0) - 5, used)
    with pytest.raises(ValueError, match="backend"):
        flash_attn_with_kvcache(q, cache, table, used, backend="fast")


def test_decode_matches_the_varlen_api_on_cpu():
    q, cache, table, used = _small()
    out, lse = flash_attn_with_kvcache(q, cache, table, used, return_lse=True)
    q_var = q.reshape(2, H, D)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    from fa4_tq import flash_attn_varlen_func

    ref, ref_lse = flash_attn_varlen_func(q_var, *cache, cu_seqlens_q=cu, seqused_k=used, page_table=table,
                                          causal=True, return_lse=True)
    assert torch.equal(out.reshape(2, H, D), ref) and torch.equal(lse.reshape(2, H), ref_lse.t())
    out_nolse, none = flash_attn_with_kvcache(q, cache, table, used)
    assert none is None and torch.equal(out_nolse, out)
    assert flash_attn_func  # the module's import surface stays importable on the CPU


def test_skip_softmax_on_the_cpu_is_the_oracle():
    """On the CPU a threshold runs fa4_tq.skip_softmax (unsplit, the kernel's 128-key blocks and
    64-row vote groups); the scale-factor form is lambda = factor / seqused_k."""
    from fa4_tq.skip_softmax import peaked_attention_inputs, skip_softmax_attention

    gen = torch.Generator().manual_seed(7)
    lens = [600, 300]
    q, raw = peaked_attention_inputs(lens, 4, H, HK, D, generator=gen)
    (kp, vp), table, used, _ = ragged_paged_cache(lens, 16, HK, D, gen, raw=raw)
    q = q.to(torch.bfloat16)
    out, lse, st = flash_attn_with_kvcache(q, (kp, vp), table, used, skip_softmax_threshold_scale_factor=0.5,
                                           return_lse=True, return_skip_stats=True)
    o2, l2, st2 = skip_softmax_attention(q, kp, vp, table, used, threshold_scale_factor=0.5, tile_n=128)
    assert torch.equal(out, o2.to(q.dtype)) and torch.equal(lse, l2.float())
    assert torch.equal(st.skipped, st2.skipped) and int(st.skipped.sum()) > 0
    lam = torch.tensor([0.5 / n for n in lens])
    o3, _, st3 = flash_attn_with_kvcache(q, (kp, vp), table, used, skip_softmax_threshold=lam,
                                         return_skip_stats=True)
    assert torch.equal(o3, out) and torch.equal(st3.skipped, st.skipped)
    dense = flash_attn_with_kvcache(q, (kp, vp), table, used)[0]
    zero = flash_attn_with_kvcache(q, (kp, vp), table, used, skip_softmax_threshold=0.0)[0]
    # online (oracle) and dense (reference) float64 softmax differ in the last bits, so the bf16
    # outputs may differ by one rounding step
    torch.testing.assert_close(zero, dense, atol=1e-6, rtol=2 ** -7)
