"""On a Blackwell GPU (SM 10.x): the SM100 packed-KV kernel (``fa4_tq/kernels/sm100.py``, chosen
by ``backend="inline"``) against the float64 reference on the same packed K/V, with FA4's own
bf16 error on the same cache as the yardstick (as tests/test_gpu_inline.py does on Hopper); and
the SM100 MLA prefill (``mla/sm100.py``, ``backend="kernel"``) with the checks
tests/test_gpu_mla.py runs on Hopper (``helpers.check_mla_prefill``).

No Blackwell GPU was available to the project: these tests have never run. They skip on any
other GPU; ``scripts/bench_b200.sh`` runs them first."""

import itertools

import pytest
import torch

from fa4_tq import attention_reference, compress, flash_attn_func, flash_attn_with_kvcache
from helpers import bf16_baseline_err, check_mla_prefill, ragged_paged_cache, realistic_kv, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 10,
                       reason="needs a Blackwell (SM 10.x) GPU"),
]
DEV = "cuda"
BITS = (2, 3, 4, 8)


def _check_paged(lens, seqlen_q, h, h_k, d, page_size, k_bits, v_bits, causal=True, tag=""):
    gen = torch.Generator().manual_seed(hash((tuple(lens), seqlen_q, d, k_bits, v_bits)) % 2**31)
    cache, table, used, _ = ragged_paged_cache(lens, page_size, h_k, d, gen, k_bits=k_bits, v_bits=v_bits,
                                               device=DEV)
    q = torch.randn(len(lens), seqlen_q, h, d, generator=gen).to(torch.bfloat16).to(DEV)
    out, lse = flash_attn_with_kvcache(q, cache, table, used, causal=causal, num_splits=1, return_lse=True,
                                       backend="inline")
    ref, ref_lse = attention_reference(q, *cache, page_table=table, seqused_k=used, causal=causal,
                                       dtype=torch.float64)
    base, base_lse = flash_attn_with_kvcache(q, cache, table, used, causal=causal, return_lse=True,
                                             backend="decompress")
    err, yard = rel_err(out, ref), rel_err(base, ref)
    lse_err, lse_yard = rel_err(lse, ref_lse), rel_err(base_lse, ref_lse)
    print(f"SM100 {tag} K{k_bits}V{v_bits} d{d}: out {err:.2e} (FA4 bf16 {yard:.2e}) lse {lse_err:.2e}")
    assert err <= 2 * yard + 1e-3 and lse_err <= 2 * lse_yard + 1e-3


@pytest.mark.parametrize("k_bits,v_bits", list(itertools.product(BITS, BITS)))
def test_every_bit_pair_paged_hdim128(poisoned, k_bits, v_bits):
    _check_paged([1, 700, 3000], 16, 32, 4, 128, 64, k_bits, v_bits, tag="paged")


@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (2, 8), (8, 2), (3, 3)])
def test_head_dim_64(poisoned, k_bits, v_bits):
    _check_paged([500, 129], 8, 16, 4, 64, 16, k_bits, v_bits, tag="d64")


def test_non_causal_and_mha(poisoned):
    _check_paged([300, 2000], 4, 8, 8, 128, 128, 4, 2, causal=False, tag="mha")


@pytest.mark.parametrize("causal", [True, False])
def test_batch_layout_prefill(poisoned, causal):
    gen = torch.Generator().manual_seed(int(causal))
    q = torch.randn(2, 300, 8, 128, generator=gen).to(torch.bfloat16).to(DEV)
    k = compress(realistic_kv((2, 300, 2, 128), generator=gen).to(DEV), 4, seed=1)
    v = compress(torch.randn(2, 300, 2, 128, generator=gen).to(DEV), 4, seed=2)
    out, _ = flash_attn_func(q, k, v, causal=causal, backend="inline")
    ref, _ = attention_reference(q, k, v, causal=causal, dtype=torch.float64)
    base, _ = bf16_baseline_err(q, k.decompress(), v.decompress(), causal, (None, None))
    assert rel_err(out, ref) <= 2 * base + 1e-3


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
@pytest.mark.parametrize("heads", [16, 64, 128])
@pytest.mark.parametrize("page_size", [64, 128])
def test_mla_prefill_matches_reference(poisoned, bits, heads, page_size):
    # chunked prefill (queries are the last tokens of longer contexts), ragged, one tiny sequence
    check_mla_prefill([70, 200, 1], [300, 200, 65], heads, page_size, bits, tag=" SM100")


@pytest.mark.parametrize("bits", [None, 3, 4])
def test_mla_non_causal_long_and_empty_rows(poisoned, bits):
    check_mla_prefill([40, 3], [1000, 2000], 16, 64, bits, causal=False, tag=" SM100")
    check_mla_prefill([700], [2300], 128, 128, bits, tag=" SM100")
    check_mla_prefill([100, 5, 0], [60, 0, 64], 16, 64, bits, tag=" SM100")
