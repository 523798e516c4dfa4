"""Posterior samplers: the contract over the whole registry, exact posteriors where a
sampler is exact, and the pitfalls of public implementations.

Exactness is checked against the closed-form posterior of a Gaussian prior
(``prior.posterior(A, y, sigma_y)``), with tolerances from the sample size: a mean within
``4.5`` standard errors per coordinate, a covariance entry within ``6 sqrt(2 / N)`` of the
largest variance (its standard error is at most ``sqrt(2 / N)`` times it).
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from diffusolve.inverse import (
    Blur,
    CompressedSensing,
    Inpainting,
    PhaseRetrieval,
    gaussian_kernel,
)
from diffusolve.inverse.samplers import SAMPLERS, get_sampler
from diffusolve.models import Gaussian
from diffusolve.process import ddpm, rectified_flow

F64 = torch.float64
NAMES = sorted(SAMPLERS)
#: options that keep every sampler cheap in the registry-wide tests
CHEAP = {
    "mcgdiff": {"particles": 4},
    "tds": {"particles": 4},
    "daps": {"ode_steps": 2, "langevin_steps": 3},
}


def _prior(d: int = 4, var: float = 1.0, process=None) -> Gaussian:
    mean = torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=F64)[:d]
    return Gaussian(mean, var * torch.eye(d, dtype=F64), process=process or ddpm())


def _cs_problem(sigma_y: float, seed: int = 1):
    prior = _prior()
    op = CompressedSensing((4,), 2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = prior.sample(1, g)
    y = op(x) + sigma_y * torch.randn(1, 2, generator=g, dtype=F64)
    return prior, op, y


def _check_moments(samples: torch.Tensor, post: Gaussian) -> None:
    n = samples.shape[0]
    mean, cov = post.mean.flatten(), post.cov
    se = cov.diagonal().clamp_min(1e-12).sqrt() / math.sqrt(n)
    err = (samples.mean(0) - mean).abs()
    assert torch.all(err < 4.5 * se + 1e-9), (err, se)
    cerr = (torch.cov(samples.T) - cov).abs().max()
    assert cerr < 6 * math.sqrt(2 / n) * float(cov.diagonal().max()), cerr


# ---------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_and_frozen(name):
    s = get_sampler(name)
    assert type(s)(**s.options()) == s
    assert hash(s) == hash(type(s)(**s.options()))
    for f in dataclasses.fields(s)[:1]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s, f.name, getattr(s, f.name))
    with pytest.raises(TypeError, match="has no option"):
        s.replace(no_such_option=1)
    assert s.citation and s.name == name


_DEFAULT = re.compile(r"^\s*(\w+):.*?\(default ([^,;:)]+)", re.S)


@pytest.mark.parametrize("name", NAMES)
def test_documented_defaults_are_the_defaults(name):
    """A default stated in a sampler's docstring is its dataclass default (a pitfall of
    public implementations: docstrings and defaults that disagree)."""
    cls = SAMPLERS[name]
    doc = cls.__doc__ or ""
    args = doc.split("Args:", 1)[1].split("Example:", 1)[0] if "Args:" in doc else ""
    entries = re.split(r"\n\s{8}(?=[\w, ]+:)", "\n" + args)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    seen = 0
    for entry in entries:
        m = _DEFAULT.match(entry.strip())
        if not m or m.group(1) not in defaults:
            continue
        stated = m.group(2).strip().strip("`'\"")
        actual = defaults[m.group(1)]
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
            assert float(stated) == pytest.approx(float(actual)), (m.group(1), stated, actual)
        else:
            assert stated == str(actual), (m.group(1), stated, actual)
        seen += 1
    assert seen or not defaults or "Args:" not in doc, f"{name}: no documented default found"


def _operator_lacking(need: str):
    if need in ("linear", "prox"):
        return PhaseRetrieval((1, 2, 2))
    # linear, but no SVD and no cheap pseudo-inverse
    blur = Blur(gaussian_kernel(1.0, size=3), (1, 4, 4))
    mask = torch.zeros(1, 4, 4)
    mask[..., :2] = 1
    return Inpainting(mask, (1, 4, 4)) @ blur


@pytest.mark.parametrize("name", [n for n in NAMES if SAMPLERS[n].needs != ("grad",)])
def test_refusal_names_what_is_missing(name):
    s = get_sampler(name)
    for need in s.needs:
        if need == "grad":
            continue
        op = _operator_lacking(need)
        if need in op.capabilities:
            continue
        with pytest.raises(NotImplementedError) as err:
            s.check(op)
        msg = str(err.value)
        assert name in msg
        assert ("adjoint" if need == "linear" else need).split()[0] in msg or "nonlinear" in msg


def test_refusal_of_a_non_operator():
    with pytest.raises(TypeError, match="Operator"):
        get_sampler("dps").check(torch.eye(3))


def _run(name, prior, op, y, sigma_y, steps, noise, **kw):
    s = get_sampler(name, **CHEAP.get(name, {}))
    stats: dict = {}
    out = s.run(prior, op, y, sigma_y, steps=steps, noise=noise, dtype=F64, stats=stats, **kw)
    return s, out, stats


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_never_changes_a_sample(name, single_thread):
    prior = _prior()
    op = Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]), (4,))
    y = torch.tensor([[0.7, -0.4, 0, 0], [0.1, 0.9, 0, 0], [-1.0, 0.3, 0, 0]], dtype=F64)
    _, batch, _ = _run(name, prior, op, y, 0.1, 5, [10, 11, 12])
    _, alone, _ = _run(name, prior, op, y[1:2], 0.1, 5, [11])
    assert torch.all(torch.isfinite(batch))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-9, atol=1e-10)


_SEARCHED = [
    (name, option, value)
    for name in NAMES
    for option, values in SAMPLERS[name].SEARCH.items()
    for value in values
    if value != getattr(get_sampler(name), option)
]


@pytest.mark.parametrize(("name", "option", "value"), _SEARCHED)
def test_every_searched_option_changes_the_result(name, option, value, single_thread):
    """Each value the bench tunes over is a different sampler (a pitfall: an option that a
    formula cancels, so the tuning grid silently compares the defaults with themselves).
    The problem is one where every option can act: d = 8 with 7 measurements (more Krylov
    directions than the default CG iterations), a prior far from the origin and 16
    particles (the weighted start of the particle filters changes which particles are
    drawn), one measurement shared by the batch (their pooled filters), and for RePaint
    enough steps to jump back and a resampling pass for the jump length to act on."""
    mean = torch.linspace(-12.0, 12.0, 8, dtype=F64)
    prior = Gaussian(mean, torch.eye(8, dtype=F64), process=ddpm())
    opts = {**CHEAP.get(name, {}), **({"particles": 16} if name in ("mcgdiff", "tds") else {})}
    steps = 6
    if name == "repaint":
        op = Inpainting(torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1]), (8,))
        steps = 12
        if option == "jump_length":  # without resampling passes the jump length is unused
            opts["jump_n_sample"] = 2
    else:
        op = CompressedSensing((8,), 7, seed=2)
    x = prior.sample(1, torch.Generator().manual_seed(3))
    y = op(x).expand(3, -1)
    base = get_sampler(name, **opts)
    other = base.replace(**{option: value})
    kw = {"steps": steps, "noise": [10, 11, 12], "dtype": F64}
    a = base.run(prior, op, y, 0.1, **kw)
    b = other.run(prior, op, y, 0.1, **kw)
    assert torch.all(torch.isfinite(b))
    assert (a - b).abs().max() > 1e-6, f"{name}: {option}={value!r} gives the default's result"


@pytest.mark.parametrize("name", NAMES)
def test_nfe_is_what_the_sampler_declares(name, single_thread):
    prior = _prior()
    op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0]), (4,))
    y = torch.tensor([[0.2, 0.0, -0.4, 0.0]], dtype=F64)
    s, out, stats = _run(name, prior, op, y, 0.1, 6, 0)
    assert stats["nfe"] == s.nfe(6)
    assert out.shape == (1, 4)


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_rectified_flow(name, single_thread):
    """Every sampler is written for a general process (alpha, sigma), not VP only."""
    prior = _prior(process=rectified_flow())
    op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0]), (4,))
    y = torch.tensor([[0.2, 0.0, -0.4, 0.0]], dtype=F64)
    _, out, _ = _run(name, prior, op, y.expand(3, 4), 0.1, 8, 0)
    assert torch.all(torch.isfinite(out))


def test_bad_inputs_are_refused():
    prior, op, y = _cs_problem(0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        get_sampler("pigdm").run(prior, op, y, -1.0, steps=3)
    with pytest.raises(ValueError, match="shape"):
        get_sampler("pigdm").run(prior, op, torch.zeros(1, 3, dtype=F64), 0.1, steps=3)
    with pytest.raises(ValueError, match="steps"):
        get_sampler("pigdm").run(prior, op, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="unknown posterior sampler"):
        get_sampler("nope")
    with pytest.raises(ValueError, match="eta"):
        get_sampler("ddrm", eta=1.5)
    for name, option in (("mcgdiff", "particles"), ("tds", "particles"), ("dds", "cg_iters")):
        for bad in (0, 2.5, True):
            with pytest.raises(ValueError, match=f"{option} must be a positive int"):
                get_sampler(name, **{option: bad})


# ---------------------------------------------------------------- one-step identities
def _one_step(name, prior, op, y, sigma_y, t, **opts):
    """A run with one evaluation time returns the sampler's data-consistent estimate."""
    s = get_sampler(name, **opts)
    return s.run(prior, op, y, sigma_y, grid=torch.tensor([t], dtype=F64), noise=0, dtype=F64)


def test_pigdm_estimate_is_the_exact_posterior_mean_for_an_isotropic_prior():
    """For x0 ~ N(m, I), x0 | x_t ~ N(x0_hat, r^2 I) exactly, so PiGDM's guided estimate
    must be E[x0 | x_t, y] = x0_hat + r^2 A^T (r^2 A A^T + sigma_y^2 I)^-1 (y - A x0_hat)."""
    prior, op, y = _cs_problem(0.2)
    proc = prior.process
    t = 400.0
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    s = get_sampler("pigdm", eta=0.0)
    out = s.run(prior, op, y.expand(5, 2), 0.2, x=x, grid=torch.tensor([t], dtype=F64), dtype=F64)
    x0 = prior(x, t)
    st2 = float(proc.sigma_tilde(t)) ** 2
    r2 = st2 / (1 + st2)
    a = op.matrix()
    gain = r2 * a.T @ torch.linalg.inv(r2 * a @ a.T + 0.04 * torch.eye(2, dtype=F64))
    expected = x0 + (y - x0 @ a.T) @ gain.T
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_ddnm_estimate_is_the_range_null_space_projection():
    prior, op, y = _cs_problem(0.0)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = 300.0
    out = get_sampler("ddnm").run(
        prior, op, y.expand(3, 2), 0.0, x=x, grid=torch.tensor([t], dtype=F64), dtype=F64
    )
    x0 = prior(x, t)
    a = op.matrix()
    expected = x0 + (y - x0 @ a.T) @ torch.linalg.pinv(a).T
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(op(out), y.expand(3, 2), rtol=1e-9, atol=1e-9)


def test_diffpir_estimate_is_the_prox_with_rho_from_the_noise_levels():
    prior, op, y = _cs_problem(0.3)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    t, lam = 200.0, 7.0
    out = get_sampler("diffpir", lambda_=lam).run(
        prior, op, y.expand(2, 2), 0.3, x=x, grid=torch.tensor([t], dtype=F64), dtype=F64
    )
    x0 = prior(x, t)
    rho = lam * 0.09 / float(prior.process.sigma_tilde(t)) ** 2
    a = op.matrix()
    # argmin ||y - A v||^2 + rho ||v - x0||^2
    lhs = a.T @ a + rho * torch.eye(4, dtype=F64)
    expected = torch.linalg.solve(lhs, (y @ a + rho * x0).T).T
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-8)


def test_dds_noiseless_estimate_fits_the_measurement():
    """DDS's conjugate gradients on A^T A x = A^T y from the estimate: with enough iterations
    the result fits y and keeps the estimate's null-space part (CG stays in x0 + range(A^T))."""
    prior, op, y = _cs_problem(0.0)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    t = 300.0
    out = get_sampler("dds", cg_iters=10).run(
        prior, op, y.expand(2, 2), 0.0, x=x, grid=torch.tensor([t], dtype=F64), dtype=F64
    )
    x0 = prior(x, t)
    a = op.matrix()
    torch.testing.assert_close(out @ a.T, y.expand(2, 2), rtol=1e-8, atol=1e-8)
    null = torch.eye(4, dtype=F64) - torch.linalg.pinv(a) @ a
    torch.testing.assert_close(out @ null, x0 @ null, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("gamma", [0.1, 10.0])
def test_dds_noisy_estimate_solves_its_weighted_problem(gamma):
    """DDS's noisy subproblem, (I + gamma A^T A) x = x0_hat + gamma A^T y: with enough
    conjugate-gradient iterations the result is its closed-form solution, so the data
    weight gamma matters (an earlier version scaled both sides by gamma, which cancelled)."""
    prior, op, y = _cs_problem(0.2)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    t = 300.0
    out = get_sampler("dds", gamma=gamma, cg_iters=10).run(
        prior, op, y.expand(2, 2), 0.2, x=x, grid=torch.tensor([t], dtype=F64), dtype=F64
    )
    x0 = prior(x, t)
    a = op.matrix()
    lhs = torch.eye(4, dtype=F64) + gamma * a.T @ a
    expected = torch.linalg.solve(lhs, (x0 + gamma * y @ a).T).T
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- exact posteriors
@pytest.mark.parametrize("sigma_y", [0.3, pytest.param(0.05, marks=pytest.mark.slow)])
def test_pigdm_samples_the_exact_posterior_of_an_isotropic_gaussian(sigma_y, single_thread):
    """With the exact posterior estimate (above) the DDPM chain converges to the posterior."""
    prior, op, y = _cs_problem(sigma_y)
    n = 3000
    x = get_sampler("pigdm").run(prior, op, y.expand(n, 2), sigma_y, steps=400, noise=1, dtype=F64)
    _check_moments(x, prior.posterior(op, y[0], sigma_y))


def test_ddrm_is_exact_in_its_regime(single_thread):
    """DDRM's exact regime: noiseless measurements (the observed coordinates are y plus the
    told noise level), a prior whose spectral coordinates are independent (isotropic
    Gaussian), and eta = 0 (the unobserved coordinates follow the probability-flow ODE; a
    fixed eta > 0 re-noises by an amount that does not shrink with the step, so it is not
    consistent as the steps are refined)."""
    prior, op, y = _cs_problem(1e-4)
    n = 3000
    x = get_sampler("ddrm", eta=0.0).run(
        prior, op, y.expand(n, 2), 1e-4, steps=300, noise=1, dtype=F64
    )
    _check_moments(x, prior.posterior(op, y[0], 1e-4))


def test_ddrm_adds_the_noise_level_it_tells_the_denoiser(single_thread):
    """While the diffusion noise exceeds the measurement noise, DDRM's observed spectral
    coordinates must be x0 plus noise of exactly the level of the next denoiser call."""
    prior = _prior()
    op = CompressedSensing((4,), 2, seed=2)
    x0 = torch.tensor([[0.3, -0.2, 0.5, 0.0]], dtype=F64)
    sigma_y, n = 0.05, 4000
    y = op(x0).expand(n, 2) + sigma_y * torch.randn(
        n, 2, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    svd = op.svd()
    c_true = svd.Vt(x0)[:, : svd.rank]
    nbar = sigma_y / svd.s
    seen = []
    proc = prior.process

    def record(info):
        i = info["i"]
        if i + 1 >= len(times):
            return
        t_next = times[i + 1]
        st = float(proc.sigma_tilde(t_next))
        if st > 2 * float(nbar.max()):
            c = svd.Vt(info["x_next"] / float(proc.alpha(t_next)))[:, : svd.rank]
            seen.append((st, (c - c_true).std(0)))

    from diffusolve.process import make_grid

    times = make_grid(proc, 30, "time_uniform")[:-1]
    get_sampler("ddrm").run(prior, op, y, sigma_y, grid=times, noise=0, dtype=F64, callback=record)
    assert len(seen) > 10
    for st, std in seen:
        torch.testing.assert_close(std, torch.full_like(std, st), rtol=0.06, atol=0.0)


def _log_levels(process, times):
    return torch.log(process.sigma_tilde(times))


def test_mcgdiff_grid_holds_the_measurement_levels_and_keeps_its_spacing():
    """MCGdiff moves grid levels onto the measurement levels ``sigma_y / s_i``. With a few
    levels each one becomes a grid level; with more levels than grid levels (a blur, a
    dense matrix) only a level bracketing each one moves, so the grid keeps its spacing
    (an earlier rule moved the nearest free level however far, crowding the grid where the
    measurement levels crowd: a 20-step deblur of the digits then fell to 8 dB)."""
    from diffusolve.inverse import MatrixOperator
    from diffusolve.process import make_grid

    proc = ddpm()
    m = get_sampler("mcgdiff")
    sy = torch.tensor([0.05], dtype=F64)
    q, _ = torch.linalg.qr(
        torch.randn(60, 60, generator=torch.Generator().manual_seed(0), dtype=F64)
    )
    few = MatrixOperator(torch.diag(torch.tensor([1.0, 0.3, 0.09], dtype=F64)), (3,))
    times = m.times(proc, 20, few, sy)
    levels = _log_levels(proc, times)
    for v in (0.05, 0.05 / 0.3, 0.05 / 0.09):
        assert float((levels - math.log(v)).abs().min()) < 1e-9
    many = MatrixOperator(q * torch.linspace(0.02, 1.0, 60, dtype=F64), (60,))
    times = m.times(proc, 20, many, sy)
    assert len(times) == 20 and torch.all(times[1:] < times[:-1])
    base = make_grid(proc, 19, m.grid_kind, t_end=float(times[-1]))
    gap = lambda lv: float((lv[:-1] - lv[1:]).max())  # noqa: E731
    assert gap(_log_levels(proc, times)) < 1.5 * gap(_log_levels(proc, base))


def test_mcgdiff_approaches_the_exact_posterior_with_particles(single_thread):
    """MCGdiff is asymptotically exact (for the model's backward chain) as particles grow:
    its mean and covariance match the exact posterior within the sample-size tolerance."""
    prior, op, y = _cs_problem(0.3)
    n = 1000
    post = prior.posterior(op, y[0], 0.3)
    x = get_sampler("mcgdiff", particles=64).run(
        prior, op, y.expand(n, 2), 0.3, steps=100, noise=2, dtype=F64
    )
    _check_moments(x, post)


def test_dps_does_not_ignore_y_at_few_steps(single_thread):
    """A pitfall: a guidance step that shrinks with the solver step lets y be ignored at
    small step counts. DPS's step is per step, so at 20 and at 200 steps the samples fit y
    far better than prior samples do."""
    prior = _prior()
    op = Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]), (4,))
    y = torch.tensor([[2.0, -2.0, 0.0, 0.0]], dtype=F64)
    n = 400
    prior_fit = (op(prior.sample(n, torch.Generator().manual_seed(0))) - y).norm(dim=1).mean()
    for steps, zeta in ((20, 1.0), (200, 1.0)):
        x = get_sampler("dps", zeta=zeta).run(
            prior, op, y.expand(n, 4), 0.05, steps=steps, noise=0, dtype=F64
        )
        fit = (op(x) - y).norm(dim=1).mean()
        assert fit < 0.35 * prior_fit, (steps, float(fit), float(prior_fit))


@pytest.mark.parametrize("kernel, pool", [("ddpm", True), ("2m", True), ("2m", False)])
def test_tds_is_exact_for_a_correlated_gaussian_prior(single_thread, kernel, pool):
    """With the Jacobian covariance the twisting potential is exact for any Gaussian prior
    (here a correlated, non-unit one), so the twisted sampler matches the exact posterior,
    with the first-order and the second-order multistep backward kernel, pooled or with one
    filter per sample."""
    cov = torch.tensor(
        [[2.0, 0.6, 0.0, 0.3], [0.6, 1.0, 0.2, 0.0], [0.0, 0.2, 0.5, 0.1], [0.3, 0.0, 0.1, 1.5]],
        dtype=F64,
    )
    prior = Gaussian(torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=F64), cov, process=ddpm())
    op = CompressedSensing((4,), 2, seed=3)
    g = torch.Generator().manual_seed(3)
    y = op(prior.sample(1, g)) + 0.2 * torch.randn(1, 2, generator=g, dtype=F64)
    n = 1500
    x = get_sampler("tds", particles=8, kernel=kernel, pool=pool).run(
        prior, op, y.expand(n, 2), 0.2, steps=100, noise=4, dtype=F64
    )
    _check_moments(x, prior.posterior(op, y[0], 0.2))


def test_tds_terminal_weight_is_the_exact_marginal_ratio_for_a_gaussian_prior():
    """The start's importance weight is the trapezoid rule on the score's line integral
    from 0; the score of a Gaussian prior's marginal is linear, so the weight equals
    ``log p_t(x) - log N(x; 0, (alpha^2 + sigma^2) I)`` up to one constant, here at a time
    where ``alpha`` is far from negligible."""
    from diffusolve.inverse.samplers.base import Problem
    from diffusolve.inverse.samplers.parts import terminal_log_weight
    from diffusolve.solvers.noise import as_noise_source

    mean = torch.tensor([3.0, -2.0, 1.0], dtype=F64)
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.7]], dtype=F64)
    prior = Gaussian(mean, cov, process=ddpm())
    op = CompressedSensing((3,), 1, seed=0)
    times = torch.tensor([600.0, 300.0], dtype=F64)
    p = Problem(
        prior,
        op,
        torch.zeros(1, 1, dtype=F64),
        torch.ones(1, dtype=F64),
        times,
        as_noise_source(0, 1),
    )
    a, s = p.alpha[0], p.sigma[0]
    assert a > 0.1
    xp = 2.0 * torch.randn(1, 64, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    t0 = times[:1].expand(64)
    x0 = prior.denoise(xp[0], t0)[None]
    d0 = prior.denoise(torch.zeros(1, 3, dtype=F64), times[:1])
    w = terminal_log_weight(p, xp, x0, d0)[0]
    marg = torch.distributions.MultivariateNormal(
        a * mean, s * s * torch.eye(3, dtype=F64) + a * a * cov
    )
    ref = torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=F64), (a * a + s * s) * torch.eye(3, dtype=F64)
    )
    exact = marg.log_prob(xp[0]) - ref.log_prob(xp[0])
    torch.testing.assert_close(w - w[0], exact - exact[0], rtol=1e-9, atol=1e-9)


def _far_modes():
    """Two unit components at +-150 e_1 with weights 0.8 / 0.2: at the end of DDPM's linear
    schedule (alpha = 0.0064) the marginal's components sit at +-0.96, far from N(0, 1);
    the measurement sees only the second coordinate, so the posterior keeps the prior's
    mode weights."""
    from diffusolve.models.analytic.gmm import GaussianMixture

    prior = GaussianMixture(
        torch.tensor([0.8, 0.2], dtype=F64),
        torch.tensor([[150.0, 0.0], [-150.0, 0.0]], dtype=F64),
        torch.ones(2, dtype=F64),
        process=ddpm(),
    )
    op = Inpainting(torch.tensor([0.0, 1.0]), (2,))
    return prior, op, torch.tensor([[0.0, 0.5]], dtype=F64)


@pytest.mark.parametrize(
    "name, options", [("tds", {"kernel": "ddpm"}), ("tds", {"kernel": "2m"}), ("mcgdiff", {})]
)
def test_weighted_start_draws_far_modes_with_their_weights(single_thread, name, options):
    """With the plain N(0, I) start the particle samplers give the heavy mode about 0.72 of
    the samples; the importance-weighted start restores its weight 0.8 (within 4 standard
    errors)."""
    prior, op, y = _far_modes()
    n = 2000
    share = {}
    for terminal in ("weighted", "noise"):
        x = get_sampler(name, particles=8, terminal=terminal, **options).run(
            prior, op, y.expand(n, 2), 0.5, steps=50, noise=1, dtype=F64
        )
        share[terminal] = float((x[:, 0] > 0).double().mean())
    se = math.sqrt(0.8 * 0.2 / n)
    assert abs(share["weighted"] - 0.8) < 4 * se, share
    assert share["noise"] < 0.8 - 4 * se, share


@pytest.mark.parametrize("name", ["tds", "mcgdiff"])
def test_pool_is_exact_per_measurement_and_keeps_measurements_apart(single_thread, name):
    """With ``pool=True`` the rows sharing a measurement run one filter; two measurements
    interleaved in one batch each get their own exact posterior."""
    prior, op, y1 = _cs_problem(0.3, seed=1)
    _, _, y2 = _cs_problem(0.3, seed=2)
    n = 1200
    y = torch.stack([y1[0], y2[0]]).repeat(n, 1)  # rows alternate y1, y2
    x = get_sampler(name, particles=4, pool=True).run(
        prior, op, y, 0.3, steps=60, noise=3, dtype=F64
    )
    _check_moments(x[0::2], prior.posterior(op, y1[0], 0.3))
    _check_moments(x[1::2], prior.posterior(op, y2[0], 0.3))
    assert torch.unique(x[0::2], dim=0).shape[0] > 0.9 * n


def test_pooled_resampling_and_picking_follow_the_group_weights():
    """Pooled systematic resampling moves particles only within a group, and the pick
    hands a group's rows draws from its whole cloud."""
    from diffusolve.inverse.samplers.base import Problem
    from diffusolve.inverse.samplers.parts import (
        measurement_groups,
        pick_one,
        systematic_resample,
    )
    from diffusolve.solvers.noise import as_noise_source

    y = torch.tensor([[1.0], [2.0], [1.0], [2.0], [1.0]], dtype=F64)
    groups = measurement_groups(y, torch.ones(5, dtype=F64))
    assert [g.tolist() for g in groups] == [[0, 2, 4], [1, 3]]
    op = CompressedSensing((1,), 1, seed=0)
    p = Problem(
        _prior(1), op, y, torch.ones(5, dtype=F64), torch.tensor([500.0]), as_noise_source(0, 5)
    )
    n = 4
    ids = torch.arange(5 * n, dtype=F64).reshape(5, n, 1)  # particle identities
    logw = torch.full((5, n), -50.0, dtype=F64)
    logw[4, 1] = 0.0  # group 0: all weight on row 4's particle 1
    logw[1, :] = 0.0  # group 1: weight spread over row 1's particles
    logw2, moved = systematic_resample(p, logw, ids, ess=1.0, groups=groups)
    assert torch.all(logw2 == 0)
    assert torch.all(moved[[0, 2, 4]] == ids[4, 1])
    assert set(moved[[1, 3]].flatten().tolist()) == set(ids[1].flatten().tolist())
    out = pick_one(p, logw, ids, groups)
    assert torch.all(out[[0, 2, 4]] == ids[4, 1])
    assert set(out[[1, 3]].flatten().tolist()) <= set(ids[1].flatten().tolist())
