"""Processes, parameterisation conversions and grids."""

import math

import pytest
import torch

from diffusolve.process import (
    GRIDS,
    PREDICTIONS,
    PROCESSES,
    check_grid,
    convert,
    ddpm,
    from_scheduler_config,
    get_process,
    make_grid,
    rectified_flow,
    to_x0,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = sorted(PROCESSES)


@pytest.mark.parametrize("name", NAMES)
def test_lambda_inverse_and_monotone(name):
    p = get_process(name)
    p.validate()
    ts = torch.linspace(p.t_min, p.t_max, 101, dtype=torch.float64)
    back = p.t_of_lambda(p.lam(ts))
    assert torch.allclose(back, ts, rtol=1e-9, atol=1e-9 * max(1.0, p.t_max))
    assert torch.allclose(p.lam(ts), torch.log(p.alpha(ts) / p.sigma(ts)), atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_finite_differences(name):
    p = get_process(name)
    t = torch.tensor(p.t_min + 0.37 * (p.t_max - p.t_min), dtype=torch.float64)
    h = 1e-6 * max(1.0, p.t_max)
    fd_a = (p.alpha(t + h) - p.alpha(t - h)) / (2 * h)
    fd_s = (p.sigma(t + h) - p.sigma(t - h)) / (2 * h)
    assert torch.allclose(p.d_alpha(t), fd_a, rtol=1e-5, atol=1e-9)
    assert torch.allclose(p.d_sigma(t), fd_s, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("src", PREDICTIONS)
@pytest.mark.parametrize("dst", PREDICTIONS)
def test_conversions_round_trip(name, src, dst):
    p = get_process(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = p.t_min + 0.4 * (p.t_max - p.t_min)
    x = p.marginal(x0, t, eps)
    pred = convert(p, x, t, x0, "x0", src)
    back = convert(p, x, t, convert(p, x, t, pred, src, dst), dst, "x0")
    assert torch.allclose(back, x0, rtol=1e-8, atol=1e-8)
    # the true epsilon is recovered from the true x0
    assert torch.allclose(convert(p, x, t, x0, "x0", "epsilon"), eps, atol=1e-8)


def test_velocity_is_time_derivative():
    p = get_process("vp-cosine")
    x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t, h = 0.3, 1e-6
    v_fd = (p.marginal(x0, t + h, eps) - p.marginal(x0, t - h, eps)) / (2 * h)
    x = p.marginal(x0, t, eps)
    assert torch.allclose(convert(p, x, t, x0, "x0", "velocity"), v_fd, atol=1e-6)


def test_rectified_flow_velocity_is_eps_minus_x0():
    p = rectified_flow()
    x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    x = p.marginal(x0, 0.3, eps)
    assert torch.allclose(to_x0(p, x, 0.3, eps - x0, "velocity"), x0, atol=1e-12)


def test_ddpm_matches_diffusers_alphas_cumprod():
    from diffusers import DDPMScheduler

    for sched in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        ref = DDPMScheduler(beta_schedule=sched, beta_start=0.00085, beta_end=0.012)
        p = from_scheduler_config(ref.config)
        t = torch.arange(1000, dtype=torch.float64)
        assert torch.allclose(p.alpha(t) ** 2, ref.alphas_cumprod.double(), rtol=1e-12, atol=0)


def test_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        from_scheduler_config({"rescale_betas_zero_snr": True})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", GRIDS)
def test_grids_monotone_and_end_where_asked(name, kind):
    p = get_process(name)
    g = make_grid(p, 12, kind)
    assert g.dtype == torch.float64 and g.numel() == 13
    assert torch.all(g[1:] < g[:-1])
    assert float(g[0]) == p.t_max and float(g[-1]) == p.t_min
    t_end = p.t_min + 0.1 * (p.t_max - p.t_min)
    g2 = make_grid(p, 5, kind, t_end=t_end)
    assert math.isclose(float(g2[-1]), t_end)


def test_logsnr_grid_is_uniform_in_lambda():
    p = ddpm()
    lam = p.lam(make_grid(p, 10, "logsnr"))
    d = lam[1:] - lam[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-9)


def test_bad_grids_raise():
    p = ddpm()
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_grid(p, torch.tensor([999.0, 500.0, 600.0, 0.0]))
    with pytest.raises(ValueError, match="lie in"):
        check_grid(p, torch.tensor([1500.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        check_grid(p, torch.tensor([10.0]))
    with pytest.raises(ValueError, match="n_steps"):
        make_grid(p, 0)
    with pytest.raises(ValueError, match="unknown grid"):
        make_grid(p, 3, "nope")


def test_prior_sample_takes_seeds_like_sample():
    """noise= takes an int seed (per-sample seeds s, s+1, ...), a list of seeds, a generator
    or a noise source; sample i depends on its seed only, not on the batch."""
    from diffusolve.solvers import SeededNoise

    p = ddpm()
    a = p.prior_sample((4, 3), noise=2)
    assert torch.equal(a, p.prior_sample((4, 3), noise=[2, 3, 4, 5]))
    assert torch.equal(a, p.prior_sample((4, 3), noise=SeededNoise(range(2, 6))))
    assert torch.equal(a[1:2], p.prior_sample((1, 3), noise=3))
    assert p.prior_sample((2, 3), noise=0, dtype=torch.float64).dtype == torch.float64
    # the generator keeps working, positionally or as noise=
    g = p.prior_sample((2, 3), torch.Generator().manual_seed(0))
    assert torch.equal(g, p.prior_sample((2, 3), noise=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="one seed per sample"):
        p.prior_sample((2, 3), noise=[1, 2, 3])
    with pytest.raises(TypeError, match="noise must be"):
        p.prior_sample((2, 3), noise="seed")
    with pytest.raises(ValueError, match="either generator or noise"):
        p.prior_sample((2, 3), torch.Generator(), noise=0)
