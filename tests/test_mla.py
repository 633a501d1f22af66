"""mla on the CPU: the reference against an independent dense computation, the cache write, the
chunked-prefill semantics, and the input checks."""

import math

import pytest
import torch

import mla
from fa4_tq import PackedKV, compress
from helpers import realistic_kv, rel_err, shuffled_pages

GEN = torch.Generator().manual_seed(11)


def _cache(lens_k, page_size=64, bits=4, shuffle=True):
    num_pages, table, slots = shuffled_pages(lens_k, page_size, GEN, perm=shuffle)
    cache = mla.MLACache(1, num_pages, page_size, bits=bits, seed=2)
    c_kv = realistic_kv((sum(lens_k), 512), generator=GEN).to(torch.bfloat16)
    k_pe = torch.randn(sum(lens_k), 64, generator=GEN).to(torch.bfloat16)
    cache.write(0, c_kv, k_pe, torch.tensor(slots, dtype=torch.int32))
    return cache, table, c_kv, k_pe


def _queries(lens_q, heads):
    total = sum(lens_q)
    q_nope = (torch.randn(total, heads, 512, generator=GEN) / 8).to(torch.bfloat16)
    q_pe = torch.randn(total, heads, 64, generator=GEN).to(torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    return q_nope, q_pe, cu


@pytest.mark.parametrize("bits", [None, 4])
def test_reference_equals_dense_mqa_attention(bits):
    """Per sequence, the paged reference is softmax(scale [q_nope q_pe] [c k_pe]^T) c with the
    bottom-right causal mask, over the cache's decoded latent, computed here densely."""
    lens_q, lens_k, heads = [5, 64, 1], [70, 64, 129], 4
    cache, table, c_kv, k_pe = _cache(lens_k, bits=bits)
    q_nope, q_pe, cu = _queries(lens_q, heads)
    latent, rope = cache.layer(0)
    used = torch.tensor(lens_k, dtype=torch.int32)
    out, lse = mla.mla_reference(q_nope, q_pe, latent, rope, table, cu, used, dtype=torch.float64)
    # the stored latent, decoded token by token in write order
    if bits is None:
        dec = c_kv.double()
    else:
        dec = compress(c_kv.unsqueeze(1), bits, seed=2).decompress(torch.float64).squeeze(1)
    scale = 1 / math.sqrt(576)
    k0 = 0
    for b in range(3):
        n, m = lens_k[b], lens_q[b]
        c, kp = dec[k0:k0 + n], k_pe[k0:k0 + n].double()
        q = torch.cat([q_nope, q_pe], -1)[int(cu[b]):int(cu[b + 1])].double()
        s = torch.einsum("qhd,kd->hqk", q, torch.cat([c, kp], -1)) * scale
        keep = torch.arange(n).view(1, -1) <= torch.arange(m).view(-1, 1) + n - m
        s = s.masked_fill(~keep, -math.inf)
        want = torch.einsum("hqk,kd->qhd", torch.softmax(s, -1), c)
        assert rel_err(out[int(cu[b]):int(cu[b + 1])], want) < 1e-12
        assert rel_err(lse[:, int(cu[b]):int(cu[b + 1])], torch.logsumexp(s, -1)) < 1e-12
        k0 += n


def test_chunked_prefill_equals_the_tail_of_a_full_prefill():
    """Queries that start after cached tokens see exactly what the same rows of one prefill of the
    whole sequence see."""
    cache, table, _, _ = _cache([150])
    latent, rope = cache.layer(0)
    used = torch.tensor([150], dtype=torch.int32)
    q_nope, q_pe, cu = _queries([150], 2)
    full = mla.flash_mla_prefill(q_nope, q_pe, latent, rope, table, cu, used)
    tail = mla.flash_mla_prefill(q_nope[100:], q_pe[100:], latent, rope, table,
                                 torch.tensor([0, 50], dtype=torch.int32), used)
    assert torch.equal(tail, full[100:])


def test_rows_without_keys_get_zero_and_minus_inf():
    cache, table, _, _ = _cache([3, 64])
    latent, rope = cache.layer(0)
    q_nope, q_pe, cu = _queries([6, 0], 2)
    out, lse = mla.flash_mla_prefill(q_nope, q_pe, latent, rope, table, cu,
                                     torch.tensor([3, 0], dtype=torch.int32), return_lse=True)
    assert torch.isinf(lse[:, :3]).all() and (lse[:, :3] < 0).all() and not out[:3].any()
    assert torch.isfinite(lse[:, 3:]).all()


@pytest.mark.parametrize("bits", [None, 2, 3, 4, 8])
def test_cache_write_stores_what_compress_makes(bits):
    cache, table, c_kv, k_pe = _cache([100], bits=bits, shuffle=False)
    latent, rope = cache.layer(0)
    assert torch.equal(rope.reshape(-1, 64)[:100], k_pe)
    if bits is None:
        assert torch.equal(latent.reshape(-1, 512)[:100], c_kv)
    else:
        ref = compress(c_kv.unsqueeze(1), bits, seed=2)
        assert isinstance(latent, PackedKV) and latent.shape == (cache.num_pages, 64, 1, 512)
        assert torch.equal(latent.data.reshape(-1, 1, latent.row_bytes)[:100], ref.data)
        assert torch.equal(latent.scales.transpose(1, 2).reshape(-1, 1)[:100], ref.scales.transpose(0, 1))


def test_cache_write_skips_padding_slots():
    cache = mla.MLACache(1, 2, 64, bits=4)
    c_kv, k_pe = torch.randn(3, 512).to(torch.bfloat16), torch.randn(3, 64).to(torch.bfloat16)
    cache.write(0, c_kv, k_pe, torch.tensor([5, -1, 70], dtype=torch.int64))
    latent, rope = cache.layer(0)
    flat = rope.reshape(-1, 64)
    assert torch.equal(flat[5], k_pe[0]) and torch.equal(flat[70], k_pe[2])
    written = torch.zeros(128, dtype=torch.bool)
    written[[5, 70]] = True
    assert not flat[~written].any() and not latent.data.reshape(128, -1)[~written].any()


def test_cache_nbytes_and_packed_size():
    packed, plain = mla.MLACache(2, 4, 64, bits=4), mla.MLACache(2, 4, 64, bits=None)
    slots = 2 * 4 * 64
    assert plain.nbytes == slots * (512 + 64) * 2
    assert packed.nbytes == slots * (256 + 2 + 64 * 2)
    assert "4-bit" in repr(packed) and "bf16" in repr(plain)


def _good():
    cache, table, _, _ = _cache([70])
    latent, rope = cache.layer(0)
    q_nope, q_pe, cu = _queries([70], 2)
    return dict(q_nope=q_nope, q_pe=q_pe, latent_cache=latent, rope_cache=rope, page_table=table,
                cu_seqlens_q=cu, seqused_k=torch.tensor([70], dtype=torch.int32))


@pytest.mark.parametrize("change,exc,match", [
    (dict(q_nope=lambda a: a["q_nope"].float()), TypeError, "q_nope must be torch.bfloat16"),
    (dict(q_nope=lambda a: a["q_nope"][..., :256]), ValueError, r"q_nope must be \[total_q, heads, 512\]"),
    (dict(q_pe=lambda a: a["q_pe"][:, :1]), ValueError, "must share"),
    (dict(rope_cache=lambda a: a["rope_cache"].float()), ValueError, "rope_cache must be a bf16"),
    (dict(latent_cache=lambda a: a["latent_cache"].data), ValueError, "plain latent_cache must be bf16"),
    (dict(latent_cache=lambda a: [1]), TypeError, "latent_cache must be a fa4_tq.PackedKV"),
    (dict(page_table=lambda a: a["page_table"].long()), TypeError, "page_table must be torch.int32"),
    (dict(page_table=lambda a: a["page_table"] + 1000), ValueError, r"page_table\[0, 0\]"),
    (dict(seqused_k=lambda a: torch.tensor([1000], dtype=torch.int32)), ValueError, "seqused_k must lie"),
    (dict(cu_seqlens_q=lambda a: torch.tensor([0, 5], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (dict(softmax_scale=lambda a: -1.0), ValueError, "softmax_scale"),
    (dict(backend=lambda a: "cuda"), ValueError, "backend must be one of"),
    (dict(backend=lambda a: "kernel"), ValueError, "backend='kernel' cannot run"),
    (dict(max_seqlen_q=lambda a: 10), ValueError, "shorter than the longest query run"),
    (dict(max_seqlen_q=lambda a: 2.5), ValueError, "max_seqlen_q must be an int"),
])
def test_bad_inputs_are_named(change, exc, match):
    args = _good()
    for key, fn in change.items():
        args[key] = fn(args)
    with pytest.raises(exc, match=match):
        mla.flash_mla_prefill(**args)


def test_page_size_must_be_a_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64"):
        mla.MLACache(1, 4, 32)
    args = _good()
    args["rope_cache"] = args["rope_cache"].reshape(-1, 32, 1, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        mla.flash_mla_prefill(**args)


def test_cache_write_checks():
    cache = mla.MLACache(1, 2, 64)
    c, k, s = torch.zeros(2, 512), torch.zeros(2, 64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"c_kv must be \[num_tokens, 512\]"):
        cache.write(0, c[:, :10], k, s)
    with pytest.raises(ValueError, match="slot_mapping values"):
        cache.write(0, c, k, torch.tensor([0, 128]))
    with pytest.raises(ValueError, match="layer must be"):
        cache.write(1, c, k, s)
    with pytest.raises(TypeError, match="slot_mapping must be torch.int32"):
        cache.write(0, c, k, s.float())


def test_bf16_baseline_handles_empty_sequences():
    from mla.reference import attention_bf16

    q = torch.zeros(0, 4, 576, dtype=torch.bfloat16)
    assert attention_bf16(q, torch.zeros(5, 576, dtype=torch.bfloat16), torch.zeros(5, 512, dtype=torch.bfloat16),
                          softmax_scale=0.1, causal=True).shape == (0, 4, 512)
    q = torch.randn(3, 4, 576).to(torch.bfloat16)
    out = attention_bf16(q, torch.zeros(0, 576, dtype=torch.bfloat16), torch.zeros(0, 512, dtype=torch.bfloat16),
                         softmax_scale=0.1, causal=True)
    assert out.shape == (3, 4, 512) and not out.any()


def test_rotated_space_is_the_rotated_problem():
    """rotated_space=True takes R q_nope and returns R out (R folded into a model's projections)."""
    from fa4_tq.codec import rotate

    cache, table, _, _ = _cache([90])
    latent, rope = cache.layer(0)
    q_nope, q_pe, cu = _queries([90], 2)
    used = torch.tensor([90], dtype=torch.int32)
    R = mla.latent_rotation(latent, torch.float64)
    assert torch.allclose(R @ R.T, torch.eye(512, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rotate(q_nope.double(), latent.seed), q_nope.double() @ R.T, atol=1e-12)
    plain = mla.flash_mla_prefill(q_nope, q_pe, latent, rope, table, cu, used)
    q_rot = rotate(q_nope.float(), latent.seed).to(torch.bfloat16)
    out_rot = mla.flash_mla_prefill(q_rot, q_pe, latent, rope, table, cu, used, rotated_space=True)
    assert rel_err(out_rot, rotate(plain.double(), latent.seed)) < 1e-2
    with pytest.raises(ValueError, match="rotated_space=True is for a packed latent"):
        bf = _cache([90], bits=None)[0].layer(0)
        mla.flash_mla_prefill(q_nope, q_pe, *bf, table, cu, used, rotated_space=True)


@pytest.mark.parametrize("capability,heads,explicit,want", [
    ((9, 0), 48, False, None),
    ((10, 0), 128, True, None),
    ((10, 0), 128, False, "never run"),  # "auto" does not pick the compile-checked-only SM100 kernel
    ((10, 0), 48, True, "heads must divide 128"),
    ((8, 0), 16, True, "SM90"),
])
def test_which_gpus_the_kernel_serves(monkeypatch, capability, heads, explicit, want):
    """The dispatch rule, with the GPU's capability stubbed: Hopper always; Blackwell only when the
    kernel is asked for by name (it has never run), and only for head counts FA4's 2-CTA MLA tiles;
    nothing else."""
    from mla.interface import _kernel_unavailable

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    why = _kernel_unavailable(torch.device("cuda"), heads, explicit=explicit)
    if want is None:
        assert why is None
    else:
        assert why is not None and want in why


@pytest.mark.parametrize("which", ["rope_cache", "latent_cache"])
def test_pages_must_be_16_byte_aligned(which):
    """Whole bf16 blocks are loaded by TMA, whose page stride must be a multiple of 16 bytes: a
    cache carved from a larger buffer with an odd page stride is refused by name."""
    cache, table, _, _ = _cache([70], bits=None)
    latent, rope = cache.layer(0)
    q_nope, q_pe, cu = _queries([70], 2)
    args = dict(q_nope=q_nope, q_pe=q_pe, latent_cache=latent, rope_cache=rope, page_table=table,
                cu_seqlens_q=cu, seqused_k=torch.tensor([70], dtype=torch.int32))
    t = args[which]
    pages, page_size, _, d = t.shape
    buf = torch.zeros(pages * (page_size * d + 4), dtype=t.dtype)
    args[which] = torch.as_strided(buf, t.shape, (page_size * d + 4, d, d, 1))
    with pytest.raises(ValueError, match=f"{which} rows and pages must be contiguous and 16-byte aligned"):
        mla.flash_mla_prefill(**args)
