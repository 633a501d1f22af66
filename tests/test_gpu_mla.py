"""On an SM90 GPU: mla.flash_mla_prefill's kernel against the float64 reference on the same paged
cache, for heads 16/64/128, pages of 64/128, a bf16 latent and 2/4/8-bit packed latents, causal
chunked prefill with ragged lengths. Outputs start as NaN (``poisoned``).

The yardstick is a plain PyTorch bf16 attention (``mla.reference.attention_bf16``: bf16 matmuls,
P rounded to bf16) on the same decoded cache, measured against the same float64 reference: ours
must stay within 2x of its error + 1e-3 (``helpers.check_mla_prefill``)."""

import pytest
import torch

import mla
from helpers import check_mla_prefill, mla_problem, realistic_kv, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]  # the SM90 kernels (conftest skips them elsewhere)
DEV = "cuda"


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
@pytest.mark.parametrize("heads", [16, 64, 128])
@pytest.mark.parametrize("page_size", [64, 128])
def test_mla_prefill_matches_reference(poisoned, bits, heads, page_size):
    # chunked prefill (queries are the last tokens of longer contexts), ragged, one tiny sequence
    check_mla_prefill([70, 200, 1], [300, 200, 65], heads, page_size, bits)


@pytest.mark.parametrize("bits", [None, 4, 8])  # 8: the paired-CTA kernel
def test_mla_non_causal_and_long(poisoned, bits):
    check_mla_prefill([40, 3], [1000, 2000], 16, 64, bits, causal=False)
    check_mla_prefill([700], [2300], 128, 128, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_mla_rows_without_keys(poisoned, bits):
    """Causal with more queries than keys: the first rows see nothing (output 0, LSE -inf);
    a sequence with no keys at all; one with no queries. At 8 bits a pair of CTAs walks the
    union of its key ranges, so a tile whose rows see nothing still reads its peer's blocks."""
    check_mla_prefill([100, 5, 0], [60, 0, 64], 16, 64, bits)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mla_unwritten_slots_are_never_read(poisoned, bits):
    """Slots past each sequence's end in its last page hold NaN: a kernel that let them into a
    masked product (P = 0 times NaN) would return NaN. Partial last blocks at both page sizes."""
    check_mla_prefill([30, 100], [100, 300], 64, 64, bits, poison_unwritten=True)
    check_mla_prefill([50], [190], 16, 128, bits, poison_unwritten=True)


def test_mla_3bit_latent(poisoned):
    check_mla_prefill([130], [400], 64, 64, 3)


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
