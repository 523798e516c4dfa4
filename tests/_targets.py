"""Exact test targets shared by the stochastic-sampling tests (float64).

``MEAN`` / ``COV``: a correlated 3-d Gaussian data law (covariance eigenvalues 0.052, 0.245
and 1.403). ``GMM_W`` /
``GMM_MEANS`` / ``GMM_COVS``: a 2-d three-component Gaussian mixture of unequal weights and
anisotropic, differently oriented components (:func:`mixture` on a process); :func:`gmm_marginal_sampler` and
:func:`gmm_marginal_moments` give the exact law of ``a x0 + s eps`` for it, by hand.
"""

from __future__ import annotations

import torch

from diffusolve.models import GaussianMixture

F64 = torch.float64
MEAN = torch.tensor([0.3, -0.5, 1.0], dtype=F64)
COV = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=F64)
GMM_W = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
GMM_MEANS = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.5]], dtype=F64)
GMM_COVS = torch.tensor(
    [[[0.10, 0.05], [0.05, 0.08]], [[0.20, -0.10], [-0.10, 0.15]], [[0.05, 0.0], [0.0, 0.30]]],
    dtype=F64,
)


def mixture(process) -> GaussianMixture:
    """The mixture ``GMM_W``, ``GMM_MEANS``, ``GMM_COVS`` as a model on ``process``."""
    return GaussianMixture(GMM_W, GMM_MEANS, GMM_COVS, process=process)


def gmm_marginal_sampler(a, s):
    """Exact samples of ``a x0 + s eps`` for the mixture (multinomial + Cholesky, by hand):
    ``draw(n, generator) -> [n, 2]``."""
    chol = torch.linalg.cholesky(GMM_COVS)

    def draw(n, g):
        k = torch.multinomial(GMM_W, n, replacement=True, generator=g)
        z = torch.randn(n, 2, generator=g, dtype=F64)
        x0 = GMM_MEANS[k] + (chol[k] @ z[:, :, None])[:, :, 0]
        return a * x0 + s * torch.randn(n, 2, generator=g, dtype=F64)

    return draw


def gmm_marginal_moments(a, s):
    """Mean and covariance of ``a x0 + s eps`` for the mixture."""
    m = GMM_W @ GMM_MEANS
    c = (GMM_W[:, None, None] * (GMM_COVS + GMM_MEANS[:, :, None] * GMM_MEANS[:, None, :])).sum(0)
    return a * m, a * a * (c - torch.outer(m, m)) + s * s * torch.eye(2, dtype=F64)
