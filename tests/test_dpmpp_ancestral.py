"""DPM-Solver++(2S) ancestral: eta = 0 is dpmpp_2s; eta = 1 samples the exact marginal."""

import math

import pytest
import torch

import diffusolve
from diffusolve.models import Gaussian
from diffusolve.process import get_process, make_grid, vp_linear
from diffusolve.solvers import BoundModel, StepContext, get_solver

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _prior(process):
    cov = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)
    return Gaussian(torch.tensor([0.5, -1.0], dtype=F64), cov, process=process)


def test_eta_zero_is_dpmpp_2s():
    for name in ("vp-linear", "ddpm-linear", "edm", "rectified-flow"):
        prior = _prior(get_process(name))
        x = prior.process.prior_sample((8, 2), torch.Generator().manual_seed(0), dtype=F64)
        a = diffusolve.sample(prior, x, 12, "dpmpp_2s_ancestral", eta=0.0, grid_kind="logsnr")
        b = diffusolve.sample(prior, x, 12, "dpmpp_2s", grid_kind="logsnr")
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name


def test_one_step_against_hand_formula():
    """One ancestral step in x / alpha against s = sigma / alpha, written out by hand."""
    prior = _prior(vp_linear())
    p = prior.process
    x = p.prior_sample((4, 2), torch.Generator().manual_seed(1), dtype=F64)
    t, t1 = torch.tensor(0.6, dtype=F64), torch.tensor(0.3, dtype=F64)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    ctx = StepContext(0, 1, "none", lambda shape, dtype, device=None: z.to(dtype))
    out, _ = get_solver("dpmpp_2s_ancestral").step(BoundModel(prior), x, t, t1, None, ctx)
    a, a1 = float(p.alpha(t)), float(p.alpha(t1))
    s, s1 = float(p.sigma(t)) / a, float(p.sigma(t1)) / a1
    up = math.sqrt(s1**2 * (s**2 - s1**2) / s**2)
    down = math.sqrt(s1**2 - up**2)
    h = math.log(s / down)
    s_mid = s * math.exp(-h / 2)
    t_mid = p.t_of_sigma_tilde(s_mid)
    xt = x / a
    d0 = prior(x, t)
    u = (s_mid / s) * xt - math.expm1(-h / 2) * d0
    d1 = prior(float(p.alpha(t_mid)) * u, t_mid)
    ref = ((down / s) * xt - math.expm1(-h) * d1 + up * z) * a1
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_samples_the_exact_marginal():
    """From the exact marginal at t_max, eta = 1 must give the exact marginal at t_end:
    mean and covariance within 5 standard errors of n samples (see test_dpm_solvers)."""
    prior = _prior(vp_linear())
    p = prior.process
    mean, cov = prior.mean, prior.cov
    n = 8000

    def marginal(t):
        a, s = float(p.alpha(t)), float(p.sigma(t))
        return a * mean, a * a * cov + s * s * torch.eye(2, dtype=F64)

    grid = make_grid(p, 100, "logsnr", t_end=0.05)
    m0, c0 = marginal(grid[0])
    g = torch.Generator().manual_seed(5)
    xT = m0 + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(c0).T
    x = diffusolve.sample(prior, xT, grid, "dpmpp_2s_ancestral", final="none", noise=g)
    m1, c1 = marginal(grid[-1])
    se_m = torch.sqrt(torch.diag(c1) / n)
    se_c = torch.sqrt((torch.outer(torch.diag(c1), torch.diag(c1)) + c1**2) / n)
    assert torch.all((x.mean(0) - m1).abs() < 5 * se_m)
    assert torch.all((torch.cov(x.T) - c1).abs() < 5 * se_c)
    # the noise matters: half the noise scale leaves the covariance far off
    y = diffusolve.sample(prior, xT, grid, "dpmpp_2s_ancestral", final="none", noise=7, s_noise=0.5)
    assert torch.any((torch.cov(y.T) - c1).abs() > 20 * se_c)
