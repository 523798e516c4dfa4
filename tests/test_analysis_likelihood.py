"""Probability-flow log-likelihoods against exact Gaussian-mixture densities."""

import math

import pytest
import torch

from diffusolve.analysis import bits_per_dim, gaussian_prior, log_likelihood
from diffusolve.models import CallableDenoiser, GaussianMixture
from diffusolve.process import ddpm, edm, rectified_flow, ve, vp_linear

pytestmark = pytest.mark.usefixtures("single_thread")


def _points(gmm, n, seed):
    """Exact samples of the t_min marginal."""
    proc = gmm.process
    gen = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    return proc.alpha(proc.t_min) * x0 + proc.sigma(proc.t_min) * eps


@pytest.mark.parametrize("make", [vp_linear, rectified_flow, edm, ve])
def test_exact_trace_matches_gmm_log_density(make):
    gmm = GaussianMixture.random(3, 2, process=make(), seed=1)
    x = _points(gmm, 4, 2)
    lp, info = log_likelihood(gmm, x, prior=gmm.log_prob, rtol=1e-7, atol=1e-9)
    ref = gmm.log_prob(x, gmm.process.t_min)
    assert (lp - ref).abs().max() < 1e-5
    if make is edm:  # the terminal state is the probability-flow image of x
        x_end = gmm.ode_solve(x, gmm.process.t_min, gmm.process.t_max)
        assert torch.allclose(info["x_end"], x_end, rtol=1e-4, atol=1e-5)


def test_intermediate_times_and_alpha_term():
    """log p_t at an inner t_start against the exact density (VP: alpha != 1 at both ends)."""
    proc = vp_linear()
    gmm = GaussianMixture.random(3, 2, process=proc, seed=3)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lp, info = log_likelihood(
        gmm, x, t_start=0.2, t_end=0.7, prior=gmm.log_prob, rtol=1e-8, atol=1e-10
    )
    assert (lp - gmm.log_prob(x, 0.2)).abs().max() < 1e-5
    a0, a1 = float(proc.alpha(0.2)), float(proc.alpha(0.7))
    assert info["log_alpha_term"] == pytest.approx(3 * (math.log(a1) - math.log(a0)))


def test_gaussian_prior_term_and_mismatch():
    """With prior="gaussian" the result differs from the exact one by exactly the prior
    mismatch log p_T(x_T) - log N(x_T; 0, sigma_T^2 I), and that mismatch is small."""
    gmm = GaussianMixture.random(4, 3, process=edm(), seed=2)
    x = _points(gmm, 4, 5)
    kw = dict(method="rk4", steps=20)
    exact, info = log_likelihood(gmm, x, prior=gmm.log_prob, **kw)
    gauss, _ = log_likelihood(gmm, x, **kw)
    mismatch = gmm.log_prob(info["x_end"], 80.0) - gaussian_prior(info["x_end"], 80.0)
    assert torch.allclose(exact - gauss, mismatch, atol=1e-10)
    assert mismatch.abs().max() < 0.05


def test_rk4_is_fourth_order():
    gmm = GaussianMixture.random(3, 2, process=rectified_flow(), seed=4)
    x = _points(gmm, 4, 6)
    ref = gmm.log_prob(x, gmm.process.t_min)
    errs = [
        float(
            (log_likelihood(gmm, x, prior=gmm.log_prob, method="rk4", steps=n)[0] - ref).abs().max()
        )
        for n in (40, 80)
    ]
    assert 10 < errs[0] / errs[1] < 24  # 2^4 = 16


def test_hutchinson_is_unbiased():
    """Fixed probes per solve: the estimate's error has mean zero within its standard error,
    and its spread is the closed form's order (not zero: a real estimate)."""
    gmm = GaussianMixture.random(4, 3, process=edm(), seed=5)
    x = _points(gmm, 1, 7).expand(300, 4).contiguous()
    lp, _ = log_likelihood(
        gmm, x, prior=gmm.log_prob, trace="hutchinson", probes=1, method="rk4", steps=24, seed=3
    )
    exact, _ = log_likelihood(gmm, x[:1], prior=gmm.log_prob, method="rk4", steps=24)
    err = lp - exact
    se = float(err.std()) / math.sqrt(err.numel())
    assert float(err.std()) > 1e-3
    assert abs(float(err.mean())) < 4 * se


def test_linear_model_closed_form():
    """A linear denoiser D(y) = c y on VE: the PF-ODE is linear, the density Gaussian."""
    c = 0.3
    model = CallableDenoiser(lambda x, t: c * x, ve(), "x0")
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lp, _ = log_likelihood(
        model,
        x,
        t_start=0.2,
        t_end=0.9,
        method="rk4",
        steps=64,
        prior=lambda xe, t: gaussian_prior(xe, 1.0),
    )
    # dy/du = (1 - c) y: y(u1) = y0 (s1/s0)^(1-c); log p0 = log N(y1) + d (1 - c) (u1 - u0)
    p = ve()
    s0, s1 = float(p.sigma(0.2)), float(p.sigma(0.9))
    k = (s1 / s0) ** (1 - c)
    ref = gaussian_prior(x * k, 1.0) + 5 * (1 - c) * math.log(s1 / s0)
    assert torch.allclose(lp, ref, rtol=1e-5)


def test_bits_per_dim_and_errors():
    lp = torch.tensor([-256 * math.log(2)], dtype=torch.float64)
    assert float(bits_per_dim(lp, 256)) == pytest.approx(1.0)
    assert float(bits_per_dim(lp, 256, scale=2.0)) == pytest.approx(2.0)
    gmm = GaussianMixture.random(2, 2, process=edm(), seed=0)
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="t_start"):
        log_likelihood(gmm, x, t_start=10.0, t_end=1.0)
    with pytest.raises(ValueError, match="method"):
        log_likelihood(gmm, x, method="rk5")
    with pytest.raises(ValueError, match="trace"):
        log_likelihood(gmm, x, trace="bogus")


@pytest.mark.slow
def test_digits_bits_per_dim_finite():
    from diffusolve.models import load
    from diffusolve.models.data import load_digits

    model = load("digits")
    x, y = load_digits("heldout")
    lp, info = log_likelihood(model, x[:4], y[:4], trace="hutchinson", method="rk4", steps=4)
    assert torch.isfinite(lp).all() and info["nfe"] == 16
    assert isinstance(model.process, type(ddpm()))
