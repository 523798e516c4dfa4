"""DEIS, PNDM / PLMS and iPNDM: reductions to DDIM, weights, orders, NFE, every process."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffusolve import sample
from diffusolve.models import Gaussian
from diffusolve.process import PROCESSES, get_process, make_grid, vp_linear
from diffusolve.solvers import BoundModel, StepContext, get_solver
from diffusolve.solvers.deis import lagrange_basis, rhoab_coefficients, tab_coefficients
from diffusolve.solvers.pndm import AB_COEFFICIENTS

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = [
    "deis_tab1",
    "deis_tab2",
    "deis_tab3",
    "deis_rhoab2",
    "deis_rhoab3",
    "pndm",
    "plms",
    "ipndm",
    "ipndm_v",
]
# each solver family, reduced to its first-order member
FIRST_ORDER = [
    ("deis_tab3", {"order": 1}),
    ("deis_rhoab3", {"order": 1}),
    ("plms", {"lms_order": 1}),
    ("ipndm", {"lms_order": 1}),
    ("ipndm_v", {"order": 1}),
]


def _prior(process=None):
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]])
    return Gaussian(torch.tensor([0.3, -0.5, 1.0]), cov, process=process or vp_linear())


def _x_start(prior, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return prior.process.prior_sample((n, 3), gen, dtype=torch.float64)


def _rel_error(prior, name, grid, **opts):
    x_start = _x_start(prior)
    x = sample(prior, x_start, grid, name, final="none", **opts)
    ref = prior.ode_solution(x_start, grid[0], grid[-1])
    return float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def _slope(steps, errs):
    lx = np.log(np.asarray(steps, dtype=np.float64))
    ly = np.log(np.asarray(errs))
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


@pytest.mark.parametrize("process_name", ["vp-linear", "ddpm-linear", "ve", "rectified-flow"])
def test_deis_tab1_is_ddim(process_name):
    prior = _prior(get_process(process_name))
    x_start = _x_start(prior)
    grid = make_grid(prior.process, 7, "time_quadratic")
    a = sample(prior, x_start, grid, "deis_tab1", final="none")
    b = sample(prior, x_start, grid, "ddim", final="none")
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("name,opts", FIRST_ORDER)
def test_first_order_members_are_ddim(name, opts):
    prior = _prior()
    x_start = _x_start(prior)
    grid = make_grid(prior.process, 9, get_solver(name).natural_grid)
    a = sample(prior, x_start, grid, name, final="none", **opts)
    b = sample(prior, x_start, grid, "ddim", final="none")
    assert get_solver(name, **opts).order == 1
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_tab_weights_integrate_polynomials_in_t_exactly():
    """sum_j C_j f(t_j) = int f(tau) dsigma~(tau) for every f of degree < k."""
    p = vp_linear()
    times, t_next = [0.5, 0.58, 0.7], 0.41
    c = tab_coefficients(p, times, t_next)

    def dst(tau):  # d sigma~ / d tau
        return float(-p.sigma_tilde(tau) * (p.lam(tau + 1e-6) - p.lam(tau - 1e-6)) / 2e-6)

    for deg in range(3):
        exact = quad(lambda tau, d=deg: tau**d * dst(tau), times[0], t_next, epsabs=1e-13)[0]
        assert math.isclose(float(np.dot(c, np.asarray(times) ** deg)), exact, rel_tol=1e-7)
    assert math.isclose(c.sum(), float(p.sigma_tilde(t_next) - p.sigma_tilde(times[0])))


def test_rhoab_weights_are_adams_bashforth_on_uniform_steps():
    for k, ab in AB_COEFFICIENTS.items():
        h = -0.25
        sig = [1.0 - j * h for j in range(k)]  # newest first, sigma~ decreasing in time
        np.testing.assert_allclose(rhoab_coefficients(sig, 1.0 + h) / h, ab, rtol=1e-12)


def test_lagrange_basis_is_a_partition_of_unity():
    x = np.linspace(-1.0, 2.0, 7)
    basis = lagrange_basis([0.0, 0.4, 1.3], x)
    np.testing.assert_allclose(basis.sum(axis=0), 1.0, rtol=1e-13)
    np.testing.assert_allclose(lagrange_basis([0.0, 0.4, 1.3], np.array([0.4]))[:, 0], [0, 1, 0])


def test_variable_step_methods_reach_their_order_on_a_time_uniform_grid():
    """Per-step weights keep tAB3 and rhoAB3 at order 3 on a grid not uniform in sigma~."""
    prior = _prior()
    steps = [64, 96, 128]
    for name in ("deis_tab3", "deis_rhoab3"):
        grids = [make_grid(prior.process, n, "time_uniform", t_end=0.1) for n in steps]
        errs = [_rel_error(prior, name, g) for g in grids]
        assert abs(_slope(steps, errs) - 3) < 0.35, (name, errs)


def test_fixed_coefficients_are_exact_only_on_a_sigma_tilde_uniform_grid():
    """iPNDM's fixed weights are AB4 in sigma~: equal to iPNDM_v on a sigma~-uniform grid."""
    prior = _prior()
    grid = make_grid(prior.process, 12, "karras", rho=1.0, t_start=0.6, t_end=0.1)
    a = sample(prior, _x_start(prior), grid, "ipndm", final="none")
    b = sample(prior, _x_start(prior), grid, "ipndm_v", final="none")
    assert torch.allclose(a, b, rtol=1e-11, atol=1e-11)
    karras = make_grid(prior.process, 12, "karras", t_start=0.6, t_end=0.1)
    a = sample(prior, _x_start(prior), karras, "ipndm", final="none")
    assert not torch.allclose(a, sample(prior, _x_start(prior), karras, "ipndm_v", final="none"))


def test_pseudo_multistep_is_second_order_on_uniform_time_steps():
    """PLMS on linear time steps: the AB4 weights in t do not fit the dsigma~ integral."""
    prior = _prior()
    steps = [96, 128, 192]
    grids = [make_grid(prior.process, n, "time_uniform", t_end=0.02) for n in steps]
    errs = [_rel_error(prior, "plms", g) for g in grids]
    assert abs(_slope(steps, errs) - 2.0) < 0.2, errs


def test_honest_orders_and_grids():
    expect = {
        "deis_tab1": (1, "time_quadratic"),
        "deis_tab2": (2, "time_quadratic"),
        "deis_tab3": (3, "time_quadratic"),
        "deis_rhoab2": (2, "time_quadratic"),
        "deis_rhoab3": (3, "time_quadratic"),
        "pndm": (2, "time_uniform"),
        "plms": (2, "time_uniform"),
        "ipndm": (2, "karras"),
        "ipndm_v": (4, "karras"),
    }
    for name, (order, grid) in expect.items():
        s = get_solver(name)
        assert (s.order, s.natural_grid, s.multistep, s.stochastic) == (order, grid, True, False)


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_pndm_nfe_matches_the_loop(n):
    prior = _prior()
    solver = get_solver("pndm")
    for final in ("none", "denoise"):
        stats = {}
        grid = make_grid(prior.process, n, "time_uniform")
        sample(prior, _x_start(prior), grid, solver, final=final, stats=stats)
        assert stats["nfe"] == solver.nfe(n) + (final == "denoise")
    assert solver.nfe(n) == 4 * min(n, 3) + max(n - 3, 0)


@pytest.mark.parametrize("name", ["plms", "ipndm", "deis_tab3", "ipndm_v"])
def test_one_evaluation_per_step(name):
    prior = _prior()
    stats = {}
    sample(prior, _x_start(prior), make_grid(prior.process, 6), name, final="none", stats=stats)
    assert stats["nfe"] == 6 == get_solver(name).nfe(6)


def test_pseudo_runge_kutta_step_has_local_order_3():
    """One pseudo RK step: local error O(h^3) (DDIM: O(h^2)); the t-weights cap it at 3."""
    prior = _prior()
    x = _x_start(prior)
    t = torch.tensor(0.5, dtype=torch.float64)
    hs = [0.04, 0.02, 0.01]
    slopes = {}
    for name in ("pndm", "ddim"):
        errs = []
        for h in hs:
            solver, model = get_solver(name), BoundModel(prior)
            state = solver.init(model, x)
            out, _ = solver.step(model, x, t, t - h, state, StepContext(0, 1, "none"))
            ref = prior.ode_solution(x, t, t - h)
            errs.append(float((out - ref).norm(dim=1).mean()))
        slopes[name] = -_slope(hs, errs)
    assert abs(slopes["pndm"] - 3) < 0.2 and abs(slopes["ddim"] - 2) < 0.2, slopes


@pytest.mark.parametrize("name", ["deis_tab3", "deis_rhoab3", "ipndm_v"])
def test_lower_order_final(name):
    """With lower_order_final the last step is DDIM from the state it starts at."""
    prior = _prior()
    x_start = _x_start(prior)
    grid = make_grid(prior.process, 6, "logsnr")
    seen = {}
    out = sample(
        prior, x_start, grid, name, final="none", lower_order_final=True, callback=seen.update
    )
    last = sample(prior, seen["x"], grid[-2:], "ddim", final="none")
    assert torch.allclose(out, last, rtol=1e-12, atol=1e-12)
    plain = sample(prior, x_start, grid, name, final="none")
    assert not torch.allclose(out, plain)
    long = make_grid(prior.process, 15, "logsnr")  # no effect from 15 steps on
    a = sample(prior, x_start, long, name, final="none", lower_order_final=True)
    assert torch.equal(a, sample(prior, x_start, long, name, final="none"))


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_every_process_is_finite(process_name):
    prior = _prior(get_process(process_name))
    p = prior.process
    x_start = p.prior_sample((8, 3), torch.Generator().manual_seed(3))
    x_copy = x_start.clone()
    for name in NAMES:
        solver = get_solver(name)
        for kind in {"logsnr", solver.natural_grid}:
            out = sample(prior, x_start, make_grid(p, 6, kind), solver)
            assert out.shape == x_start.shape and out.dtype == x_start.dtype
            assert torch.all(torch.isfinite(out)), (name, process_name, kind)
    assert torch.equal(x_start, x_copy)


def test_bad_options():
    with pytest.raises(ValueError, match="order"):
        get_solver("deis_tab3", order=5)
    with pytest.raises(ValueError, match="variant"):
        get_solver("deis_tab3", variant="log")
    with pytest.raises(ValueError, match="lms_order"):
        get_solver("plms", lms_order=0)
    with pytest.raises(TypeError):
        get_solver("pndm", order=3)
