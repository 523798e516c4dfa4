"""The probability-flow endpoint at sigma -> 0 (bench ``--reference zero``), its closed form
for Gaussian priors, its O(s^2) agreement with the t_min reference, and the SD-betas task."""

from __future__ import annotations

import pytest
import torch

from diffusolve.metrics import rel_error
from diffusolve.models import Gaussian, GaussianMixture
from diffusolve.models.analytic.reference import (
    gaussian_endpoint_zero,
    pf_ode_solve,
    pf_ode_solve_to_zero,
)
from diffusolve.process import get_process

pytestmark = pytest.mark.usefixtures("single_thread")


def _gaussian(d: int, process, seed: int = 0) -> Gaussian:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(-2.5, 0, d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return Gaussian(mean, (q * evals) @ q.T, process=process)


@pytest.mark.parametrize("process", ["ddpm-scaled-linear", "rectified-flow", "edm"])
def test_gaussian_closed_form_is_the_limit_of_exact_flows(process):
    """x0 = mu + C^1/2 (C + s^2 I)^-1/2 (x~ - mu) is the s' -> 0 limit of the exact
    Gaussian PF map, and the numeric sigma -> 0 solve of a one-component mixture hits it."""
    p = get_process(process)
    g = _gaussian(5, p)
    x = p.prior_sample((6, 5), torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((6,), p.t_max, dtype=torch.float64)
    t = t * torch.linspace(1.0, 0.4, 6, dtype=torch.float64) + p.t_min * torch.linspace(
        0.0, 0.6, 6, dtype=torch.float64
    )  # per-sample start times
    zero = gaussian_endpoint_zero(g, x, t)
    # the exact PF map to a tiny noise level: y(s') = y(s) sqrt((l + s'^2) / (l + s^2))
    s = p.sigma_tilde(t)[:, None]
    tiny = 1e-7
    y = (x / p.alpha(t)[:, None] - g.mean) @ g.evecs
    near = g.mean + (y * torch.sqrt((g.evals + tiny**2) / (g.evals + s**2))) @ g.evecs.T
    assert rel_error(zero, near) < 1e-10
    one = GaussianMixture(torch.ones(1), g.mean[None], g.cov[None], process=p)
    numeric = one.reference_zero(x, t)
    assert rel_error(numeric, zero, "max") < 1e-9
    # the generic solver on the Gaussian's drift (x~ - D) / s^2 = U diag(1/(l+v)) U^T (x~ - mu)
    drift = lambda xt, v: ((xt - g.mean) @ g.evecs / (g.evals + v[:, None])) @ g.evecs.T  # noqa: E731
    num2, info = pf_ode_solve_to_zero(drift, x / p.alpha(t)[:, None], s[:, 0], scale=3e-3)
    assert rel_error(num2, zero, "max") < 1e-9 and info["nfev"] > 0


def test_zero_endpoint_needs_no_denoise():
    """At s = 0 the exact denoiser is the identity, and the GMM drift is finite there."""
    p = get_process("rectified-flow")
    m = GaussianMixture.random(3, 4, process=p, seed=2)
    x = m.sample(5, torch.Generator().manual_seed(0))
    g = m.pf_drift_v(x, torch.zeros(5, dtype=torch.float64))
    assert torch.isfinite(g).all()
    # G = (x~ - D(x~, s)) / s^2 through the process's own denoiser, and G(s) -> G(0)
    s = 1e-3
    t = p.t_of_sigma_tilde(torch.tensor(s, dtype=torch.float64))
    direct = (x - m(p.alpha(t) * x, t)) / s**2
    gs = m.pf_drift_v(x, torch.full((5,), s**2, dtype=torch.float64))
    assert rel_error(direct, gs) < 1e-7
    assert 0 < rel_error(gs, g) < 1e-2


def test_gmm_zero_endpoint_agrees_with_tmin_reference_to_second_order():
    """D(x(s), s) = x(0) - s^2/2 G + O(s^4): the t_min reference's distance to the
    sigma -> 0 endpoint shrinks like s^2 (Stable Diffusion's betas: s_min = 0.029)."""
    p = get_process("ddpm-scaled-linear")
    m = GaussianMixture.random(3, 3, process=p, seed=0, eig_range=(1e-2, 1e-1))
    # start from noised data at s = 1 (a shorter solve than from t_max; same ODE)
    t0 = p.t_of_sigma_tilde(torch.tensor(1.0, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x = p.alpha(t0) * m.sample(6, g) + p.sigma(t0) * torch.randn(
        6, 3, generator=g, dtype=torch.float64
    )
    zero = m.reference_zero(x, t0)
    s_min = float(p.sigma_tilde(p.t_min))
    assert s_min == pytest.approx(0.0292, abs=1e-3)
    assert m.reference_zero_accuracy(x, t0, n_check=3) < 1e-8
    errs = []
    for s in (s_min, s_min / 2, s_min / 4):
        t1 = p.t_of_sigma_tilde(torch.tensor(s, dtype=torch.float64))
        ref = m.reference(x, t0, t1)  # PF-ODE to t1 + exact denoiser
        errs.append(rel_error(ref, zero))
    assert errs[0] > 1e-5  # the difference the zero reference removes is not negligible
    assert errs[0] / errs[1] == pytest.approx(4.0, rel=0.1)
    assert errs[1] / errs[2] == pytest.approx(4.0, rel=0.05)
    # and the two ODE solvers agree where they overlap (to t1, no denoise)
    t1 = p.t_of_sigma_tilde(torch.tensor(s_min / 4, dtype=torch.float64))
    mid, _ = pf_ode_solve(m, p, x, t0, t1)
    assert rel_error(m.reference_zero(mid, t1), zero) < 1e-8


def test_bench_tasks_use_the_chosen_reference():
    from diffusolve.bench.tasks import TASKS, build_task

    assert TASKS["gmm-d32-sd"]["process"] == "ddpm-scaled-linear"
    zero = build_task("gauss-d2-vp", 4, reference="zero")
    tmin = build_task("gauss-d2-vp", 4, reference="tmin")
    assert torch.equal(zero.x_T, tmin.x_T)
    assert zero.info["reference_kind"] == "zero" and "sigma -> 0" in zero.info["reference"]
    d = rel_error(zero.ref, tmin.ref)
    assert 0 < d < 10 * zero.info["s_min"] ** 2  # O(s_min^2) apart, s_min = 0.01
    with pytest.raises(ValueError, match="reference"):
        build_task("gauss-d2-vp", 4, reference="t0")


def test_diffusers_runs_on_the_sd_betas():
    """Diffusers' DDIM with scaled-linear betas equals our DDIM on the SD process: the
    scheduler gets the task's own beta configuration, not DDPM-linear."""
    from diffusolve import sample
    from diffusolve.bench import diffusers_runner as dr

    p = get_process("ddpm-scaled-linear")
    g = _gaussian(2, p)
    x = p.prior_sample((8, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = next(s for s in dr.SPECS if s.method == "DDIM")
    betas = dr.betas_config(p.name)
    assert betas["beta_schedule"] == "scaled_linear"
    out = dr.run_scheduler(spec, {"timestep_spacing": "trailing"}, g, x, 5, "vp", betas=betas)
    grid = torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0], dtype=torch.float64)
    ours = sample(g, x, grid, "ddim", final="denoise")
    assert rel_error(out["x"], ours) < 2e-6
    wrong = dr.run_scheduler(spec, {"timestep_spacing": "trailing"}, g, x, 5, "vp")
    assert rel_error(wrong["x"], ours) > 1e-3
