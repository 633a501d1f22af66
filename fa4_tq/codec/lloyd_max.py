"""Lloyd-Max quantiser of the standard normal, computed by Lloyd iteration.

This is how the codebook literals in ``codebook.py`` were produced; a test recomputes them.
Only the standard library and torch (float64) are used, so the computation is exact to ~1e-12.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lloyd_max_normal", "lloyd_max_mse"]


def _pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))


def lloyd_max_normal(bits: int, *, tol: float = 1e-10, max_iter: int = 200_000) -> torch.Tensor:
    """The 2**bits Lloyd-Max centroids of N(0, 1), ascending, float64.

    Lloyd iteration: boundaries are midpoints of neighbouring centroids, each centroid is the
    conditional mean E[X | X in its cell] = (pdf(a) - pdf(b)) / (cdf(b) - cdf(a)).
    Starting from the normal quantiles makes it converge in a few thousand steps even at 8 bits.
    """
    n = 1 << bits
    # Start at the quantiles of the cell centres.
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    c = math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(max_iter):
        t = torch.cat([-inf, 0.5 * (c[1:] + c[:-1]), inf])
        a, b = t[:-1], t[1:]
        mass = _cdf(b) - _cdf(a)
        new = (_pdf(a) - _pdf(b)) / mass
        new = 0.5 * (new - new.flip(0))  # the optimum is symmetric: keep it exactly so
        if torch.max(torch.abs(new - c)).item() < tol:
            c = new
            break
        c = new
    else:  # pragma: no cover - only if the tolerance is unreachable
        raise RuntimeError(f"Lloyd iteration for {bits} bits did not converge")
    return c


def lloyd_max_mse(centroids: torch.Tensor) -> float:
    """E[(X - Q(X))^2] for X ~ N(0,1) and nearest-centroid quantiser Q with these centroids."""
    c = centroids.to(torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    t = torch.cat([-inf, 0.5 * (c[1:] + c[:-1]), inf])
    a, b = t[:-1], t[1:]
    # E[(X-c)^2 ; a<X<b] = E[X^2;..] - 2c E[X;..] + c^2 P(..)
    # E[X^2; a<X<b] = (cdf(b)-cdf(a)) + a pdf(a) - b pdf(b)  (with x*pdf(x) -> 0 at +-inf)
    apdf = torch.where(torch.isinf(a), torch.zeros_like(a), a * _pdf(a))
    bpdf = torch.where(torch.isinf(b), torch.zeros_like(b), b * _pdf(b))
    mass = _cdf(b) - _cdf(a)
    ex2 = mass + apdf - bpdf
    ex = _pdf(a) - _pdf(b)
    return float(torch.sum(ex2 - 2 * c * ex + c * c * mass))
