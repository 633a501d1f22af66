"""On an SM90 GPU: mla.flash_mla_prefill's kernel against the float64 reference on the same paged
cache, for heads 16/64/128, pages of 64/128, a bf16 latent and 2/4/8-bit packed latents, causal
chunked prefill with ragged lengths. Outputs start as NaN (``poisoned``).

The yardstick is a plain PyTorch bf16 attention (``mla.reference.attention_bf16``: bf16 matmuls,
P rounded to bf16) on the same decoded cache, measured against the same float64 reference: ours
must stay within 2x of its error + 1e-3."""

import pytest
import torch

import mla
from fa4_tq import PackedKV
from mla.reference import attention_bf16
from helpers import realistic_kv, rel_err, shuffled_pages

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]  # the SM90 kernels (conftest skips them elsewhere)
DEV = "cuda"


def mla_problem(lens_q, lens_k, heads, page_size, bits, gen, *, seed=3):
    """A shuffled-page MLACache holding ``lens_k`` tokens per sequence (latent with heavy-tailed
    channels) and queries for the last ``lens_q`` of them; returns the call's arguments."""
    num_pages, table, slots = shuffled_pages(lens_k, page_size, gen, spare=3)
    cache = mla.MLACache(1, num_pages, page_size, bits=bits, seed=seed, device=DEV)
    total_k = sum(lens_k)
    c_kv = realistic_kv((total_k, 512), generator=gen)
    k_pe = torch.randn(total_k, 64, generator=gen)
    cache.write(0, c_kv.to(torch.bfloat16).to(DEV), k_pe.to(torch.bfloat16).to(DEV),
                torch.tensor(slots, dtype=torch.int32, device=DEV))
    total_q = sum(lens_q)
    q_nope = (torch.randn(total_q, heads, 512, generator=gen) / 8).to(torch.bfloat16).to(DEV)
    q_pe = torch.randn(total_q, heads, 64, generator=gen).to(torch.bfloat16).to(DEV)
    cu = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    latent, rope = cache.layer(0)
    return (q_nope, q_pe, latent, rope, table.to(DEV), cu, torch.tensor(lens_k, dtype=torch.int32, device=DEV))


def bf16_yardstick(args, causal, scale):
    q_nope, q_pe, latent, rope, table, cu, used = args
    lat = latent.decompress(torch.float32) if isinstance(latent, PackedKV) else latent.float()
    outs = []
    for b in range(cu.numel() - 1):
        n = int(used[b])
        pages = table[b, : -(-n // rope.shape[1])].long()
        c = lat[pages].reshape(-1, 512)[:n].to(torch.bfloat16)
        k = torch.cat([c, rope[pages].reshape(-1, 64)[:n]], -1)
        q = torch.cat([q_nope, q_pe], -1)[int(cu[b]) : int(cu[b + 1])]
        outs.append(attention_bf16(q, k, c, softmax_scale=scale, causal=causal))
    return torch.cat(outs, 0)


def _check(lens_q, lens_k, heads, page_size, bits, *, causal=True):
    gen = torch.Generator().manual_seed(hash((tuple(lens_q), tuple(lens_k), heads, page_size, bits)) % 2**31)
    args = mla_problem(lens_q, lens_k, heads, page_size, bits, gen)
    scale = 576 ** -0.5
    out, lse = mla.flash_mla_prefill(*args, causal=causal, return_lse=True, backend="kernel")
    ref, ref_lse = mla.mla_reference(*args, causal=causal, dtype=torch.float64)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "rows with no key must get LSE -inf"
    assert not out[~fin.T].any(), "rows with no key must get output 0"
    err, lse_err = rel_err(out, ref), rel_err(lse[fin], ref_lse[fin])
    base = rel_err(bf16_yardstick(args, causal, scale), ref)
    print(f"ERRS lens_q={lens_q[:4]} lens_k={lens_k[:4]} h{heads} page{page_size} bits={bits} causal={causal}: "
          f"out {err:.2e} (PyTorch bf16 {base:.2e}) lse {lse_err:.2e}")
    assert err <= 2 * base + 1e-3, (err, base)
    assert lse_err <= 1e-3, lse_err


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
@pytest.mark.parametrize("heads", [16, 64, 128])
@pytest.mark.parametrize("page_size", [64, 128])
def test_mla_prefill_matches_reference(poisoned, bits, heads, page_size):
    # chunked prefill (queries are the last tokens of longer contexts), ragged, one tiny sequence
    _check([70, 200, 1], [300, 200, 65], heads, page_size, bits)


@pytest.mark.parametrize("bits", [None, 4])
def test_mla_non_causal_and_long(poisoned, bits):
    _check([40, 3], [1000, 2000], 16, 64, bits, causal=False)
    _check([700], [2300], 128, 128, bits)


def test_mla_rows_without_keys(poisoned):
    """Causal with more queries than keys: the first rows see nothing (output 0, LSE -inf);
    a sequence with no keys at all; one with no queries."""
    _check([100, 5, 0], [60, 0, 64], 16, 64, 4)


def test_mla_3bit_latent(poisoned):
    _check([130], [400], 64, 64, 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mla_cache_write_kernel_matches_the_codec(bits):
    """MLACache.write through the cache-write kernel stores what the reference codec stores
    (codes may differ on near-ties only: adjacent codes, a handful), RoPE keys bit for bit, and
    leaves padding slots untouched."""
    gen = torch.Generator().manual_seed(bits)
    n = 1000
    c_kv = realistic_kv((n, 512), generator=gen).to(torch.bfloat16).to(DEV)
    k_pe = torch.randn(n, 64, generator=gen).to(torch.bfloat16).to(DEV)
    slots = torch.randperm(2048, generator=gen)[:n].to(torch.int32)
    slots[::97] = -1
    slots = slots.to(DEV)
    caches = []
    for backend in ("kernel", "reference"):
        cache = mla.MLACache(1, 32, 64, bits=bits, device=DEV)
        cache.write(0, c_kv, k_pe, slots, backend=backend)
        caches.append(cache.layer(0))
    (lat_k, rope_k), (lat_r, rope_r) = caches
    assert torch.equal(rope_k, rope_r)
    idx_k, idx_r = lat_k.indices(), lat_r.indices()
    diff = idx_k != idx_r
    print(f"bits={bits}: {int(diff.sum())} of {idx_k.numel()} codes differ (near-ties)")
    assert int(diff.sum()) <= idx_k.numel() * 1e-4
    assert ((idx_k - idx_r)[diff].abs() == 1).all()
    assert torch.allclose(lat_k.scales.float(), lat_r.scales.float(), rtol=2e-3, atol=0)
    untouched = torch.ones(2048, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0].long()] = False
    assert not lat_k.data.reshape(2048, -1)[untouched].any() and not rope_k.reshape(2048, -1)[untouched].any()


def test_mla_rotated_space_skips_the_rotations(poisoned):
    """The kernel with rotated_space=True (no q/o GEMMs) returns R times the plain call's output."""
    from fa4_tq.codec import rotate

    gen = torch.Generator().manual_seed(5)
    args = mla_problem([100], [300], 64, 64, 4, gen)
    q_nope, rest = args[0], args[1:]
    plain = mla.flash_mla_prefill(*args, backend="kernel")
    seed = args[2].seed
    out_rot = mla.flash_mla_prefill(rotate(q_nope.float(), seed).to(torch.bfloat16), *rest, backend="kernel",
                                    rotated_space=True)
    err = rel_err(out_rot, rotate(plain.double(), seed))
    print(f"ERRS rotated_space: {err:.2e}")
    assert err < 1e-2
