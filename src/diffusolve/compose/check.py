"""The exact check of the Ito log-density estimator on Gaussian mixtures.

Along reverse-SDE (Euler-Maruyama) trajectories driven by the exact score of the equal
mixture of ``M`` Gaussian mixtures (SuperDiff's OR at ``T = 1`` with exact ``kappa``), the
accumulated estimates of ``log q_i,t`` are compared with the exact ``log_prob`` of every
mixture at the trajectory's points. Three estimators ride on the same trajectory: the Ito
estimator (``"ito"``), its trapezoid correction (``"trapezoid"``) and the flipped quadratic
term of the reference OR branch (``"or_code"``), so the sign question is settled on
identical paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.analytic.gmm import GaussianMixture
from ._fields import sde_coefficients
from .superdiff import _dot, _phi, ito_log_density_step, or_kappa

__all__ = ["ito_density_check"]


def ito_density_check(
    mixtures: Sequence[GaussianMixture], x: Tensor, grid: Tensor, generator: torch.Generator
) -> dict[str, Tensor]:
    """Exact and estimated changes of ``log q_i`` along one batch of trajectories.

    Args:
        mixtures: ``M`` mixtures on one process.
        x: ``[B, d]`` float64 start at ``grid[0]``.
        grid: decreasing times.
        generator: the noise.

    Returns:
        ``{"exact", "ito", "trapezoid", "or_code"}``, each ``[M, B]``: the change of
        ``log q_i`` from ``grid[0]`` to ``grid[-1]``.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear, make_grid
        >>> p = vp_linear()
        >>> gs = [GaussianMixture.random(2, 2, process=p, seed=s) for s in (1, 2)]
        >>> x = p.prior_sample((50, 2), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> r = ito_density_check(gs, x, make_grid(p, 200), torch.Generator().manual_seed(1))
        >>> err = (r["ito"] - r["exact"]).abs().mean() / r["exact"].abs().mean()
        >>> bad = (r["or_code"] - r["exact"]).abs().mean() / r["exact"].abs().mean()
        >>> bool(err < 0.05 < bad)
        True
    """
    process = mixtures[0].process
    x = x.to(torch.float64)
    t0 = float(grid[0])
    start = torch.stack([g.log_prob(x, t0) for g in mixtures])
    est = {k: torch.zeros_like(start) for k in ("ito", "trapezoid", "or_code")}
    scores = torch.stack([g.score(x, t0) for g in mixtures])
    log_q = start.clone()
    for i in range(grid.numel() - 1):
        t, tn = float(grid[i]), float(grid[i + 1])
        dt = tn - t
        f, g2 = sde_coefficients(process, t)
        kappa = or_kappa(log_q)
        s = (kappa[..., None] * scores).sum(0)
        z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        udt = (f * dt) * x - (g2 * dt) * s
        xn = x + udt + (g2 * abs(dt)) ** 0.5 * z
        ito = ito_log_density_step(process, t, tn, x, xn, scores)
        est["ito"] += ito
        est["or_code"] += ito_log_density_step(process, t, tn, x, xn, scores, form="or_code")
        sn = torch.stack([g.score(xn, tn) for g in mixtures])
        fn, g2n = sde_coefficients(process, tn)
        corr = 0.5 * (_phi(xn, sn, fn, g2n) - _phi(x, scores, f, g2)) * dt
        est["trapezoid"] += ito + corr + 0.5 * _dot(sn - scores, udt, 1)
        log_q = torch.stack([g.log_prob(xn, tn) for g in mixtures])  # exact OR weights
        x, scores = xn, sn
    return {"exact": log_q - start, **est}
