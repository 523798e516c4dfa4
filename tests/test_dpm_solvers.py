"""DPM-Solver / DPM-Solver++ against exact Gaussian references.

On a Gaussian prior the probability-flow ODE and every marginal are known in closed form,
so orders, equalities with DDIM and the SDE sampler's distribution are checked exactly.
"""

import math

import pytest
import torch

from diffusolve import sample
from diffusolve.models import DynamicThresholding, Gaussian
from diffusolve.models.transforms import MapX0
from diffusolve.process import PROCESSES, get_process, make_grid, vp_linear
from diffusolve.solvers import REGISTRY, get_solver, list_solvers
from diffusolve.solvers.base import BoundModel, StepContext
from diffusolve.solvers.expint import ExpStep, phi
from diffusolve.solvers.multistep import History, Record

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
NAMES = {
    "dpm_solver_1",
    "dpm_solver_2s",
    "dpm_solver_3s",
    "dpm_solver_2m",
    "dpm_solver_3m",
    "dpmpp_2s",
    "dpmpp_2m",
    "dpmpp_3m",
    "sde_dpmpp_2m",
}
DETERMINISTIC = sorted(NAMES - {"sde_dpmpp_2m"})


def _prior(process=None):
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=F64)
    mean = torch.tensor([0.3, -0.5, 1.0], dtype=F64)
    return Gaussian(mean, cov, process=process or vp_linear())


def _xT(prior, n=32, seed=0):
    return prior.process.prior_sample((n, 3), torch.Generator().manual_seed(seed), dtype=F64)


def _rel_err(prior, name, n, kind="logsnr", **opts):
    p = prior.process
    xT = _xT(prior)
    grid = make_grid(p, n, kind, t_end=0.02)
    x = sample(prior, xT, grid, name, final="none", **opts)
    ref = prior.ode_solution(xT, grid[0], grid[-1])
    return float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def _slope(name, steps, kind="logsnr", **opts):
    prior = _prior()
    nfe = [get_solver(name, **opts).nfe(n) for n in steps]
    errs = [_rel_err(prior, name, n, kind, **opts) for n in steps]
    lx = torch.tensor([math.log(v) for v in nfe], dtype=F64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=F64)
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def test_registered_names():
    mods = {"diffusolve.solvers.dpm_solver", "diffusolve.solvers.dpm_multistep"}
    get_solver("ddim")  # fills the registry
    mine = {n for n, (cls, _) in REGISTRY.items() if cls.__module__ in mods}
    assert mine == NAMES
    assert get_solver("sde_dpmpp_2m").stochastic
    for name in DETERMINISTIC:
        s = get_solver(name)
        assert not s.stochastic
        assert s.multistep == name.endswith("m")
    assert get_solver("dpm_solver_3s").evals_per_step == 3
    assert get_solver("dpmpp_2s").evals_per_step == 2
    # declared global orders: the standard 3-step multistep update is second order;
    # the default (Taylor weight) is third order
    for name in ("dpm_solver_3m", "dpmpp_3m"):
        assert (get_solver(name).solver_order, get_solver(name).order) == (3, 3)
        assert get_solver(name, third_order="standard").order == 2
        assert get_solver(name).options()["solver_order"] == 3


def test_phi_series_matches_closed_form():
    for z in (-3.0, -0.3, -0.06, 0.06, 0.3, 3.0):
        zt = torch.tensor(z, dtype=F64)
        e = math.expm1(z)
        assert abs(float(phi(1, zt)) - e / z) < 1e-14
        assert abs(float(phi(2, zt)) - (e - z) / z**2) < 1e-13
        assert abs(float(phi(3, zt)) - (e - z - z * z / 2) / z**3) < 1e-11
    # just inside the power-series range the values agree with the closed forms
    for z in (-0.0499, 0.0499):
        e = math.expm1(z)
        assert abs(float(phi(1, z)) - e / z) < 1e-14
        assert abs(float(phi(2, z)) - (e - z) / z**2) < 1e-12
        assert abs(float(phi(3, z)) - (e - z - z * z / 2) / z**3) < 1e-9


@pytest.mark.parametrize(
    "name,kind",
    [("dpmpp_2m", "karras"), ("dpm_solver_2m", "time_uniform"), ("dpmpp_2m", "time_quadratic")],
)
def test_multistep_order_on_non_uniform_grids(name, kind):
    """The step ratios r = h_prev / h enter the update: order 2 holds off the logSNR grid."""
    slope = _slope(name, [24, 32, 48, 64], kind)
    assert abs(slope - 2) <= 0.3, slope


def _local_error(name, h, third_order):
    """One 3M step from exact history at lambda - 2h, lambda - h, lambda to lambda + h."""
    prior = _prior()
    p = prior.process
    s = get_solver(name, third_order=third_order)
    bm = BoundModel(prior)
    lam_mid = float(p.lam(torch.tensor(0.3, dtype=F64)))
    ts = [p.t_of_lambda(torch.tensor(lam_mid + k * h, dtype=F64)) for k in (-2, -1, 0, 1)]
    xT = _xT(prior)
    xs = [prior.ode_solution(xT, p.t_max, t) for t in ts]
    hist = History(
        Record(float(t), bm.scalars(t)[2], bm.output(x, t, s.prediction))
        for t, x in zip(ts[:3], xs[:3], strict=True)
    )
    f = ExpStep(bm.scalars(ts[2]), bm.scalars(ts[3]), s.prediction)
    x = s._update(xs[2], f, hist, 3)
    return float((x - xs[3]).norm(dim=1).mean())


@pytest.mark.parametrize("name", ["dpm_solver_3m", "dpmpp_3m"])
def test_third_order_local_error(name):
    """The standard 3M update (official code, diffusers) has local error O(h^3): its D2
    weight is half the Taylor one. The ``taylor`` variant has local error O(h^4)."""
    hs = [0.1, 0.05, 0.025]
    for variant, expect in (("standard", 3.0), ("taylor", 4.0)):
        e = [_local_error(name, h, variant) for h in hs]
        rates = [math.log2(e[i] / e[i + 1]) for i in range(len(e) - 1)]
        assert all(abs(r - expect) < 0.5 for r in rates), (variant, rates)


@pytest.mark.parametrize("name", ["dpm_solver_3m", "dpmpp_3m"])
def test_third_order_global_order(name):
    # taylor: at least third order (pre-asymptotically close to 4 on this prior)
    assert _slope(name, [32, 48, 64, 96], third_order="taylor") >= 2.7
    # standard: second order asymptotically
    assert abs(_slope(name, [96, 128, 192, 256], third_order="standard") - 2.0) <= 0.3


@pytest.mark.parametrize("order", [2, 3])
def test_data_and_noise_prediction_agree(order):
    """Multistep solvers in x0 and eps prediction converge to the same exact solution."""
    prior = _prior()
    for variant in ("standard", "taylor"):
        opts = {"third_order": variant}
        for name in (f"dpm_solver_{order}m", f"dpmpp_{order}m"):
            ec = _rel_err(prior, name, 16, **opts)
            ef = _rel_err(prior, name, 64, **opts)
            assert ef < ec / 8 and ef < 1e-3, (name, variant, ec, ef)
    p = prior.process
    xT = _xT(prior)
    grid = make_grid(p, 64, "logsnr", t_end=0.02)
    a = sample(prior, xT, grid, f"dpm_solver_{order}m", final="none")
    b = sample(prior, xT, grid, f"dpmpp_{order}m", final="none")
    # both are within 1e-3 of the reference, so within 2e-3 of each other
    assert float(((a - b).norm(dim=1) / b.norm(dim=1)).mean()) < 2e-3


@pytest.mark.parametrize("process", ["vp-linear", "ddpm-linear", "edm", "rectified-flow"])
def test_dpm_solver_1_equals_ddim(process):
    prior = _prior(get_process(process))
    xT = _xT(prior)
    grid = make_grid(prior.process, 10, "logsnr")
    a = sample(prior, xT, grid, "dpm_solver_1", final="none")
    b = sample(prior, xT, grid, "ddim", final="none")
    assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "sde_dpmpp_2m"])
def test_first_multistep_step_is_ddim(name):
    """Without history the multistep update is the first-order (DDIM) step."""
    prior = _prior()
    p = prior.process
    xT = _xT(prior)
    t, t1 = torch.tensor(0.8, dtype=F64), torch.tensor(0.5, dtype=F64)
    ctx = StepContext(0, 1, "none", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype))
    ddim = get_solver("ddim")
    ref, _ = ddim.step(BoundModel(prior), xT, t, t1, None, ctx)
    solver = get_solver(name)
    state = solver.init(BoundModel(prior), xT)
    if solver.stochastic:
        # with zero noise the SDE step is DDIM with eta = 1 (posterior mean)
        ref, _ = get_solver("ddpm").step(BoundModel(prior), xT, t, t1, None, ctx)
    x, state = solver.step(BoundModel(prior), xT, t, t1, state, ctx)
    assert float((x - ref).abs().max()) < 1e-12
    assert len(state.hist) == 1 and abs(float(p.lam(t)) - state.hist[0].lam) < 1e-15


def test_sde_per_sample_seeds_independent_of_batch():
    prior = _prior()
    xT = _xT(prior, n=3)
    grid = make_grid(prior.process, 12, "logsnr")
    batch = sample(prior, xT, grid, "sde_dpmpp_2m", noise=[11, 12, 13])
    one = sample(prior, xT[1:2], grid, "sde_dpmpp_2m", noise=[12])
    assert torch.equal(batch[1:2], one)
    other = sample(prior, xT[1:2], grid, "sde_dpmpp_2m", noise=[99])
    assert not torch.allclose(one, other)


def test_sde_matches_marginal_moments():
    """Started from the exact marginal at t_max, SDE-DPM-Solver++(2M) must produce the exact
    marginal N(alpha mu, alpha^2 C + sigma^2 I) at t_end (a Gaussian prior keeps every
    marginal Gaussian). With N samples the standard error of a mean entry is
    sqrt(S_ii / N) and of a covariance entry sqrt((S_ii S_jj + S_ij^2) / N); we allow 5
    standard errors, which a correct sampler exceeds with probability < 1e-5 per entry, and
    an error of 10% in the noise scale (a covariance error ~0.1) would not pass."""
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)
    p = vp_linear()
    prior = Gaussian(mean, cov, process=p)
    n = 8000
    g = torch.Generator().manual_seed(1)

    def marginal(t):
        a, s = float(p.alpha(t)), float(p.sigma(t))
        return a * mean, a * a * cov + s * s * torch.eye(2, dtype=F64)

    grid = make_grid(p, 100, "logsnr", t_end=0.05)
    m0, c0 = marginal(grid[0])
    xT = m0 + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(c0).T
    x = sample(prior, xT, grid, "sde_dpmpp_2m", final="none", noise=g)
    m1, c1 = marginal(grid[-1])
    emp_m = x.mean(0)
    emp_c = torch.cov(x.T)
    se_m = torch.sqrt(torch.diag(c1) / n)
    se_c = torch.sqrt((torch.outer(torch.diag(c1), torch.diag(c1)) + c1**2) / n)
    assert torch.all((emp_m - m1).abs() < 5 * se_m), (emp_m, m1)
    assert torch.all((emp_c - c1).abs() < 5 * se_c), (emp_c, c1)


def test_thresholding_wrapper_keeps_x0_in_range_for_every_solver():
    """Dynamic thresholding is one denoiser wrapper: every solver sees the thresholded
    estimate (the estimates of this prior lie far outside [-1, 1] without it)."""
    mean = torch.tensor([3.0, -2.5, 0.0], dtype=F64)
    prior = Gaussian(mean, torch.eye(3, dtype=F64), process=vp_linear())
    xT = _xT(prior, n=16)
    grid = make_grid(prior.process, 8, "logsnr")
    for name in list_solvers():
        for thr in (False, True):
            seen = []
            model = DynamicThresholding(prior) if thr else prior
            model = MapX0(model, lambda x0, seen=seen: seen.append(x0) or x0)
            sample(model, xT, grid, name, final="none", noise=0)
            top = max(float(v.abs().max()) for v in seen)
            assert (top <= 1.0) if thr else (top > 2.0), (name, thr, top)


@pytest.mark.parametrize("name", ["dpmpp_3m", "dpmpp_2m", "dpm_solver_3m"])
def test_lower_order_final_changes_only_last_steps(name):
    prior = _prior()
    xT = _xT(prior)

    def trajectory(n, lof):
        xs = []
        grid = make_grid(prior.process, n, "logsnr")
        sample(
            prior,
            xT,
            grid,
            name,
            final="none",
            lower_order_final=lof,
            callback=lambda d: xs.append(d["x_next"]),
        )
        return xs

    n = 10
    a, b = trajectory(n, False), trajectory(n, True)
    changed = 2 if get_solver(name).solver_order == 3 else 1
    for i in range(n):
        same = torch.equal(a[i], b[i])
        assert same == (i < n - changed), (i, same)
    a, b = trajectory(15, False), trajectory(15, True)  # 15 steps or more: no change
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_every_process_finite_and_converging(process):
    """Every solver runs on every process (float32 and float64) without non-finite values,
    and the deterministic ones converge to the exact ODE solution (12 -> 24 steps)."""
    prior = _prior(get_process(process))
    p = prior.process
    xT = _xT(prior, n=8)
    errs = {}
    for n in (12, 24):
        grid = make_grid(p, n, "logsnr")
        ref = prior.ode_solution(xT, grid[0], grid[-1])
        for name in sorted(NAMES):
            for dtype in (torch.float32, F64):
                x = sample(prior, xT.to(dtype), grid, name, final="none", noise=0)
                assert torch.all(torch.isfinite(x)), (name, dtype)
            x0 = sample(prior, xT.to(torch.float32), grid, name, noise=0)
            assert torch.all(torch.isfinite(x0)), name
            if name != "sde_dpmpp_2m":
                errs.setdefault(name, []).append(
                    float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean())
                )
    for name, (e12, e24) in errs.items():
        # doubling the steps must reduce the error (by 2^order asymptotically; the full
        # range t_max -> t_min is not yet asymptotic at 12 steps, so ask for 1.5)
        assert e12 / e24 > 1.5 and e24 < 0.1, (name, e12, e24)


def test_bad_options():
    with pytest.raises(ValueError):
        get_solver("dpmpp_2m", solver_order=4)
    with pytest.raises(ValueError):
        get_solver("dpmpp_2m", third_order="nope")
    with pytest.raises(TypeError, match="DynamicThresholding|options"):
        get_solver("dpmpp_2m", threshold_ratio=0.9)  # thresholding is a model wrapper
    with pytest.raises(ValueError):
        get_solver("dpm_solver_3s", r1=0.8, r2=0.5)
    with pytest.raises(ValueError):
        get_solver("sde_dpmpp_2m", solver_order=3)
    with pytest.raises(ValueError):
        get_solver("sde_dpmpp_2m", prediction="noise")
