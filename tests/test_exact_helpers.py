"""The exact-distribution checks themselves: calibrated false-alarm rates, power, exact W2,
and the affine probe (``tests/_exact.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from _exact import (
    affine_output_moments,
    assert_checks,
    bias_in_standard_errors,
    gaussian_denoised_marginal,
    gaussian_marginal,
    gaussian_w2,
    moment_checks,
    proportion_check,
    sw_check,
    sw_noise_floor,
    z_bonferroni,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
MEAN = torch.tensor([0.3, -0.5, 1.0], dtype=F64)
COV = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=F64)


def _gauss(n, seed, mean=MEAN, cov=COV):
    g = torch.Generator().manual_seed(seed)
    return (
        mean + torch.randn(n, mean.numel(), generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    )


def _binomial_range(trials, p, z=3.5):
    mu, sd = trials * p, math.sqrt(trials * p * (1 - p))
    return mu - z * sd, mu + z * sd


def test_z_bonferroni():
    assert z_bonferroni(0.05, 1) == pytest.approx(1.959964, abs=1e-6)
    assert z_bonferroni(0.05, 1, two_sided=False) == pytest.approx(1.644854, abs=1e-6)
    assert z_bonferroni(0.05, 10) == pytest.approx(z_bonferroni(0.005, 1))


def test_moment_checks_false_alarm_rate_is_calibrated():
    """At alpha = 0.1 the mean and covariance checks of exact Gaussian samples fail at
    about their nominal rates (Bonferroni: at most alpha / 2 each, close to it here)."""
    trials, alpha = 300, 0.1
    fails = torch.zeros(2)
    for seed in range(trials):
        checks = moment_checks(_gauss(300, seed), MEAN, COV, alpha=alpha)
        fails += torch.tensor([not c.passed for c in checks], dtype=torch.float32)
    lo, hi = _binomial_range(trials, alpha / 2)
    for f in fails.tolist():
        assert max(lo, 0.3 * trials * alpha / 2) <= f <= hi, fails


def test_moment_checks_non_gaussian_reference_is_calibrated():
    """For a bimodal target the covariance variance is estimated from an exact reference
    sample; without it (the Gaussian formula) the check would be miscalibrated."""
    w = torch.tensor([0.5, 0.5], dtype=F64)
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=F64)

    def draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(w, n, replacement=True, generator=g)
        return means[k] + 0.3 * torch.randn(n, 2, generator=g, dtype=F64)

    m = w @ means
    c = 0.09 * torch.eye(2, dtype=F64) + (
        w[:, None, None] * means[:, :, None] * means[:, None, :]
    ).sum(0)
    c = c - torch.outer(m, m)
    ref = draw(50_000, 10**6)
    trials, alpha = 200, 0.1
    fails_ref = fails_gauss = 0
    for seed in range(trials):
        x = draw(400, seed)
        fails_ref += not moment_checks(x, m, c, alpha=alpha, reference=ref)[1].passed
        fails_gauss += not moment_checks(x, m, c, alpha=alpha)[1].passed
    lo, hi = _binomial_range(trials, alpha / 2)
    assert max(lo, 0.3 * trials * alpha / 2) <= fails_ref <= hi, fails_ref
    # the bimodal first coordinate has negative excess kurtosis: the Gaussian formula
    # overstates the variance there and almost never fires (a miscalibrated check)
    assert fails_gauss < fails_ref


def test_moment_checks_power():
    """n = 4000: a 0.1-standard-deviation mean shift or a 10% variance error is caught."""
    n = 4000
    x = _gauss(n, 0)
    assert_checks(moment_checks(x, MEAN, COV))
    shifted = x + 0.1 * torch.sqrt(torch.diagonal(COV))
    assert not moment_checks(shifted, MEAN, COV)[0].passed
    scaled = x.clone()
    scaled[:, 2] = MEAN[2] + (x[:, 2] - MEAN[2]) * math.sqrt(1.1)
    assert not moment_checks(scaled, MEAN, COV)[1].passed
    # the whitened check sees the ill-conditioned direction: 15% more variance along the
    # smallest eigenvector only
    evals, evecs = torch.linalg.eigh(COV)
    v = evecs[:, 0]
    thin = x + ((x - MEAN) @ v)[:, None] * v * (math.sqrt(1.15) - 1)
    assert not moment_checks(thin, MEAN, COV)[1].passed
    # and the bias measure agrees with the checks' units
    bumped = COV + 0.15 * evals[0] * torch.outer(v, v)
    assert bias_in_standard_errors(MEAN, bumped, MEAN, COV, n) > 3


def test_proportion_check():
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert proportion_check(torch.tensor([5000, 3000, 2000]), probs).passed
    assert not proportion_check(torch.tensor([5300, 2800, 1900]), probs).passed


def test_sw_check_calibration_and_power():
    def exact(n, g):
        return torch.randn(n, 2, generator=g, dtype=F64) * torch.tensor([1.0, 0.3], dtype=F64)

    trials = 100
    fails = 0
    for seed in range(trials):
        x = exact(200, torch.Generator().manual_seed(10**6 + seed))
        floor = sw_noise_floor(exact, 200, 10, 100 * seed)
        fails += not sw_check(x, exact, alpha=0.1, floor=floor).passed
    lo, hi = _binomial_range(trials, 0.1)
    assert max(lo, 2) <= fails <= hi, fails
    x = exact(2000, torch.Generator().manual_seed(1))
    ok = sw_check(x, exact)
    assert ok.passed and 0.5 < ok.extra["multiple"] < 2.0, str(ok)
    shifted = x + torch.tensor([0.2, 0.0], dtype=F64)  # 0.2 standard deviations
    bad = sw_check(shifted, exact)
    assert not bad.passed, str(bad)


def test_gaussian_w2_closed_forms():
    m1, m2 = torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([1.0, -1.0], dtype=F64)
    d1, d2 = torch.tensor([1.0, 4.0], dtype=F64), torch.tensor([0.25, 9.0], dtype=F64)
    # commuting covariances: |dm|^2 + sum (sqrt(a) - sqrt(b))^2 = 5 + 0.25 + 1
    assert gaussian_w2(m1, torch.diag(d1), m2, torch.diag(d2)) == pytest.approx(math.sqrt(6.25))
    # rotation invariance, and symmetry
    th = 0.7
    r = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
    a = gaussian_w2(r @ m1, r @ torch.diag(d1) @ r.T, r @ m2, r @ torch.diag(d2) @ r.T)
    assert a == pytest.approx(2.5, rel=1e-12)
    c1 = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=F64)
    c2 = torch.tensor([[2.0, -0.3], [-0.3, 0.5]], dtype=F64)
    assert gaussian_w2(m1, c1, m2, c2) == pytest.approx(gaussian_w2(m2, c2, m1, c1), rel=1e-10)
    assert gaussian_w2(m1, c1, m1, c1) < 1e-7
    # 1-D: |dm|^2 + (s1 - s2)^2
    one = gaussian_w2(torch.zeros(1, dtype=F64), 4 * torch.ones(1, 1, dtype=F64),
                      torch.ones(1, dtype=F64), torch.ones(1, 1, dtype=F64))  # fmt: skip
    assert one == pytest.approx(math.sqrt(2.0))


def test_gaussian_laws_by_monte_carlo():
    """The hand formulas for the noised marginal and the denoised law, by simulation."""
    a, s = 0.8, 0.6
    x0 = _gauss(200_000, 3)
    xt = a * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert_checks(moment_checks(xt[:20_000], *gaussian_marginal(MEAN, COV, a, s)))
    r2 = (s / a) ** 2
    d = MEAN + (xt / a - MEAN) @ torch.linalg.solve(COV + r2 * torch.eye(3, dtype=F64), COV)
    assert_checks(moment_checks(d[:20_000], *gaussian_denoised_marginal(MEAN, COV, a, s)))


def test_affine_probe_recovers_a_hand_made_sampler():
    A = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64)
    b = torch.tensor([0.3, -0.2], dtype=F64)
    B1 = torch.tensor([[0.2, 0.0], [0.1, 0.4]], dtype=F64)
    B2 = torch.tensor([[0.0, 0.7], [0.3, 0.0]], dtype=F64)

    def run(x, noise):
        y = x @ A.T + b
        y = y + noise(tuple(x.shape), dtype=x.dtype) @ B1.T
        return y + noise(tuple(x.shape), dtype=x.dtype) @ B2.T

    cov_in = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=F64)
    law = affine_output_moments(run, 2, torch.ones(2, dtype=F64), cov_in)
    assert law.draws == 2
    torch.testing.assert_close(law.A, A)
    torch.testing.assert_close(law.b, b)
    torch.testing.assert_close(law.noise_cov, B1 @ B1.T + B2 @ B2.T)
    torch.testing.assert_close(law.mean, A @ torch.ones(2, dtype=F64) + b)
    torch.testing.assert_close(law.cov, A @ cov_in @ A.T + B1 @ B1.T + B2 @ B2.T)

    def squared(x, noise):
        return run(x, noise) ** 2

    with pytest.raises(AssertionError, match="not affine"):
        affine_output_moments(squared, 2, torch.zeros(2, dtype=F64), cov_in)


def test_sliced_w2_matches_the_library_metric():
    """The helper's sort-based sliced W2 and diffusolve.metrics.sliced_wasserstein (POT)
    agree on equal-size sets with the same directions (two independent routes)."""
    from _exact import sliced_w2

    from diffusolve.metrics import random_projections, sliced_wasserstein

    x = _gauss(700, 1)
    y = _gauss(700, 2) * 1.1 + 0.2
    dirs = torch.from_numpy(random_projections(3, 64, seed=5))
    assert sliced_w2(x, y, dirs) == pytest.approx(
        sliced_wasserstein(x, y, n_projections=64, seed=5), rel=1e-10
    )
    # a translation by c along a unit vector u: every projection moves by c (u . theta)
    u = torch.tensor([0.6, 0.8, 0.0], dtype=F64)
    want = 0.5 * float(((u @ dirs) ** 2).mean().sqrt())
    assert sliced_w2(x, x + 0.5 * u, dirs) == pytest.approx(want, rel=1e-12)
