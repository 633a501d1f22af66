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
