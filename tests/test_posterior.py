"""Exact posteriors of the analytic priors under ``y = A x + sigma_y eps``.

* Gaussian: the gain-form posterior against the information form
  ``cov = (C^-1 + A^T A / s^2)^-1``, ``mean = cov (C^-1 mu + A^T y / s^2)``; Bayes' rule on
  the density (``log p(x|y) - log p(x) - log p(y|x)`` is the constant ``-log p(y)``);
  the operators' prox (for ``N(z, I)`` the posterior mean is ``prox(z, y, 1/s^2)``);
  sequential conditioning equals joint conditioning.
* Mixture: against self-normalised importance sampling with prior samples (tolerances from
  the effective sample size), and Bayes' rule on the density.
* Empirical: the weights against direct Bayes on the points; the weighted prior's
  denoiser, density and sampling.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusolve.inverse import (
    CT,
    MRI,
    Blur,
    CompressedSensing,
    GaussianNoise,
    Inpainting,
    PhaseRetrieval,
    SuperResolution,
    gaussian_kernel,
    mri_mask,
    random_pixel_mask,
)
from diffusolve.models import Empirical, Gaussian, GaussianMixture
from diffusolve.models.analytic.posterior import (
    WeightedEmpirical,
    condition_gaussian,
    log_evidence,
    measurement_matrix,
)
from diffusolve.process import edm, rectified_flow

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
RF = rectified_flow()  # alpha(0) = 1, sigma(0) = 0: log_prob(x, 0) is the data density


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    q = torch.randn(d, d, generator=g, dtype=F64)
    return q @ q.T / d + 0.2 * torch.eye(d, dtype=F64)


def _loglik(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: float) -> torch.Tensor:
    return GaussianNoise(s).log_likelihood(y.expand(x.shape[0], -1), x.flatten(1) @ a.T)


def _information_form(mu, cov, a, y, s):
    prec = torch.linalg.inv(cov) + a.T @ a / s**2
    c = torch.linalg.inv(prec)
    return c @ (torch.linalg.solve(cov, mu) + a.T @ y / s**2), c


@pytest.mark.parametrize(("d", "m"), [(5, 3), (4, 7), (6, 6)])
def test_gaussian_posterior_against_the_information_form(d: int, m: int) -> None:
    g = _gen(d * 10 + m)
    mu, cov = torch.randn(d, generator=g, dtype=F64), _spd(d, g)
    a = torch.randn(m, d, generator=g, dtype=F64)
    if m > d:
        a[:, -1] = a[:, 0]  # tall and rank deficient
    y, s = torch.randn(m, generator=g, dtype=F64), 0.3
    prior = Gaussian(mu, cov, process=RF, shape=(d,))
    post = prior.posterior(a, y, s)
    want_mean, want_cov = _information_form(mu, cov, a, y, s)
    torch.testing.assert_close(post.mean, want_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.cov, want_cov, rtol=1e-10, atol=1e-10)
    assert isinstance(post, Gaussian) and post.process is RF and post.shape == (d,)
    # Bayes' rule on the exact densities, and the evidence
    x = post.sample(6, _gen(1))
    const = post.log_prob(x, 0.0) - prior.log_prob(x, 0.0) - _loglik(a, x, y, s)
    torch.testing.assert_close(const, const[:1].expand(6), rtol=0, atol=1e-9)
    want_ev = torch.distributions.MultivariateNormal(
        a @ mu, a @ cov @ a.T + s**2 * torch.eye(m, dtype=F64)
    ).log_prob(y)
    assert log_evidence(prior, a, y, s) == pytest.approx(float(want_ev), abs=1e-10)
    assert float(const[0]) == pytest.approx(-float(want_ev), abs=1e-9)


def test_sequential_conditioning_is_joint_conditioning() -> None:
    g = _gen(3)
    d = 5
    prior = Gaussian(torch.randn(d, generator=g, dtype=F64), _spd(d, g), process=RF)
    a1, a2 = torch.randn(2, d, generator=g, dtype=F64), torch.randn(2, d, generator=g, dtype=F64)
    y1, y2 = torch.randn(2, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    joint = prior.posterior(torch.cat([a1, a2]), torch.cat([y1, y2]), 0.4)
    seq = prior.posterior(a1, y1, 0.4).posterior(a2, y2, 0.4)
    torch.testing.assert_close(seq.mean, joint.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(seq.cov, joint.cov, rtol=1e-10, atol=1e-10)


OPERATORS = [
    ("inpainting", Inpainting(random_pixel_mask((4, 4), 0.5, seed=2), (1, 4, 4))),
    ("blur", Blur(gaussian_kernel(0.8, 3), (1, 4, 4))),
    ("sr", SuperResolution((1, 4, 4), 2, "bicubic")),
    ("mri", MRI(mri_mask((4, 4), 2, 0.25, seed=1), (1, 4, 4))),
    ("ct", CT((1, 4, 4), 3)),
    ("cs", CompressedSensing((1, 4, 4), 5, seed=0)),
]


@pytest.mark.parametrize(("name", "op"), OPERATORS, ids=[n for n, _ in OPERATORS])
def test_gaussian_posterior_with_operators_is_the_prox(name: str, op) -> None:
    """Prior ``N(z, I)``: the posterior mean solves ``(I + A^T A / s^2) x = z + A^T y / s^2``,
    which is the operator's prox with ``gamma = 1 / s^2`` (SVD, closed form or CG)."""
    g = _gen(5)
    z = torch.randn(1, 1, 4, 4, generator=g, dtype=F64)
    s = 0.2
    y = GaussianNoise(s).sample(op(torch.randn(1, 1, 4, 4, generator=g, dtype=F64)), g)
    prior = Gaussian(z.flatten(), torch.ones(16, dtype=F64), process=RF, shape=(1, 4, 4))
    post = prior.posterior(op, y, s)
    want = op.prox(z, y, 1 / s**2)
    torch.testing.assert_close(post.mean.reshape(1, 1, 4, 4), want, rtol=1e-8, atol=1e-8)
    # the dense matrix an operator without matrix() would give (A on the basis) is the same
    a = measurement_matrix(op, (1, 4, 4))
    basis = torch.eye(16, dtype=F64).reshape(16, 1, 4, 4)
    torch.testing.assert_close(a, op.flatten_y(op(basis)).T)
    assert post.sample(2, _gen(0)).shape == (2, 1, 4, 4)


def test_complex_measurements_use_real_and_imaginary_parts() -> None:
    """An MRI frequency seen without its mirror halves one real direction's information:
    y = (Re, Im) of X(k) with noise s on each part, information form on the real matrix."""
    op = MRI(mri_mask((4, 4), 2, 0.25, seed=1), (1, 4, 4))
    g = _gen(7)
    cov = _spd(16, g)
    prior = Gaussian(torch.zeros(16, dtype=F64), cov, process=RF, shape=(1, 4, 4))
    y = GaussianNoise(0.1).sample(op(prior.sample(1, g)), g)
    post = prior.posterior(op, y, 0.1)
    yr = torch.view_as_real(y).reshape(-1)
    a = torch.view_as_real(op(torch.eye(16, dtype=F64).reshape(16, 1, 4, 4))).reshape(16, -1).T
    want_mean, want_cov = _information_form(torch.zeros(16, dtype=F64), cov, a, yr, 0.1)
    torch.testing.assert_close(post.mean, want_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.cov, want_cov, rtol=1e-9, atol=1e-9)


def _weighted_moments(x: torch.Tensor, w: torch.Tensor):
    mean = (w[:, None] * x).sum(0)
    c = x - mean
    return mean, (w[:, None, None] * c[:, :, None] * c[:, None, :]).sum(0), c


def test_mixture_posterior_against_importance_sampling() -> None:
    d, k, m, s = 3, 4, 2, 0.6
    prior = GaussianMixture.random(d, k, process=RF, seed=4, eig_range=(0.05, 0.5))
    g = _gen(11)
    a = torch.randn(m, d, generator=g, dtype=F64)
    y = GaussianNoise(s).sample(prior.sample(1, g) @ a.T, g)[0]
    post = prior.posterior(a, y, s)
    assert isinstance(post, GaussianMixture) and post.n_components == k
    # exact: each component is the Gaussian posterior of the prior component
    for j in range(k):
        mean_j, cov_j = _information_form(prior.means[j], prior.covs[j], a, y, s)
        torch.testing.assert_close(post.means[j], mean_j, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(post.covs[j], cov_j, rtol=1e-10, atol=1e-10)
    # importance sampling: prior samples weighted by the likelihood (with their components)
    n = 200_000
    gs = _gen(12)
    comp = torch.multinomial(prior.weights, n, replacement=True, generator=gs)
    z = torch.randn(n, d, generator=gs, dtype=F64)
    chol = torch.linalg.cholesky(prior.covs)
    x = prior.means[comp] + (chol[comp] @ z[:, :, None])[..., 0]
    logw = _loglik(a, x, y, s)
    w = torch.softmax(logw, 0)
    ess = float(1 / (w * w).sum())
    assert ess > 2_000  # the test is informative
    # component probabilities: se = sqrt(p (1 - p) / ESS)
    p_is = torch.zeros(k, dtype=F64).index_add_(0, comp, w)
    se = torch.sqrt(post.weights * (1 - post.weights) / ess) + 1e-12
    assert torch.all((p_is - post.weights).abs() < 5 * se), (p_is - post.weights) / se
    # mean and covariance: se from the weighted spread of x and of the centred products
    post_mean = post.weights @ post.means
    dm = post.means - post_mean
    post_cov = (post.weights[:, None, None] * (post.covs + dm[:, :, None] * dm[:, None, :])).sum(0)
    mean_is, cov_is, c = _weighted_moments(x, w)
    se_mean = torch.sqrt(torch.diagonal(post_cov) / ess)
    assert torch.all((mean_is - post_mean).abs() < 5 * se_mean), (mean_is - post_mean) / se_mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = torch.sqrt((w[:, None, None] * (prods - cov_is) ** 2).sum(0) / ess)
    assert torch.all((cov_is - post_cov).abs() < 5 * se_cov), (cov_is - post_cov) / se_cov
    # the exact posterior samples itself: its sample mean within its own standard error
    xs = post.sample(20_000, _gen(13))
    assert torch.all(
        (xs.mean(0) - post_mean).abs() < 5 * torch.sqrt(torch.diagonal(post_cov) / 20_000)
    )


def test_mixture_posterior_density_is_bayes_rule() -> None:
    prior = GaussianMixture.random(4, 3, process=RF, seed=1)
    g = _gen(2)
    a, s = torch.randn(2, 4, generator=g, dtype=F64), 0.3
    y = GaussianNoise(s).sample(prior.sample(1, g) @ a.T, g)[0]
    post = prior.posterior(a, y, s)
    x = torch.cat([post.sample(5, g), prior.sample(3, g)])
    const = post.log_prob(x, 0.0) - prior.log_prob(x, 0.0) - _loglik(a, x, y, s)
    torch.testing.assert_close(const, const[:1].expand(8), rtol=0, atol=1e-8)
    assert float(const[0]) == pytest.approx(-log_evidence(prior, a, y, s), abs=1e-8)
    # the posterior of a posterior: sequential = joint
    a2 = torch.randn(1, 4, generator=g, dtype=F64)
    y2 = torch.randn(1, generator=g, dtype=F64)
    seq = post.posterior(a2, y2, s)
    joint = prior.posterior(torch.cat([a, a2]), torch.cat([y, y2]), s)
    torch.testing.assert_close(seq.weights, joint.weights, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(seq.means, joint.means, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("d", "m"), [(6, 2), (3, 5)])
def test_isotropic_mixture_route_is_the_dense_route(d: int, m: int) -> None:
    """Isotropic components take the SVD route (shared eigenbasis): same posterior as the
    dense conditioning, and the same exact denoiser, score and density."""
    g = _gen(30 + d)
    k = 3
    means = 2 * torch.randn(k, d, generator=g, dtype=F64)
    prior = GaussianMixture(torch.tensor([0.2, 0.3, 0.5]), means, torch.tensor([0.5, 1.0, 2.0]),
                            process=edm(), shape=(d,))  # fmt: skip
    a = torch.randn(m, d, generator=g, dtype=F64)
    if m > d:
        a[:, 0] = a[:, 1]  # rank deficient
    y = torch.randn(m, generator=g, dtype=F64)
    post = prior.posterior(a, y, 0.4)
    assert post.evecs is not None and post.evecs.stride(0) == 0  # one shared basis
    dense_means, dense_covs, log_ev = condition_gaussian(prior.means, prior.covs, a, y, 0.4)
    dense = GaussianMixture(torch.softmax(prior.log_weights + log_ev, 0), dense_means, dense_covs,
                            process=edm(), shape=(d,))  # fmt: skip
    torch.testing.assert_close(post.weights, dense.weights, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(post.means, dense.means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.covs, dense.covs, rtol=1e-10, atol=1e-10)
    for j in range(k):
        want_mean, want_cov = _information_form(means[j], prior.covs[j], a, y, 0.4)
        torch.testing.assert_close(post.means[j], want_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(post.covs[j], want_cov, rtol=1e-10, atol=1e-10)
    x, t = post.sample(5, g), torch.tensor(0.3, dtype=F64)
    torch.testing.assert_close(post(x, t), dense(x, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.score(x, t), dense.score(x, t), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.log_prob(x, t), dense.log_prob(x, t), rtol=1e-10, atol=1e-10)
    assert log_evidence(prior, a, y, 0.4) == pytest.approx(
        float(torch.logsumexp(prior.log_weights + log_ev, 0)), abs=1e-10
    )


def test_mixture_posterior_drops_components_that_underflow() -> None:
    prior = GaussianMixture(
        torch.tensor([0.5, 0.5]),
        torch.tensor([[-50.0], [50.0]]),
        torch.tensor([1.0, 1.0]),
        process=edm(),
    )
    post = prior.posterior(torch.ones(1, 1), torch.tensor([50.0]), 0.1)
    assert post.n_components == 1 and float(post.means[0, 0]) == pytest.approx(50.0, abs=1e-2)


def _bayes_on_points(data, a, y, s):
    lik = torch.distributions.MultivariateNormal(
        data @ a.T, covariance_matrix=s**2 * torch.eye(a.shape[0], dtype=F64)
    ).log_prob(y)
    return torch.softmax(lik, 0)


def test_empirical_posterior_is_bayes_on_the_points() -> None:
    g = _gen(21)
    data = torch.randn(40, 2, 3, generator=g, dtype=F64)
    a, s = torch.randn(2, 6, generator=g, dtype=F64), 0.5
    y = GaussianNoise(s).sample(data[:1].flatten(1) @ a.T, g)[0]
    prior = Empirical(data, process=edm())
    post = prior.posterior(a, y, s)
    assert isinstance(post, Empirical) and isinstance(post, WeightedEmpirical)
    assert post.shape == (2, 3) and post.process is prior.process
    want = _bayes_on_points(data.flatten(1), a, y, s)
    torch.testing.assert_close(post.point_weights, want, rtol=1e-10, atol=1e-14)
    # its exact denoiser: the weighted mean at huge noise, the nearest point at tiny noise
    mean = (want[:, None] * data.flatten(1)).sum(0).reshape(1, 2, 3)
    torch.testing.assert_close(post(torch.zeros(1, 2, 3, dtype=F64), 1e5), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(post(data[7:8] + 1e-4, 1e-3), data[7:8])
    # its noised density: log sum_i w_i N(x; x_i, t^2 I) (EDM: alpha = 1, sigma = t)
    xq, t = torch.randn(3, 2, 3, generator=g, dtype=F64), 0.7
    comp = torch.distributions.Normal(data.flatten(1)[None], t).log_prob(xq.flatten(1)[:, None])
    want_lp = torch.logsumexp(comp.sum(-1) + want.log(), 1)
    torch.testing.assert_close(post.log_prob(xq, t), want_lp, rtol=1e-10, atol=1e-10)
    # exact sampling: frequencies within 5 standard errors of the weights
    n = 50_000
    idx = (post.sample(n, _gen(3)).flatten(1)[:, None] == data.flatten(1)[None]).all(-1)
    freq = idx.double().mean(0)
    assert torch.all((freq - want).abs() < 5 * torch.sqrt(want * (1 - want) / n) + 1e-12)
    # log evidence: log mean_i N(y; A x_i, s^2 I)
    lik = torch.distributions.MultivariateNormal(
        data.flatten(1) @ a.T, covariance_matrix=s**2 * torch.eye(2, dtype=F64)
    ).log_prob(y)
    assert log_evidence(prior, a, y, s) == pytest.approx(
        float(torch.logsumexp(lik, 0) - math.log(40)), abs=1e-10
    )


def test_empirical_posterior_of_a_posterior_and_operators() -> None:
    g = _gen(22)
    data = torch.randn(30, 1, 4, 4, generator=g, dtype=F64)
    op1 = Inpainting(random_pixel_mask((4, 4), 0.25, seed=0), (1, 4, 4))
    op2 = MRI(mri_mask((4, 4), 4, 0.25, seed=0), (1, 4, 4))
    y1 = GaussianNoise(1.0).sample(op1(data[:1]), g)
    y2 = GaussianNoise(1.0).sample(op2(data[:1]), g)
    prior = Empirical(data, process=edm())
    seq = prior.posterior(op1, y1, 1.0).posterior(op2, y2, 1.0)
    flat = torch.cat([op1.flatten_y(y1), op2.flatten_y(y2)], 1)[0]
    a = torch.cat([measurement_matrix(op1, (1, 4, 4)), measurement_matrix(op2, (1, 4, 4))])
    torch.testing.assert_close(seq.point_weights, _bayes_on_points(data.flatten(1), a, flat, 1.0))


def test_weighted_empirical_validates() -> None:
    data = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="exactly one"):
        WeightedEmpirical(data, process=edm())
    with pytest.raises(ValueError, match="non-negative"):
        WeightedEmpirical(data, torch.tensor([1.0, -1.0, 1.0]), process=edm())
    with pytest.raises(ValueError, match="3 points"):
        WeightedEmpirical(data, torch.ones(2), process=edm())
    w = WeightedEmpirical(data, torch.tensor([0.0, 1.0, 1.0]), process=edm())
    assert float(w.point_weights[0]) == 0.0 and "WeightedEmpirical" in repr(w)


def test_clear_errors() -> None:
    prior = Gaussian(torch.zeros(16), torch.ones(16), process=RF, shape=(1, 4, 4))
    with pytest.raises(ValueError, match="nonlinear"):
        prior.posterior(PhaseRetrieval((1, 4, 4)), torch.zeros(1, 1, 8, 8), 0.1)
    op = Blur(gaussian_kernel(0.8, 3), (1, 4, 4))
    with pytest.raises(ValueError, match="sigma_y must be positive"):
        prior.posterior(op, torch.zeros(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="give one measurement"):
        prior.posterior(op, torch.zeros(2, 1, 4, 4), 0.1)
    with pytest.raises(ValueError, match="shape"):
        prior.posterior(Blur(gaussian_kernel(0.8, 3), (1, 3, 3)), torch.zeros(1, 1, 3, 3), 0.1)
    with pytest.raises(ValueError, match=r"\[m, 16\]"):
        prior.posterior(torch.ones(2, 3), torch.zeros(2), 0.1)
    # a callable operator without matrix(): A applied to the basis
    mask = random_pixel_mask((4, 4), 0.5, seed=1)
    post = prior.posterior(lambda x: x * mask, torch.zeros(1, 1, 4, 4), 1.0)
    torch.testing.assert_close(post.cov.diagonal(), 1 - 0.5 * mask.flatten().double())
