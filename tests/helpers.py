"""Shared test helpers."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere fails loudly."""
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(a64).all(), "non-finite values in the result"
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def realistic_kv(shape, *, generator=None, outlier_channels=4, outlier_scale=20.0, bias=3.0):
    """Key-like data: Gaussian with a few channels much larger (heavy-tailed) and a channel bias."""
    x = torch.randn(*shape, generator=generator)
    d = shape[-1]
    idx = torch.randperm(d, generator=generator)[:outlier_channels]
    x[..., idx] *= outlier_scale
    x[..., idx[0]] += bias * outlier_scale
    return x


def bf16_baseline_err(q, k, v, causal, window):
    """FA4's own error as a bf16 attention: FA4 on the bf16-rounded K/V against the float64
    answer on the unrounded K/V. Ours is measured the same way (its bf16 tiles are rounded from
    the float32 decoded vectors), so the two numbers are comparable."""
    from flash_attn.cute import flash_attn_func as fa4
    from fa4_tq.reference import attention_dense_batched

    out, lse = fa4(q, k.to(q.dtype), v.to(q.dtype), causal=causal, window_size=window, return_lse=True)
    ref, ref_lse = attention_dense_batched(q, k, v, causal=causal, window_size=window)
    fin = torch.isfinite(ref_lse)
    return rel_err(out, ref), rel_err(lse[fin], ref_lse[fin])
