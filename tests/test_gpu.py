"""On a CUDA GPU: the "decompress + FA4" backend against the float32 reference on the same
packed K/V. Outputs are poisoned first so an unwritten element cannot pass."""

import pytest
import torch

from fa4_tq import attention_reference, compress, flash_attn_func, flash_attn_varlen_func
from helpers import bf16_baseline_err, paged_problem, realistic_kv, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("kbits,vbits", [(4, 4), (2, 8), (3, 3), (8, 2)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,window", [(True, (None, None)), (False, (None, None)), (False, (64, 32))])
@pytest.mark.parametrize("heads,kv_heads,sq,sk", [(8, 2, 256, 256), (4, 4, 100, 300), (8, 1, 64, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decompress_backend_matches_reference(poisoned, kbits, vbits, d, causal, window, heads, kv_heads, sq, sk, dtype):
    gen = torch.Generator().manual_seed(kbits * 10 + vbits + d + sq)
    q = torch.randn(2, sq, heads, d, generator=gen).to(dtype).to(DEV)
    k_raw = realistic_kv((2, sk, kv_heads, d), generator=gen)
    v_raw = torch.randn(2, sk, kv_heads, d, generator=gen)
    k, v = compress(k_raw.to(DEV), kbits, seed=1), compress(v_raw.to(DEV), vbits, seed=2)
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True, backend="decompress")
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, dtype=torch.float64)
    err = rel_err(out, ref)
    base, base_lse = bf16_baseline_err(q, k.decompress(), v.decompress(), causal, window)
    assert err <= 2 * base + 1e-3, (err, base)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    lse_err = rel_err(lse[fin], ref_lse[fin])
    assert lse_err <= 2 * base_lse + 1e-3, (lse_err, base_lse)
    print(f"ERRS k{kbits}v{vbits} d{d} {dtype} causal={causal} window={window} h{heads}/{kv_heads} "
          f"sq{sq} sk{sk}: out {err:.2e} (FA4 bf16 {base:.2e}) lse {lse_err:.2e} (FA4 {base_lse:.2e})")


@pytest.mark.parametrize("page_size", [128, 64, 16])
def test_decompress_backend_paged_varlen(poisoned, page_size):
    q, kp, vp, args = paged_problem(page_size, 128, torch.Generator().manual_seed(page_size), DEV)
    out, lse = flash_attn_varlen_func(q, kp, vp, max_seqlen_q=200, **args, return_lse=True, backend="decompress")
    ref, ref_lse = attention_reference(q, kp, vp, **args, dtype=torch.float64)
    err, lse_err = rel_err(out, ref), rel_err(lse, ref_lse)
    print(f"ERRS paged page_size={page_size}: out {err:.2e} lse {lse_err:.2e}")
    assert err < 1.5e-2 and lse_err < 3e-3


def test_auto_backend_on_hopper_is_inline():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 128, 4, 128, generator=gen).to(torch.bfloat16).to(DEV)
    k = compress(torch.randn(1, 128, 4, 128, generator=gen).to(DEV), 4)
    a, _ = flash_attn_func(q, k, k, causal=True)
    b, _ = flash_attn_func(q, k, k, causal=True, backend="inline")
    assert torch.equal(a, b)


def test_inline_rejects_head_dim_512_clearly():
    q = torch.randn(1, 64, 2, 512).to(torch.bfloat16).to(DEV)
    k = compress(torch.randn(1, 64, 2, 512).to(DEV), 4)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_func(q, k, k, backend="inline")
