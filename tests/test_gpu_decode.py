"""On an SM90 GPU: flash_attn_with_kvcache (split-KV + pack-GQA over the packed-KV kernel)
against the float64 reference on the same paged cache. Outputs start as NaN (``poisoned``)."""

import functools
import itertools

import pytest
import torch

from fa4_tq import attention_reference, flash_attn_with_kvcache
from helpers import greedy_accept_lengths, ragged_paged_cache, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]  # the SM90 kernels (conftest skips them elsewhere)
DEV = "cuda"
BITS = (2, 3, 4, 8)
# The yardstick, as in test_gpu_inline: FA4's own bf16 error on the same cache (backend="decompress":
# the packed pages decoded to bf16, then FA4), against the same float64 reference. Ours must stay
# within 2x of it + 1e-3 (a split adds one bf16 rounding of each partial).


def _check(lens, seqlen_q, h, h_k, d, page_size, k_bits, v_bits, *, causal=True, num_splits=None, tag=""):
    gen = torch.Generator().manual_seed(hash((tuple(lens), seqlen_q, h, d, page_size, k_bits, v_bits)) % 2**31)
    cache, table, used, _ = ragged_paged_cache(lens, page_size, h_k, d, gen, k_bits=k_bits, v_bits=v_bits,
                                               k_seed=5, v_seed=6, device=DEV)
    q = torch.randn(len(lens), seqlen_q, h, d, generator=gen).to(torch.bfloat16).to(DEV)
    out, lse = flash_attn_with_kvcache(q, cache, table, used, causal=causal, num_splits=num_splits,
                                       return_lse=True, backend="inline")
    ref, ref_lse = attention_reference(q, *cache, page_table=table, seqused_k=used, causal=causal,
                                       dtype=torch.float64)
    err, lse_err = rel_err(out, ref), rel_err(lse, ref_lse)
    base_out, base_lse = flash_attn_with_kvcache(q, cache, table, used, causal=causal, return_lse=True,
                                                 backend="decompress")
    base, base_l = rel_err(base_out, ref), rel_err(base_lse, ref_lse)
    print(f"ERRS {tag} lens={lens[:4]} q{seqlen_q} h{h}/{h_k} d{d} page{page_size} K{k_bits}V{v_bits} "
          f"splits={num_splits}: out {err:.2e} (FA4 bf16 {base:.2e}) lse {lse_err:.2e} (FA4 {base_l:.2e})")
    assert err <= 2 * base + 1e-3, (err, base)
    assert lse_err <= 2 * base_l + 1e-3, (lse_err, base_l)
    return out


@pytest.mark.parametrize("k_bits,v_bits", list(itertools.product(BITS, BITS)))
def test_every_bit_pair_decode(poisoned, k_bits, v_bits):
    # ragged: a 1-token sequence (empty chunks in a 4-way split), a partial last page, a long one
    _check([1, 700, 3000], 1, 32, 4, 128, 64, k_bits, v_bits, num_splits=4, tag="bits")


CASES = [  # (lens, seqlen_q, heads, kv_heads, d, page_size, bits, causal, num_splits)
    ([5000], 1, 8, 8, 128, 128, (4, 4), True, None),  # GQA 1, batch 1: the planner splits
    ([300, 9000, 17], 1, 16, 4, 64, 16, (4, 2), True, None),  # GQA 4, head_dim 64, pages of 16
    ([2048, 33], 1, 64, 8, 64, 128, (2, 8), True, 7),  # GQA 8, head_dim 64
    ([4, 129, 4000], 4, 64, 8, 128, 64, (4, 4), True, None),  # verification, tail mid-page
    ([8, 1000, 255], 8, 32, 4, 128, 16, (3, 3), True, 5),  # tail over two pages of 16
    ([16, 3000], 16, 64, 8, 128, 128, (8, 4), True, 3),  # 16 x 8 = 128 rows: a full tile
    ([4, 129, 4000], 4, 64, 8, 128, 64, (4, 4), False, 6),  # non-causal among the new tokens
    ([2, 3, 4, 200], 2, 8, 1, 128, 16, (2, 2), True, 1),  # MQA, no split
]


@pytest.mark.parametrize("lens,seqlen_q,h,h_k,d,page_size,bits,causal,num_splits", CASES)
def test_shapes_heads_pages_and_verification(poisoned, lens, seqlen_q, h, h_k, d, page_size, bits, causal, num_splits):
    _check(lens, seqlen_q, h, h_k, d, page_size, *bits, causal=causal, num_splits=num_splits, tag="case")


def test_many_sequences_and_a_long_context(poisoned):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 600, (256,), generator=gen).tolist()
    _check(lens, 1, 16, 2, 128, 16, 4, 4, tag="batch256")
    _check([65536], 1, 64, 8, 128, 128, 4, 4, tag="64K")


def test_batch_one_then_a_larger_batch(poisoned):
    """A split at batch 1 repeats q with a stride of 0, which the compiled kernel takes as a
    constant; the same shapes at batch 2 must get their own kernel, not a stride error."""
    for lens in ([3000], [3000, 700], [5]):
        _check(lens, 1, 16, 2, 128, 64, 4, 2, num_splits=2, tag="restride")


def test_split_and_unsplit_agree(poisoned):
    outs = [_check([40, 5000], 4, 64, 8, 128, 64, 4, 4, num_splits=n, tag="splits") for n in (1, 2, 16, None)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-2


def _decode_inputs(lens, seqlen_q, h, h_k, seed):
    gen = torch.Generator().manual_seed(seed)
    cache, table, used, _ = ragged_paged_cache(lens, 64, h_k, 128, gen, k_bits=4, v_bits=4, k_seed=5, v_seed=6,
                                               device=DEV)
    q = torch.randn(len(lens), seqlen_q, h, 128, generator=gen).to(torch.bfloat16).to(DEV)
    return q, cache, table, used


@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 16), (4, 16), (1, 1), (4, 1)])
def test_in_kernel_combine_equals_the_combine_kernel(poisoned, monkeypatch, seqlen_q, num_splits):
    """``DECODE_COMBINE_IN_KERNEL``: the CTA of a row group that draws the last ticket (an atomic
    counter per row group) merges every split's partials with the combine kernel's own code, so
    the output and LSE must equal the two-launch path's bit for bit (one split: the direct write
    equals the combine's cast). The counters must be back at zero after each call, or the next
    call would pick no CTA (rows left NaN) or the wrong one (partials not yet written): three
    calls in a row. Sequences of 4 and 5 keys leave 15 of their 16 splits empty (weight 0)."""
    import fa4_tq.decode as dec
    from fa4_tq.interface import _Problem
    from fa4_tq.kernels.launch import _tickets

    lens = [4, 5, 3000, 9000]  # causal calls need seqlen_q keys at least
    q, cache, table, used = _decode_inputs(lens, seqlen_q, 32, 4, seed=7)
    assert dec.decode_kernel_runs(_Problem(q, *cache, 4, 1.0, True, (None, None)))
    call = lambda: flash_attn_with_kvcache(q, cache, table, used, num_splits=num_splits, return_lse=True)
    want, want_lse = call()
    monkeypatch.setattr(dec, "DECODE_COMBINE_IN_KERNEL", True)
    calls = [call() for _ in range(3)]
    torch.cuda.synchronize()
    assert _tickets and all(int(t.abs().sum()) == 0 for t in _tickets.values())
    for out, lse in calls:
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = attention_reference(q, *cache, page_table=table, seqused_k=used, causal=True,
                                       dtype=torch.float64)
    print(f"IN-KERNEL q{seqlen_q} splits={num_splits}: out {rel_err(want, ref):.2e} "
          f"lse {rel_err(want_lse, ref_lse):.2e}")
    assert rel_err(want, ref) < 2e-2 and rel_err(want_lse, ref_lse) < 1e-3


def test_in_kernel_combine_on_two_streams_at_once(poisoned, monkeypatch):
    """Launches on different streams may run at the same time, so each stream has its own
    tickets: 2 x 20 calls of 16 splits, alternating between two streams, each equal to the call
    on the default stream bit for bit."""
    import fa4_tq.decode as dec

    monkeypatch.setattr(dec, "DECODE_COMBINE_IN_KERNEL", True)
    q, cache, table, used = _decode_inputs([3000, 70, 9000], 1, 32, 4, seed=8)
    want, _ = flash_attn_with_kvcache(q, cache, table, used, num_splits=16)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = []
    for i in range(40):
        with torch.cuda.stream(streams[i % 2]):
            got.append(flash_attn_with_kvcache(q, cache, table, used, num_splits=16)[0])
    torch.cuda.synchronize()
    assert all(torch.equal(o, want) for o in got), sum(not torch.equal(o, want) for o in got)


@functools.lru_cache(maxsize=None)
def _switched_kernel(switches: tuple):
    """A subclass of PackedDecode with ``switches`` (``(name, value)`` pairs) set, one per set of
    switches (launch.packed_decode compiles once per class)."""
    import fa4_tq.kernels.decode as dk

    return type("PackedDecode", (dk.PackedDecode,), dict(switches))


SWITCH_CASES = [  # (lens, seqlen_q, heads, kv_heads, d, page_size, bits)
    ([1, 700, 3000], 1, 32, 4, 128, 64, (2, 2)),
    ([5, 4000], 4, 64, 8, 128, 16, (2, 2)),
    ([300, 2500], 1, 64, 8, 128, 128, (2, 4)),
    ([300, 2500], 1, 64, 8, 128, 64, (4, 2)),
    ([900, 17], 2, 16, 2, 128, 64, (2, 8)),
    ([900, 17], 1, 16, 2, 128, 16, (8, 2)),
    ([1500], 4, 32, 4, 128, 64, (3, 2)),
    ([1500, 64], 1, 32, 4, 128, 128, (2, 3)),
    ([2000, 33], 1, 32, 4, 64, 64, (2, 4)),
    ([3000, 1], 1, 64, 8, 128, 16, (4, 4)),
]


@pytest.mark.parametrize("switches", [dict(paired_2bit_lookups=True), dict(fast_page_divmod=True),
                                      dict(paired_2bit_lookups=True, fast_page_divmod=True)],
                         ids=["paired_2bit_lookups", "fast_page_divmod", "both"])
@pytest.mark.parametrize("lens,seqlen_q,h,h_k,d,page_size,bits", SWITCH_CASES)
def test_decode_kernel_switches_change_no_bit(poisoned, monkeypatch, switches, lens, seqlen_q, h, h_k, d, page_size,
                                              bits):
    """PackedDecode's switches that are off by default change instructions, not values: 2-bit
    lookups in fragment order decode the same words into the same MMAs, FA4's fast divmod finds
    the same page and slot. Output and LSE equal the default kernel's bit for bit, at 1 and 2
    n-tiles, head_dim 64/128, page sizes 16/64/128, split (ragged) and unsplit."""
    import fa4_tq.kernels.decode as dk

    if 2 not in bits and "fast_page_divmod" not in switches:
        pytest.skip("paired_2bit_lookups changes nothing without a 2-bit side")
    kb, vb = bits
    gen = torch.Generator().manual_seed(hash((tuple(lens), seqlen_q, h, d, page_size, kb, vb)) % 2**31)
    cache, table, used, _ = ragged_paged_cache(lens, page_size, h_k, d, gen, k_bits=kb, v_bits=vb, k_seed=5,
                                               v_seed=6, device=DEV)
    q = torch.randn(len(lens), seqlen_q, h, d, generator=gen).to(torch.bfloat16).to(DEV)
    for splits in (None, 1):
        want = flash_attn_with_kvcache(q, cache, table, used, num_splits=splits, return_lse=True)
        with monkeypatch.context() as m:  # not monkeypatch.undo(): that would lift the poisoning too
            m.setattr(dk, "PackedDecode", _switched_kernel(tuple(sorted(switches.items()))))
            got = flash_attn_with_kvcache(q, cache, table, used, num_splits=splits, return_lse=True)
        assert torch.isfinite(want[0]).all()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (splits, rel_err(got[0], want[0]))


# ----------------------------------------------------------------------------- skip-softmax
def _peaked(lens, seqlen_q, h, h_k, d, page_size, k_bits, v_bits, seed):
    from fa4_tq.skip_softmax import peaked_attention_inputs

    gen = torch.Generator().manual_seed(seed)
    q, raw = peaked_attention_inputs(lens, seqlen_q, h, h_k, d, generator=gen)
    cache, table, used, _ = ragged_paged_cache(lens, page_size, h_k, d, gen, k_bits=k_bits, v_bits=v_bits,
                                               k_seed=5, v_seed=6, device=DEV, raw=raw)
    return q.to(torch.bfloat16).to(DEV), cache, table, used


@pytest.mark.parametrize("seqlen_q,num_splits", [(1, None), (8, None), (8, 1)])
def test_skip_threshold_none_and_zero_are_the_dense_kernel(poisoned, seqlen_q, num_splits):
    """None runs the dense path; 0 runs the voting kernel, which then skips nothing: it equals the
    dense packed-KV kernel it is built on bit for bit (output and LSE). (At seqlen_q 1 the dense
    path is the decode kernel, kernels/decode.py, a different kernel with its own rounding.)"""
    from fa4_tq.decode import _run_split
    from fa4_tq.interface import _Problem

    q, cache, table, used = _peaked([3000, 70, 1200], seqlen_q, 32, 4, 128, 64, 4, 4, seed=1)
    kw = dict(num_splits=num_splits, return_lse=True, backend="inline")
    out, lse = flash_attn_with_kvcache(q, cache, table, used, **kw)
    out_n, lse_n = flash_attn_with_kvcache(q, cache, table, used, skip_softmax_threshold=None, **kw)
    out_0, lse_0, st = flash_attn_with_kvcache(q, cache, table, used, skip_softmax_threshold=0.0,
                                               return_skip_stats=True, **kw)
    prob = _Problem(q, *cache, 3, 128 ** -0.5, True, (None, None), seqused_k=used, page_table=table)
    dense, dense_lse = _run_split(prob, num_splits, True)
    assert torch.equal(out_n, out) and torch.equal(lse_n, lse)
    assert torch.equal(out_0, dense) and torch.equal(lse_0, dense_lse)
    assert int(st.skipped.sum()) == 0 and int(st.blocks.min()) >= 1


SKIP_CASES = [  # (lens, seqlen_q, heads, kv_heads, d, page_size, bits, num_splits)
    ([4000, 900, 2500], 1, 32, 4, 128, 64, (4, 4), None),  # decode, GQA 8, split
    ([4000, 900, 2500], 8, 32, 4, 128, 64, (4, 4), 1),  # verification, one vote group, unsplit
    ([3000, 5000], 4, 64, 8, 128, 128, (2, 4), None),  # verification, split + causal tail
    ([2000, 333], 16, 64, 8, 64, 16, (8, 8), None),  # 128 rows: both warpgroups vote, head_dim 64
    ([2500, 1500], 8, 16, 4, 64, 16, (3, 2), 1),  # GQA 4, pages of 16
    ([6000], 4, 8, 8, 128, 128, (4, 8), None),  # GQA 1 (no pack-GQA)
]


@pytest.mark.parametrize("lens,seqlen_q,h,h_k,d,page_size,bits,num_splits", SKIP_CASES)
def test_skip_softmax_stays_inside_its_bound(poisoned, lens, seqlen_q, h, h_k, d, page_size, bits, num_splits):
    """Every row's error against the float64 dense answer stays within the bound of the blocks
    the kernel reports skipped (2 eps max||v||) plus the dense kernel's own error on that row.
    Unsplit, the kernel skips most blocks of this peaked attention, as many as the float64 oracle.
    Split, each chunk votes against its own running max, so only chunks that hold a dominant key
    skip: fewer blocks, the same bound."""
    from fa4_tq.skip_softmax import skip_softmax_attention

    q, cache, table, used = _peaked(lens, seqlen_q, h, h_k, d, page_size, *bits, seed=len(lens) + seqlen_q)
    kw = dict(num_splits=num_splits, return_lse=True, backend="inline")
    factor = 1.0
    out, lse, st = flash_attn_with_kvcache(q, cache, table, used, skip_softmax_threshold_scale_factor=factor,
                                           return_skip_stats=True, **kw)
    # the dense kernel the skipping one is built on (at <= 32 rows per KV head the dense call runs
    # the decode kernel, whose rounding differs from it by more than eps)
    from fa4_tq.decode import _run_split
    from fa4_tq.interface import _Problem

    prob = _Problem(q, *cache, len(lens), d ** -0.5, True, (None, None), seqused_k=used, page_table=table)
    dense, dense_lse = _run_split(prob, num_splits, True)
    ref, _ = attention_reference(q, *cache, page_table=table, seqused_k=used, causal=True, dtype=torch.float64)
    group = h // h_k
    vmax = cache[1].decompress().double().norm(dim=-1).amax(dim=(0, 1)).repeat_interleave(group)  # [heads]
    eps = st.row_eps(seqlen_q, group)  # [batch, seqlen_q, heads]
    err = (out.double() - ref).norm(dim=-1)
    dense_err = (dense.double() - ref).norm(dim=-1)
    bound = 2 * eps * vmax + 2 * dense_err + 1e-3 * ref.norm(dim=-1)
    frac = float(st.skipped.sum() / st.blocks.sum())
    print(f"SKIP lens={lens} q{seqlen_q} h{h}/{h_k} d{d} page{page_size} K{bits[0]}V{bits[1]} splits={num_splits}: "
          f"skipped {frac:.0%}, rel err {rel_err(out, ref):.2e} (dense kernel {rel_err(dense, ref):.2e}), "
          f"max err/bound {float((err / bound).max()):.2f}")
    assert bool((err <= bound).all()), float((err / bound).max())
    # LSE: skipping only drops mass, at most -log(1 - eps) of it (+ float32 rounding)
    drop = (dense_lse - lse).double()
    tol = 1e-5 * dense_lse.abs().double()
    assert bool((drop >= -tol).all()), float(drop.min())
    assert bool((drop <= -torch.log1p(-eps.clamp_max(0.999)).transpose(1, 2) + tol).all())
    if num_splits == 1:
        assert frac > 0.3, "the data are built to make most blocks skippable"
        # the float64 oracle of the same decisions (64-row votes, the kernel's blocks)
        oracle, _, st_ref = skip_softmax_attention(q.cpu(), *(p.to("cpu") for p in cache), table.cpu(), used.cpu(),
                                                   threshold_scale_factor=factor, tile_n=128)
        diff = (st.skipped.cpu() - st_ref.skipped).abs().sum()
        assert int(diff) <= 0.02 * int(st_ref.skipped.sum()) + 2, (st.skipped.cpu(), st_ref.skipped)
        assert torch.equal(st.blocks.cpu(), st_ref.blocks)
        o_err = rel_err(out.cpu(), oracle)
        print(f"     against the skipping oracle: {o_err:.2e}, skipped {int(st.skipped.sum())} (oracle "
              f"{int(st_ref.skipped.sum())})")
        assert o_err <= 2 * rel_err(dense, ref) + 1e-3


@pytest.mark.parametrize("seqlen_q,num_splits", [(4, 1), (8, 1), (8, None)])
def test_greedy_decisions_hold_at_the_default_threshold(poisoned, seqlen_q, num_splits):
    """Verification batches, GQA 8, at SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR: every position's greedy
    token and every accept length equal the dense packed-KV kernel's (unsplit, most blocks
    skipped)."""
    from fa4_tq.decode import SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR

    lens = [8192, 3000, 12000, 700, 5000, 4096, 16000, 2048]
    q, cache, table, used = _peaked(lens, seqlen_q, 32, 4, 128, 64, 4, 4, seed=seqlen_q)
    out, _, st = flash_attn_with_kvcache(q, cache, table, used, return_skip_stats=True, backend="inline",
                                         num_splits=num_splits,
                                         skip_softmax_threshold_scale_factor=SKIP_SOFTMAX_DEFAULT_SCALE_FACTOR)
    # the dense kernel the skipping one is built on (at <= 32 rows per KV head a dense call runs the
    # decode kernel, whose rounding may flip a near-tie on its own)
    from fa4_tq.decode import _run_split
    from fa4_tq.interface import _Problem

    prob = _Problem(q, *cache, len(lens), 128 ** -0.5, True, (None, None), seqused_k=used, page_table=table)
    dense, _ = _run_split(prob, num_splits, False)
    proj = torch.randn(32 * 128, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEV)
    dense_choice, _ = greedy_accept_lengths(dense, proj, torch.zeros(len(lens), seqlen_q, dtype=torch.long, device=DEV))
    drafts = dense_choice.clone()
    for b in range(len(lens)):
        drafts[b, b % seqlen_q] += 1
    choice, accepted = greedy_accept_lengths(out, proj, drafts)
    dense_choice, dense_accepted = greedy_accept_lengths(dense, proj, drafts)
    frac = float(st.skipped.sum() / st.blocks.sum())
    print(f"GREEDY q{seqlen_q} splits={num_splits}: skipped {frac:.0%} of blocks, out vs dense kernel {rel_err(out, dense):.2e}, "
          f"accepted {accepted.tolist()}")
    assert frac > 0.5 or num_splits != 1
    assert torch.equal(choice, dense_choice) and torch.equal(accepted, dense_accepted)


@pytest.mark.parametrize("seqlen_q,h,h_k,d,num_splits,bits", [
    (1, 32, 4, 128, 4, (4, 2)), (8, 64, 8, 128, None, (4, 2)), (4, 8, 8, 64, 1, (4, 2)), (1, 64, 8, 128, 1, (3, 8))])
def test_decode_tile_changes_nothing(poisoned, seqlen_q, h, h_k, d, num_splits, bits):
    """With q_len x GQA <= 64 the kernel runs a 64-row tile with one consumer warpgroup; on
    prefill's 128-row tile the second warpgroup works on padding rows. Both give the same output
    and LSE, bit for bit, with 2- to 8-bit V: each row sees the same blocks in the same order
    through the same 64-row wgmma."""
    from fa4_tq.decode import _run_split
    from fa4_tq.interface import _Problem
    from fa4_tq.kernels.launch import sm90_config

    kb, vb = bits
    tile_m, tile_n = sm90_config(d, kb, vb, seqlen_q * h // h_k, True)
    assert tile_m == 64
    gen = torch.Generator().manual_seed(seqlen_q)
    cache, table, used, _ = ragged_paged_cache([3000, 65, 1200], 64, h_k, d, gen, k_bits=kb, v_bits=vb, device=DEV)
    q = torch.randn(3, seqlen_q, h, d, generator=gen).to(torch.bfloat16).to(DEV)
    prob = _Problem(q, *cache, 3, d ** -0.5, True, (None, None), seqused_k=used, page_table=table)
    out, lse = _run_split(prob, num_splits, True)
    o, l = _run_split(prob, num_splits, True, _tiles=(128, tile_n))
    assert torch.equal(out, o) and torch.equal(lse, l)
    assert rel_err(out, attention_reference(q, *cache, page_table=table, seqused_k=used, causal=True,
                                            dtype=torch.float64)[0]) < 2e-2



# ----------------------------------------------------------------------------- the decode kernel
def _unwritten_poisoned(cache, table, used):
    """NaN scales and random bytes in every slot no sequence wrote (recycled pages look like that)."""
    k, v = cache
    page_size = k.data.shape[1]
    written = torch.zeros(k.data.shape[0] * page_size, dtype=torch.bool, device=DEV)
    for b, n in enumerate(used.tolist()):
        t = torch.arange(n, device=DEV)
        written[table[b, t // page_size].long() * page_size + t % page_size] = True
    written = written.view(k.data.shape[0], page_size)
    for x in (k, v):
        noise = torch.randint(0, 256, x.data.shape, dtype=torch.uint8, device=DEV)
        x.data.copy_(torch.where(written[:, :, None, None], x.data, noise))
        x.scales.copy_(torch.where(written[:, None, :], x.scales, torch.full_like(x.scales, float("nan"))))


DECODE_KERNEL_CASES = [  # (lens, seqlen_q, heads, kv_heads, d, page_size, bits, causal, num_splits)
    ([1, 700, 3000], 1, 32, 4, 128, 64, (4, 4), True, None),
    ([1, 700, 3000], 1, 32, 4, 128, 16, (2, 8), True, 5),
    ([1, 700, 3000], 1, 32, 4, 128, 128, (8, 2), True, 1),
    ([33, 4100], 1, 16, 2, 64, 64, (4, 4), True, None),  # head_dim 64
    ([33, 4100], 1, 16, 2, 64, 16, (8, 4), True, 64),  # more splits than a short sequence has keys
    ([70, 2100], 2, 16, 4, 128, 64, (4, 2), True, None),  # verification, 2 tokens x GQA 4
    ([70, 2100], 8, 4, 4, 128, 64, (2, 2), True, 3),  # verification, 8 tokens, MHA
    ([70, 2100], 8, 4, 4, 128, 64, (4, 4), False, None),
    ([5000], 1, 8, 8, 128, 128, (4, 4), True, None),  # GQA 1, batch 1
    # more than 8 rows a KV head: CTAs of two 8-row n-tiles, in row groups
    ([70, 2100], 4, 64, 8, 128, 64, (4, 4), True, None),  # 32 rows: 2 row groups
    ([70, 2100, 5], 4, 64, 8, 128, 16, (2, 8), True, 3),  # 32 rows, a 5-key sequence, pages of 16
    ([33, 4100], 3, 16, 4, 64, 64, (8, 4), True, None),  # 12 rows: one group, 4 padding rows
    ([70, 2100], 4, 16, 2, 128, 128, (8, 8), False, None),  # 32 rows, non-causal
    # 3-bit rows (head_dim 128), read whole
    ([1, 700, 3000], 1, 32, 4, 128, 64, (3, 3), True, None),
    ([1, 700, 3000], 1, 32, 4, 128, 16, (3, 8), True, 5),
    ([33, 4100], 1, 64, 8, 128, 128, (4, 3), True, 2),
    ([70, 2100, 5], 4, 64, 8, 128, 16, (3, 2), True, 3),  # 32 rows, a 5-key sequence, pages of 16
    ([70, 2100], 2, 16, 4, 128, 64, (2, 3), False, None),
]


@pytest.mark.parametrize("lens,seqlen_q,h,h_k,d,page_size,bits,causal,num_splits", DECODE_KERNEL_CASES)
def test_decode_kernel_against_the_reference_and_the_prefill_kernel(poisoned, lens, seqlen_q, h, h_k, d, page_size,
                                                                    bits, causal, num_splits):
    """The decode kernel (kernels/decode.py) runs these calls; unwritten slots hold NaN scales and
    random codes. Against the float64 reference (as _check), and at least as accurate as the
    packed-KV prefill kernel on the same cache (the path it replaced)."""
    from fa4_tq.decode import _run_split, decode_kernel_runs
    from fa4_tq.interface import _Problem

    kb, vb = bits
    gen = torch.Generator().manual_seed(len(lens) * 100 + seqlen_q)
    cache, table, used, _ = ragged_paged_cache(lens, page_size, h_k, d, gen, k_bits=kb, v_bits=vb,
                                               k_seed=5, v_seed=6, device=DEV)
    q = torch.randn(len(lens), seqlen_q, h, d, generator=gen).to(torch.bfloat16).to(DEV)
    # FA4 on the decoded pages (the yardstick) first: it multiplies masked keys' P = 0 by their
    # values, so NaN in unwritten slots reaches its output (page 128 = its tile, measured)
    base_out, base_lse = flash_attn_with_kvcache(q, cache, table, used, causal=causal, return_lse=True,
                                                 backend="decompress")
    _unwritten_poisoned(cache, table, used)
    prob = _Problem(q, *cache, len(lens), d ** -0.5, causal, (None, None), seqused_k=used, page_table=table)
    assert decode_kernel_runs(prob)
    out, lse = flash_attn_with_kvcache(q, cache, table, used, causal=causal, num_splits=num_splits,
                                       return_lse=True, backend="inline")
    ref, ref_lse = attention_reference(q, *cache, page_table=table, seqused_k=used, causal=causal,
                                       dtype=torch.float64)
    old, old_lse = _run_split(prob, num_splits, True)
    err, base = rel_err(out, ref), rel_err(base_out, ref)
    print(f"DECODE-KERNEL lens={lens} q{seqlen_q} h{h}/{h_k} d{d} page{page_size} K{kb}V{vb} splits={num_splits}: "
          f"out {err:.2e} (FA4 bf16 {base:.2e}, prefill kernel {rel_err(old, ref):.2e}) lse {rel_err(lse, ref_lse):.2e}")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert err <= 2 * base + 1e-3, (err, base)
    assert rel_err(lse, ref_lse) <= 2 * rel_err(base_lse, ref_lse) + 1e-3
    assert err <= rel_err(old, ref) + 1e-3  # at least as accurate as the path it replaced


def test_decode_kernel_takes_only_what_it_supports():
    """Dense calls of <= 32 rows per KV head at 2/4/8 bits and head_dim 64/128, and with 3-bit
    codes at head_dim 128, run the decode kernel; more rows, 3-bit codes at head_dim 64 and head_dim
    64 with 2-bit V (2-byte lane slices) do not."""
    from fa4_tq.decode import decode_kernel_runs
    from fa4_tq.interface import _Problem

    def runs(seqlen_q, h, h_k, d, kb, vb):
        gen = torch.Generator().manual_seed(0)
        cache, table, used, _ = ragged_paged_cache([40], 16, h_k, d, gen, k_bits=kb, v_bits=vb, device=DEV)
        q = torch.zeros(1, seqlen_q, h, d, dtype=torch.bfloat16, device=DEV)
        return decode_kernel_runs(_Problem(q, *cache, 1, 1.0, True, (None, None), seqused_k=used, page_table=table))

    assert runs(1, 16, 2, 128, 4, 4) and runs(8, 4, 4, 128, 8, 2) and runs(1, 8, 1, 64, 4, 4)
    assert runs(2, 16, 2, 128, 4, 4) and runs(4, 64, 8, 128, 2, 2)  # 16 and 32 rows
    assert runs(1, 16, 2, 128, 3, 4) and runs(1, 16, 2, 128, 8, 3) and runs(4, 64, 8, 128, 3, 3)
    assert not runs(8, 64, 8, 128, 4, 4) and not runs(1, 8, 1, 64, 4, 2)
    assert not runs(1, 8, 1, 64, 3, 4) and not runs(1, 8, 1, 64, 4, 3)


# ----------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("seqlen_q,skip,in_kernel", [(1, False, False), (4, False, False), (8, False, False),
                                                     (4, True, False), (1, False, True), (4, False, True)])
def test_a_decode_step_replays_in_a_cuda_graph(poisoned, monkeypatch, seqlen_q, skip, in_kernel):
    """Serving engines capture the decode step once and replay it with new contents in the same
    buffers (q, seqused_k, the page table). With ``check_indices=False`` the call must capture
    (no host sync, no host-to-device copy) and each replay must equal an eager call on the
    replay's inputs bit for bit: the decode kernel and its combine (seqlen_q 1 and 4 at GQA 8),
    the packed-KV kernel's split launches (seqlen_q 8: 64 rows) and skip-softmax; and the decode
    kernel merging its own splits (``in_kernel``: its tickets are captured with it)."""
    import fa4_tq.decode as dec

    monkeypatch.setattr(dec, "DECODE_COMBINE_IN_KERNEL", in_kernel)
    q, cache, table, used = _peaked([3000, 70, 1200], seqlen_q, 32, 4, 128, 64, 4, 4, seed=3)
    q_buf, used_buf, table_buf = q.clone(), used.clone(), table.clone()
    kw = dict(return_lse=True, check_indices=False, backend="inline")
    if skip:
        kw["skip_softmax_threshold_scale_factor"] = 1.0

    def step():
        return flash_attn_with_kvcache(q_buf, cache, table_buf, used_buf, **kw)

    side = torch.cuda.Stream()  # warm-up (compiles, per-device constants) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = step()
    gen = torch.Generator().manual_seed(4)
    for new_used in ([2990, 64, 1200], [17, 70, 901]):  # shorter contexts on the same pages
        q_buf.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        used_buf.copy_(torch.tensor(new_used, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        out_e, lse_e = step()
        assert torch.isfinite(out_g).all()
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e), new_used
        ref, _ = attention_reference(q_buf, *cache, page_table=table_buf, seqused_k=used_buf, causal=True,
                                     dtype=torch.float64)
        assert rel_err(out_g, ref) < 2e-2  # the replay read the new inputs (the old ones: error ~1)
