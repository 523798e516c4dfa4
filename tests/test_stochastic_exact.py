"""Every stochastic sampling path against exact distributions.

On a Gaussian prior every solver step is affine in the state and the injected noise, so the
law of a solve's output is Gaussian and computable exactly (``affine_output_moments``
probes the solver with basis inputs and basis noise). That gives, with no sampling error:

* the weak order: the exact 2-Wasserstein distance between the output law and the target
  (the exact marginal at the last grid time), fitted against NFE, must match the path's
  declared weak order within +-0.2. Measured slopes (128-512 steps, four processes) lie
  within 0.03 of it for every path except EDM churn with s_churn = 40 (Euler 0.897-0.903,
  Heun 1.943-1.959: the churn factor is capped below 97 steps, so the fit is still
  slightly pre-asymptotic): at least 0.097 of margin on the passing side, while a path
  that loses one order misses the bound by at least 0.8;
* the bias of the sample tests below, asserted small before samples are compared.

Then real samples (real noise streams) are compared with the exact data law: mean and
covariance on Gaussian priors with tolerances from the sample size (``tests/_exact.py``),
and the sliced Wasserstein distance to exact samples on a Gaussian mixture against the
noise floor. Consistency sampling (``lcm``) is exact at any number of steps with a
consistency function and is checked that way.

Default run: the weak order on three processes, samples on two, the mixture on one; the
rest (vp-cosine, rectified flow for samples and the mixture) is marked ``slow``.

Expected laws come from hand formulas (the marginal ``N(a m, a^2 C + s^2 I)``, the law of
the exact denoiser, the closed-form probability-flow map), never from the code under test.
"""

from __future__ import annotations

import functools

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
    moment_critical_value,
    sw_check,
    sw_noise_floor,
    z_bonferroni,
)
from _stochastic import (
    CONSISTENCY,
    path_ids,
    registry_name,
    stochastic_aliases,
    stochastic_paths,
    weak_order,
)
from _targets import COV, MEAN, gmm_marginal_moments, gmm_marginal_sampler, mixture

import diffusolve
from diffusolve.models import Gaussian
from diffusolve.process import get_process, make_grid
from diffusolve.solvers import get_solver

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PROCESSES = ["ddpm-linear", "vp-cosine", "rectified-flow", "edm"]

PATHS = stochastic_paths()
SDE_PATHS = [p for p in PATHS if registry_name(*p) not in CONSISTENCY]
CONSISTENCY_PATHS = [p for p in PATHS if registry_name(*p) in CONSISTENCY]

#: weak-order fit: 128-512 steps is the asymptotic regime of every path (with s_churn=40
#: the churn factor is capped at sqrt(2)-1 below 97 steps, which bends the fit there)
ORDER_STEPS = (128, 256, 512)
ORDER_MARGIN = 0.2
#: exact W2 at 512 steps, 1.5x the largest value measured over the processes above
#: (order 1: 0.012-0.035; order 2: 1.6e-4-9.5e-4)
W2_CAP = {1: 0.05, 2: 1.5e-3}
#: first step count tried by the sample tests; doubled (up to 4096) until the exact bias is
#: below a quarter of the sampling tolerance (at n = 4000: 1024 steps suffice for weak
#: order 1 except Euler with s_churn=40, which needs 2048; 128 for weak order 2)
SAMPLE_STEPS = {1: 1024, 2: 128}
N_SAMPLES = 4000


def _ends(p, grid):
    a0, s0 = float(p.alpha(grid[0])), float(p.sigma(grid[0]))
    a1, s1 = float(p.alpha(grid[-1])), float(p.sigma(grid[-1]))
    return (a0, s0), (a1, s1)


def exact_law(model, grid, solver, final, mean=MEAN, cov=COV, stats=None):
    """Exact output law of ``sample`` started from the exact marginal at ``grid[0]``."""
    (a0, s0), _ = _ends(model.process, grid)
    m_in, c_in = gaussian_marginal(mean, cov, a0, s0)

    def run(x, noise):
        return diffusolve.sample(model, x, grid, solver, final=final, noise=noise, stats=stats)

    return affine_output_moments(run, mean.numel(), m_in, c_in)


def marginal_samples(n, mean, cov, a, s, seed):
    """Exact samples of ``a x0 + s eps``, x0 ~ N(mean, cov) (Cholesky, by hand)."""
    g = torch.Generator().manual_seed(seed)
    x0 = mean + torch.randn(n, mean.numel(), generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    return a * x0 + s * torch.randn(n, mean.numel(), generator=g, dtype=F64)


def fitted_slope(nfes, errs):
    lx = torch.log(torch.tensor(nfes, dtype=F64))
    ly = torch.log(torch.tensor(errs, dtype=F64))
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def _ids(paths):
    return path_ids(paths)


def test_every_stochastic_path_is_stochastic_and_declared():
    """The table is complete: each path draws noise, and its weak order is declared."""
    names = {registry_name(n, o) for n, o in PATHS}
    assert {"ddpm", "sde_dpmpp_2m", "lcm", "ddim", "euler", "heun"} <= names, names
    for name, options in PATHS:
        solver = get_solver(name, **options)
        assert solver.stochastic, (name, options)
        if registry_name(name, options) not in CONSISTENCY:
            assert weak_order(name, options) in (1, 2)
    # aliases build a solver that a path above covers (same class and options)
    built = [get_solver(n, **o) for n, o in PATHS]
    for alias in stochastic_aliases():
        assert get_solver(alias) in built, alias
    # the deterministic counterparts of the options draw no noise
    for name, zero in (("ddim", {"eta": 0.0}), ("euler", {}), ("heun", {"s_churn": 0.0})):
        assert not get_solver(name, **zero).stochastic


# ------------------------------------------------------------------ exact law, weak order
def _slow(*names):
    return [pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize(
    "process_name", ["ddpm-linear", "rectified-flow", "edm", *_slow("vp-cosine")]
)
@pytest.mark.parametrize(("name", "options"), SDE_PATHS, ids=_ids(SDE_PATHS))
def test_weak_order_on_gaussian(name, options, process_name):
    p = get_process(process_name)
    prior = Gaussian(MEAN, COV, process=p)
    solver = get_solver(name, **options)
    order = weak_order(name, options)
    errs, nfes = [], []
    for n in ORDER_STEPS:
        grid = make_grid(p, n, solver.natural_grid)
        stats: dict = {}
        law = exact_law(prior, grid, solver, "none", stats=stats)
        _, (a1, s1) = _ends(p, grid)
        target = gaussian_marginal(MEAN, COV, a1, s1)
        errs.append(gaussian_w2(law.mean, law.cov, *target))
        nfes.append(stats["nfe"])
        assert law.draws >= 1, "a stochastic path that never draws noise"
    slope = fitted_slope(nfes, errs)
    msg = f"{name} {options} on {process_name}: W2 {errs} at NFE {nfes}, slope {slope:.3f}"
    assert abs(slope - order) <= ORDER_MARGIN, msg
    assert errs[-1] <= W2_CAP[order], msg


# ------------------------------------------------------------------ samples vs exact law
def _sample_test(name, options, process_name, n=N_SAMPLES, noise_kind="generator"):
    p = get_process(process_name)
    prior = Gaussian(MEAN, COV, process=p)
    solver = get_solver(name, **options)
    steps = SAMPLE_STEPS[weak_order(name, options)]
    while True:
        grid = make_grid(p, steps, solver.natural_grid)
        (a0, s0), (a1, s1) = _ends(p, grid)
        target = gaussian_denoised_marginal(MEAN, COV, a1, s1)
        # the sampler's exact bias at this NFE, in the units of the checks below: small
        law = exact_law(prior, grid, solver, "denoise")
        bias = bias_in_standard_errors(law.mean, law.cov, *target, n)
        if bias <= 0.25 * moment_critical_value(3) or steps >= 4096:
            break
        steps *= 2
    assert bias <= 0.25 * moment_critical_value(3), (
        f"{steps} steps leave a bias of {bias:.2f} standard errors: a weak order lost?"
    )
    x = marginal_samples(n, MEAN, COV, a0, s0, seed=1)
    if noise_kind == "generator":
        noise = torch.Generator().manual_seed(2)
    else:
        noise = 10_000  # per-sample seeds 10000 .. 10000 + n - 1
    out = diffusolve.sample(prior, x, grid, solver, noise=noise)
    checks = moment_checks(out, *target)
    assert_checks(
        checks, f"{name} {options} on {process_name}, {steps} steps, bias {bias:.2f} s.e."
    )
    return checks


@pytest.mark.parametrize(
    "process_name", ["ddpm-linear", "edm", *_slow("rectified-flow", "vp-cosine")]
)
@pytest.mark.parametrize(("name", "options"), SDE_PATHS, ids=_ids(SDE_PATHS))
def test_samples_match_exact_gaussian(name, options, process_name):
    _sample_test(name, options, process_name)


def test_per_sample_seeds_give_the_exact_law():
    """The seeded noise source (one generator per sample) is standard normal noise too."""
    _sample_test("sde_dpmpp_2m", {}, "ddpm-linear", n=2000, noise_kind="seeds")


# ------------------------------------------------------------------ consistency sampling
class GaussianConsistency:
    """The consistency function of a Gaussian prior: the exact probability-flow map to the
    data (``s = 0``), by hand: in the eigenbasis of the covariance,
    ``y(0) = y(s) sqrt(l / (l + s^2))`` with ``y = U^T (x / alpha - mean)``, ``s = sigma / alpha``.
    """

    def __init__(self, mean, cov, process):
        self.mean, self.process = mean, process
        self.evals, self.evecs = torch.linalg.eigh(cov)

    def __call__(self, x, t, cond=None):
        a, s = float(self.process.alpha(t)), float(self.process.sigma(t))
        y = (x / a - self.mean) @ self.evecs
        y0 = y * torch.sqrt(self.evals / (self.evals + (s / a) ** 2))
        return self.mean + y0 @ self.evecs.T


@pytest.mark.parametrize("process_name", PROCESSES)
@pytest.mark.parametrize(("name", "options"), CONSISTENCY_PATHS, ids=_ids(CONSISTENCY_PATHS))
def test_consistency_sampling_is_exact_with_a_consistency_function(name, options, process_name):
    p = get_process(process_name)
    model = GaussianConsistency(MEAN, COV, p)
    solver = get_solver(name, **options)
    for steps in (1, 2, 3, 8):
        grid = make_grid(p, steps, solver.natural_grid)
        _, (a1, s1) = _ends(p, grid)
        law = exact_law(model, grid, solver, "none")
        assert law.draws == steps
        m1, c1 = gaussian_marginal(MEAN, COV, a1, s1)
        torch.testing.assert_close(law.mean, m1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(law.cov, c1, rtol=1e-9, atol=1e-12)
        law = exact_law(model, grid, solver, "denoise")
        torch.testing.assert_close(law.mean, MEAN, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(law.cov, COV, rtol=1e-9, atol=1e-12)
    # and real samples: 4 steps, n = 4000
    grid = make_grid(p, 4, solver.natural_grid)
    (a0, s0), _ = _ends(p, grid)
    x = marginal_samples(N_SAMPLES, MEAN, COV, a0, s0, seed=3)
    out = diffusolve.sample(model, x, grid, solver, noise=torch.Generator().manual_seed(4))
    assert_checks(moment_checks(out, MEAN, COV), f"{name} on {process_name}")


# ------------------------------------------------------------------ Gaussian mixture
# (the mixture and its exact marginals from _targets)


@functools.cache
def _gmm_reference(process_name, a, s, n):
    """A large exact sample (for the kurtosis of the covariance check) and the SW noise
    floor at ``n``, shared by every path on one process."""
    exact = gmm_marginal_sampler(a, s)
    return exact(100_000, torch.Generator().manual_seed(9)), sw_noise_floor(exact, n)


@pytest.mark.parametrize("process_name", ["ddpm-linear", *_slow("rectified-flow")])
@pytest.mark.parametrize(("name", "options"), SDE_PATHS, ids=_ids(SDE_PATHS))
def test_gaussian_mixture_within_noise_floor(name, options, process_name):
    """Sliced Wasserstein to exact mixture samples within the noise floor's prediction
    bound, and mean and covariance within tolerances from n (kurtosis from exact draws)."""
    p = get_process(process_name)
    gmm = mixture(p)
    solver = get_solver(name, **options)
    grid = make_grid(p, SAMPLE_STEPS[weak_order(name, options)], solver.natural_grid)
    (a0, s0), (a1, s1) = _ends(p, grid)
    n = 2000
    x = gmm_marginal_sampler(a0, s0)(n, torch.Generator().manual_seed(7))
    out = diffusolve.sample(
        gmm, x, grid, solver, final="none", noise=torch.Generator().manual_seed(8)
    )
    exact = gmm_marginal_sampler(a1, s1)
    ref, floor = _gmm_reference(process_name, a1, s1, n)
    checks = [
        sw_check(out, exact, floor=floor),
        *moment_checks(out, *gmm_marginal_moments(a1, s1), reference=ref),
    ]
    assert_checks(checks, f"{name} {options} on {process_name}")


def test_checks_reject_a_wrong_noise_scale():
    """Power: the same pipeline with the noise scaled by 1.1 fails the sample checks."""
    p = get_process("ddpm-linear")
    prior = Gaussian(MEAN, COV, process=p)
    grid = make_grid(p, 128, "logsnr")
    (a0, s0), (a1, s1) = _ends(p, grid)
    x = marginal_samples(N_SAMPLES, MEAN, COV, a0, s0, seed=1)
    g = torch.Generator().manual_seed(2)

    def loud(shape, *, dtype=torch.float32, device=None):
        return 1.1 * torch.randn(shape, generator=g, dtype=dtype, device=device)

    out = diffusolve.sample(prior, x, grid, "sde_dpmpp_2m", noise=loud)
    checks = moment_checks(out, *gaussian_denoised_marginal(MEAN, COV, a1, s1))
    assert not all(c.passed for c in checks), [str(c) for c in checks]
    assert z_bonferroni(1e-4, 6) < checks[1].statistic
