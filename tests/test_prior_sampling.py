"""Sampling from the analytic priors, with tolerances from the sample size (tests/_exact.py).

* ``Gaussian.sample`` (full and diagonal covariances, any sample shape): mean and
  covariance checks against the exact moments.
* ``GaussianMixture.sample`` with full, diagonal and isotropic covariances: components far
  apart (nearest-mean assignment errs with probability below 1e-6 per sample), so the
  component counts are checked against the weights and each component's samples against
  its own mean and covariance; the whole set against hand-drawn exact samples (sliced
  Wasserstein within the noise floor).
* ``Empirical.sample``: uniform over the data points.
* ``Process.prior_sample`` and ``Process.marginal``: the laws they promise.

False-alarm rates are stated in tests/_exact.py; every check here uses 2e-4 or less.
"""

from __future__ import annotations

import pytest
import torch
from _exact import assert_checks, moment_checks, proportion_check, sw_check

from diffusolve.models import Empirical, Gaussian, GaussianMixture
from diffusolve.process import get_process

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


COV3 = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=F64)
MEAN3 = torch.tensor([0.3, -0.5, 1.0], dtype=F64)


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_gaussian_sample(form):
    cov = COV3 if form == "full" else torch.diag(torch.tensor([2.0, 0.5, 0.01], dtype=F64))
    arg = cov if form == "full" else torch.diagonal(cov)
    g = Gaussian(MEAN3, arg, process=get_process("edm"))
    x = g.sample(20_000, _gen(0))
    assert x.shape == (20_000, 3) and x.dtype == F64
    assert_checks(moment_checks(x, MEAN3, cov), f"Gaussian {form}")
    torch.testing.assert_close(g.sample(5, _gen(1)), g.sample(5, _gen(1)), rtol=0, atol=0)


def test_gaussian_sample_shape():
    mean = torch.arange(4, dtype=F64)
    cov = (
        _rotation(4, 3)
        @ torch.diag(torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=F64))
        @ _rotation(4, 3).T
    )
    g = Gaussian(mean, cov, process=get_process("edm"), shape=(2, 2))
    x = g.sample(20_000, _gen(2))
    assert x.shape == (20_000, 2, 2)
    assert_checks(moment_checks(x.reshape(-1, 4), mean, cov))


# ------------------------------------------------------------------ Gaussian mixture
MIX_W = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
MIX_MEANS = torch.tensor([[0.0, 0.0, 0.0], [12.0, 0.0, 0.0], [0.0, 12.0, 0.0]], dtype=F64)


def _mixture_covs(form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(argument for GaussianMixture, [K, d, d] covariances) for a covariance form."""
    evals = torch.tensor([[0.05, 0.3, 1.0], [0.5, 0.5, 0.02], [0.2, 0.1, 0.4]], dtype=F64)
    if form == "isotropic":
        v = torch.tensor([0.3, 1.0, 0.05], dtype=F64)
        return v, v[:, None, None] * torch.eye(3, dtype=F64)
    if form == "diagonal":
        return evals, torch.diag_embed(evals)
    rots = torch.stack([_rotation(3, 10 + k) for k in range(3)])
    covs = rots @ torch.diag_embed(evals) @ rots.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    return covs, covs


@pytest.mark.parametrize("form", ["full", "diagonal", "isotropic"])
def test_gaussian_mixture_sample(form):
    arg, covs = _mixture_covs(form)
    m = GaussianMixture(MIX_W, MIX_MEANS, arg, process=get_process("vp-cosine"))
    n = 30_000
    x = m.sample(n, _gen(0))
    assert x.shape == (n, 3) and x.dtype == F64
    k = torch.cdist(x, MIX_MEANS).argmin(1)
    checks = [proportion_check(torch.bincount(k, minlength=3), MIX_W)]
    for j in range(3):
        checks += moment_checks(x[k == j], MIX_MEANS[j], covs[j])
    chol = torch.linalg.cholesky(covs)

    def exact(size, g):  # hand sampler: multinomial component, Cholesky factor
        c = torch.multinomial(MIX_W, size, replacement=True, generator=g)
        z = torch.randn(size, 3, generator=g, dtype=F64)
        return MIX_MEANS[c] + (chol[c] @ z[:, :, None])[:, :, 0]

    checks.append(sw_check(x[:4000], exact))
    assert_checks(checks, f"mixture, {form} covariances")


def test_gaussian_mixture_sample_unequal_weights_and_shape():
    w = torch.tensor([0.9, 0.1], dtype=F64)
    means = torch.tensor([[-10.0, 0.0], [10.0, 0.0]], dtype=F64)
    m = GaussianMixture(
        w, means, torch.tensor([0.2, 0.7]), process=get_process("edm"), shape=(1, 2)
    )
    x = m.sample(20_000, _gen(4))
    assert x.shape == (20_000, 1, 2)
    k = (x[:, 0, 0] > 0).long()
    assert_checks(proportion_check(torch.bincount(k, minlength=2), w))


# ------------------------------------------------------------------ Empirical
def test_empirical_sample_is_uniform_over_the_data():
    data = torch.randn(12, 2, generator=_gen(0), dtype=F64)
    e = Empirical(data, process=get_process("edm"))
    n = 24_000
    x = e.sample(n, _gen(1))
    idx = torch.cdist(x, data).argmin(1)
    torch.testing.assert_close(x, data[idx], rtol=0, atol=0)  # only data points
    assert_checks(proportion_check(torch.bincount(idx, minlength=12), torch.ones(12)))


# ------------------------------------------------------------------ process draws
@pytest.mark.parametrize("name", ["ddpm-linear", "vp-cosine", "edm", "rectified-flow", "ve"])
def test_prior_sample_and_marginal_laws(name):
    p = get_process(name)
    s_max = float(p.sigma(p.t_max))
    x = p.prior_sample((20_000, 3), _gen(0), dtype=F64)
    assert x.dtype == F64
    assert_checks(moment_checks(x, torch.zeros(3), s_max**2 * torch.eye(3, dtype=F64)), name)
    # marginal: alpha x0 + sigma eps at a mid time
    t = 0.5 * (p.t_min + p.t_max)
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x0 = (
        MEAN3 + torch.randn(20_000, 3, generator=_gen(1), dtype=F64) @ torch.linalg.cholesky(COV3).T
    )
    eps = torch.randn(20_000, 3, generator=_gen(2), dtype=F64)
    xt = p.marginal(x0, t, eps)
    torch.testing.assert_close(xt, a * x0 + s * eps, rtol=1e-12, atol=1e-12)
    assert_checks(moment_checks(xt, a * MEAN3, a * a * COV3 + s * s * torch.eye(3, dtype=F64)))
