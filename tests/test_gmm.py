"""Exact priors beyond the Gaussian: GaussianMixture, Empirical and the ODE reference engine."""

from __future__ import annotations

import math

import pytest
import torch

import diffusolve.models.analytic.gmm as gmm_module
from diffusolve.metrics import rel_error
from diffusolve.models import Empirical, Gaussian, GaussianMixture
from diffusolve.models.analytic import pf_ode_solve, reference_accuracy
from diffusolve.process import get_process

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESSES = ["ddpm-linear", "vp-cosine", "edm", "rectified-flow"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _times(p) -> list[float]:
    """Times spread from almost clean to almost pure noise (in lambda)."""
    lam = torch.linspace(float(p.lam(p.t_min)), float(p.lam(p.t_max)), 5, dtype=torch.float64)
    return [float(t) for t in p.t_of_lambda(lam)]


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_gen(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("name", PROCESSES)
def test_one_component_equals_gaussian(name: str) -> None:
    p = get_process(name)
    mean = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
    cov = _spd(3, 0)
    g = Gaussian(mean, cov, process=p)
    m = GaussianMixture(torch.ones(1), mean[None], cov[None], process=p)
    x0 = g.sample(16, _gen(1))
    for t in _times(p):
        x = p.marginal(x0, t, torch.randn(x0.shape, generator=_gen(2), dtype=torch.float64))
        torch.testing.assert_close(m(x, t), g(x, t), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.score(x, t), g.score(x, t), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.log_prob(x, t), g.log_prob(x, t), rtol=1e-10, atol=1e-10)
    # the ODE reference against the closed-form flow, full range, both directions
    x = p.prior_sample((8, 3), _gen(3), dtype=torch.float64)
    out = m.ode_solve(x, p.t_max, p.t_min)
    assert rel_error(out, g.ode_solution(x, p.t_max, p.t_min), "max") < 1e-8
    back = m.ode_solve(out, p.t_min, p.t_max)
    assert rel_error(back, g.ode_solution(out, p.t_min, p.t_max), "max") < 1e-8
    ref = m.reference(x, p.t_max, p.t_min)
    assert rel_error(ref, g.reference(x, p.t_max, p.t_min), "max") < 1e-8


def test_covariance_forms_agree() -> None:
    p = get_process("vp-cosine")
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([0.3, 0.7])
    iso = GaussianMixture(w, means, torch.tensor([0.1, 0.4]), process=p)
    diag = GaussianMixture(w, means, torch.tensor([[0.1, 0.1], [0.4, 0.4]]), process=p)
    full = GaussianMixture(w, means, torch.diag_embed(diag.evals), process=p)
    x = torch.randn(32, 2, generator=_gen(0), dtype=torch.float64)
    for t in (0.05, 0.5, 0.9):
        for other in (diag, full):
            torch.testing.assert_close(other(x, t), iso(x, t), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(other.log_prob(x, t), iso.log_prob(x, t))


def _random_gmm(name: str, dim: int = 4, k: int = 3, seed: int = 0) -> GaussianMixture:
    return GaussianMixture.random(dim, k, process=get_process(name), seed=seed)


@pytest.mark.parametrize("name", ["ddpm-linear", "edm", "rectified-flow"])
def test_score_is_gradient_of_log_prob_and_tweedie(name: str) -> None:
    m = _random_gmm(name)
    p = m.process
    x0 = m.sample(12, _gen(0))
    ts = torch.tensor(_times(p), dtype=torch.float64)
    t = ts[torch.arange(12) % ts.numel()]  # per-sample times: the unshared path
    eps = torch.randn(x0.shape, generator=_gen(1), dtype=torch.float64)
    x = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
    for tt in (t, ts[2]):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(m.log_prob(xr, tt).sum(), xr)
        torch.testing.assert_close(m.score(x, tt), grad, rtol=1e-9, atol=1e-9)
        a, s = p.alpha(tt), p.sigma(tt)
        a, s = (a[:, None], s[:, None]) if a.ndim else (a, s)
        torch.testing.assert_close(m(x, tt), (x + s**2 * m.score(x, tt)) / a, rtol=1e-8, atol=1e-8)


def test_responsibilities_sum_to_one_and_separate() -> None:
    m = _random_gmm("vp-cosine", dim=8, k=5)
    x0 = m.sample(64, _gen(0))
    for t in (0.01, 0.3, 0.9):
        r = m.responsibilities(m.process.marginal(x0, t, torch.randn_like(x0)), t)
        assert r.shape == (64, 5)
        torch.testing.assert_close(r.sum(1), torch.ones(64, dtype=torch.float64))
        # Bayes' rule by hand: w_k N(x; a mu_k, a^2 C_k + s^2 I), normalised
        x = m.process.marginal(x0[:4], t, torch.zeros_like(x0[:4]))
        a, s = float(m.process.alpha(t)), float(m.process.sigma(t))
        eye = torch.eye(8, dtype=torch.float64)
        logp = torch.stack(
            [
                torch.distributions.MultivariateNormal(
                    a * m.means[k], a * a * m.covs[k] + s * s * eye
                ).log_prob(x)
                + m.log_weights[k]
                for k in range(5)
            ],
            1,
        )
        torch.testing.assert_close(
            m.responsibilities(x, t), torch.softmax(logp, 1), rtol=1e-8, atol=1e-10
        )
    # almost clean: each sample is claimed by one component; pure noise: near the weights
    r = m.responsibilities(x0, 1e-3)
    assert float(r.max(1).values.min()) > 0.99
    z = m.process.prior_sample((4, 8), _gen(1), dtype=torch.float64) * 0
    torch.testing.assert_close(m.responsibilities(z, 0.9946)[0], m.weights, rtol=0.2, atol=0.02)


def test_pruning_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _random_gmm("ddpm-linear", dim=16, k=6)
    x0 = m.sample(40, _gen(0))
    cases = []
    for t in (0.0, 20.0, 150.0, 999.0):
        x = m.process.marginal(x0, t, torch.randn(x0.shape, generator=_gen(1), dtype=torch.float64))
        cases.append((x, t, m(x, t), m.score(x, t), m.log_prob(x, t)))
    monkeypatch.setattr(gmm_module, "_PRUNE", math.inf)
    for x, t, d, s, lp in cases:
        torch.testing.assert_close(m(x, t), d, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.score(x, t), s, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(m.log_prob(x, t), lp, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", ["vp-cosine", "edm"])
def test_log_prob_normalises_in_1d(name: str) -> None:
    p = get_process(name)
    m = GaussianMixture(
        torch.tensor([0.2, 0.5, 0.3]),
        torch.tensor([[-1.0], [0.2], [1.5]]),
        torch.tensor([0.01, 0.1, 0.03]),
        process=p,
    )
    for t in _times(p):
        half = 8 * float(p.alpha(t)) * 2 + 8 * float(p.sigma(t))
        grid = torch.linspace(-half, half, 200_001, dtype=torch.float64)
        dens = m.log_prob(grid[:, None], t).exp()
        assert abs(float(torch.trapezoid(dens, grid)) - 1.0) < 1e-6


def test_sample_moments() -> None:
    """Mixture moments by hand, with tolerances from the sample size (tests/_exact.py; the
    covariance check's variance from a large independent exact sample drawn by hand)."""
    from _exact import assert_checks, moment_checks

    m = _random_gmm("edm", dim=3, k=4, seed=3)
    x = m.sample(40_000, _gen(0))
    mean = m.weights @ m.means
    centred = m.means - mean
    cov = (m.weights[:, None, None] * (m.covs + centred[:, :, None] * centred[:, None, :])).sum(0)
    g = _gen(1)
    comp = torch.multinomial(m.weights, 200_000, replacement=True, generator=g)
    z = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    ref = m.means[comp] + (torch.linalg.cholesky(m.covs)[comp] @ z[:, :, None])[:, :, 0]
    assert_checks(moment_checks(x, mean, cov, reference=ref))
    torch.testing.assert_close(m.sample(5, _gen(7)), m.sample(5, _gen(7)))


def test_random_is_deterministic_and_well_conditioned() -> None:
    p = get_process("rectified-flow")
    a = GaussianMixture.random(16, 6, process=p, seed=5)
    b = GaussianMixture.random(16, 6, process=p, seed=5)
    c = GaussianMixture.random(16, 6, process=p, seed=6)
    torch.testing.assert_close(a.covs, b.covs, rtol=0, atol=0)
    assert not torch.allclose(a.means, c.means)
    assert float(a.weights.max() / a.weights.min()) > 1.5  # unequal weights
    assert float(a.evals.min()) >= 1e-3 * (1 - 1e-9) and float(a.evals.max()) <= 0.1 * (1 + 1e-9)
    assert float(a.evals.max() / a.evals.min()) > 20  # anisotropic
    torch.testing.assert_close(a.covs, a.covs.transpose(1, 2))
    assert float(torch.cdist(a.means, a.means).add(torch.eye(6) * 1e9).min()) > 1.0


def test_sample_shape() -> None:
    m = GaussianMixture.random(4, 2, process=get_process("edm"), seed=0, shape=(2, 2))
    x = m.sample(3, _gen(0))
    assert x.shape == (3, 2, 2)
    assert m(x.float(), 1.0).dtype == torch.float32 and m(x, 1.0).shape == (3, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        m(torch.zeros(3, 4), 1.0)


@pytest.mark.parametrize("name", ["ddpm-linear", "rectified-flow"])
def test_ode_round_trip_and_accuracy(name: str) -> None:
    m = _random_gmm(name, dim=8, k=4, seed=1)
    p = m.process
    x = p.prior_sample((6, 8), _gen(0), dtype=torch.float64)
    x1, info = m.ode_solve(x, p.t_max, p.t_min, return_info=True)
    assert info["nfev"] > 0 and info["method"] == "DOP853" and "seconds" in info
    back = m.ode_solve(x1, p.t_min, p.t_max)
    assert rel_error(back, x, "max") < 1e-7
    assert m.reference_accuracy(x, p.t_max, p.t_min, rtol=1e-8, atol=1e-8) < 1e-6
    # a denoised reference lies on the data: about as likely as data samples
    ref = m.reference(x, p.t_max, p.t_min)
    assert (
        float(m.log_prob(ref, p.t_min).min())
        > float(m.log_prob(m.sample(100, _gen(1)), p.t_min).min()) - 20
    )


def test_pf_ode_solve_per_sample_times_and_chunks() -> None:
    p = get_process("vp-cosine")
    g = Gaussian(torch.zeros(2), torch.tensor([0.3, 2.0]), process=p)
    x = torch.randn(5, 2, generator=_gen(0), dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.4], dtype=torch.float64)
    te = torch.tensor([0.1, 0.8, 0.2, 0.05, 0.6], dtype=torch.float64)  # mixed directions
    out, info = pf_ode_solve(g, p, x.float(), t, te, chunk_size=2)
    assert out.dtype == torch.float32 and info["chunks"] == 3
    exact = torch.stack([g.ode_solution(x[i : i + 1], t[i], te[i])[0] for i in range(5)])
    assert rel_error(out.double(), exact, "max") < 1e-6  # float32 output
    out64, _ = pf_ode_solve(g, p, x, t, te)
    assert rel_error(out64, exact, "max") < 1e-8
    assert reference_accuracy(g, p, x, 0.99, 0.01) < 1e-9


# ---------------------------------------------------------------- Empirical
def _data() -> torch.Tensor:
    return torch.randn(50, 3, generator=_gen(0), dtype=torch.float64)


def test_empirical_limits() -> None:
    data = _data()
    e = Empirical(data, process=get_process("edm"))
    x = data[:10] + 1e-3 * torch.randn(10, 3, generator=_gen(1), dtype=torch.float64)
    torch.testing.assert_close(e(x, 0.002), data[:10], rtol=0, atol=1e-12)
    w = e.weights(x, 0.002)
    torch.testing.assert_close(w.argmax(1), torch.arange(10))
    torch.testing.assert_close(e(x, 80.0 * 1e4), data.mean(0).expand(10, 3), rtol=0, atol=1e-6)
    s = e.sample(100, _gen(2))
    assert all(bool((s[i] == data).all(1).any()) for i in range(100))


def test_empirical_matches_narrow_mixture_and_autograd() -> None:
    data = _data()
    for name in ("ddpm-linear", "rectified-flow"):
        p = get_process(name)
        e = Empirical(data, process=p)
        m = GaussianMixture(torch.ones(50), data, torch.full((50,), 1e-12), process=p)
        for t in _times(p):
            x = p.marginal(data[:8], t, torch.randn(8, 3, generator=_gen(3), dtype=torch.float64))
            torch.testing.assert_close(e(x, t), m(x, t), rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(e.log_prob(x, t), m.log_prob(x, t), rtol=1e-6, atol=1e-6)
            xr = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(e.log_prob(xr, t).sum(), xr)
            torch.testing.assert_close(e.score(x, t), grad, rtol=1e-7, atol=1e-7)


def test_empirical_ode_lands_on_data() -> None:
    data = _data()
    p = get_process("vp-cosine")
    e = Empirical(data, process=p)
    x = p.prior_sample((4, 3), _gen(5), dtype=torch.float64)
    out = e.reference(x, p.t_max, p.t_min, rtol=1e-8, atol=1e-8)
    nearest = data[torch.cdist(out, data).argmin(1)]
    torch.testing.assert_close(out, nearest, rtol=0, atol=1e-6)
