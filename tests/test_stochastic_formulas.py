"""Stochastic steps against hand-written reference samplers, and the meaning of each option.

Each reference below is written from its paper (DDIM eq. 16 in its ``sigma_eta`` form, EDM
Algorithm 2, consistency multistep sampling, SDE-DPM-Solver++(2M) midpoint form,
DPM-Solver++(2S) with the ancestral split of the noise level), not from our code. The library solve and the reference are fed the *same* noise (a recording noise
source replays the library's draws: one standard normal draw of the batch's shape per
noisy step, in step order) on a Gaussian-mixture prior, whose denoiser is nonlinear, and
must agree to float64 round-off. Small step counts exercise the parts a converged solve
hides: EDM's cap ``gamma <= sqrt(2) - 1``, the churn window, the first (lower-order) step
of the multistep SDE solver.

Option semantics are checked on the exact output law of a Gaussian prior
(``affine_output_moments``): ``s_noise`` scales only the noise response, the churn window
decides which steps draw noise, DDIM's ``eta = 1`` is DDPM.
"""

from __future__ import annotations

import math

import pytest
import torch
from _exact import affine_output_moments, gaussian_marginal

import diffusolve
from diffusolve.models import Gaussian, GaussianMixture
from diffusolve.process import edm, get_process, make_grid, rectified_flow, ve

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
MEAN = torch.tensor([0.3, -0.5, 1.0], dtype=F64)
COV = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=F64)


class Recorder:
    """A noise source that draws standard normals from a generator and keeps them."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def __call__(self, shape, *, dtype=torch.float32, device=None):
        z = torch.randn(tuple(shape), generator=self.g, dtype=F64)
        self.draws.append(z)
        return z.to(dtype=dtype, device=device)


def _mixture(process) -> GaussianMixture:
    return GaussianMixture.random(3, 4, process=process, seed=2, eig_range=(0.02, 0.3))


def _start(process, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return float(process.sigma(process.t_max)) * torch.randn(n, 3, generator=g, dtype=F64)


def _scalars(p, t):
    return float(p.alpha(t)), float(p.sigma(t))


# ------------------------------------------------------------------ references
def ref_ddim(model, x, grid, eta, draws):
    """DDIM (Song et al. 2021, eq. 12 and 16): ``x' = a' x0 + sqrt(s'^2 - std^2) eps + std z``
    with ``std = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')`` for VP; in
    general ``std^2 = eta^2 s'^2 (1 - (a s' / (s a'))^2)`` (the same for VP), capped at s'."""
    p, it = model.process, iter(draws)
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        (a, s), (a1, s1) = _scalars(p, t), _scalars(p, t1)
        x0 = model(x, t)
        eps = (x - a * x0) / s
        std = min(eta * s1 * math.sqrt(1.0 - (a * s1 / (s * a1)) ** 2), s1)
        x = a1 * x0 + math.sqrt(s1 * s1 - std * std) * eps + std * next(it)
    return x


def ref_lcm(model, x, grid, draws):
    """Multistep consistency sampling: ``x' = a' f(x, t) + s' z``."""
    p, it = model.process, iter(draws)
    for i in range(len(grid) - 1):
        a1, s1 = _scalars(p, grid[i + 1])
        x = a1 * model(x, grid[i]) + s1 * next(it)
    return x


def ref_edm(model, x, grid, draws, t_of_s, *, heun, churn, tmin=0.0, tmax=math.inf, snoise=1.0):
    """EDM Algorithm 2 (Karras et al. 2022) on ``x~ = x / alpha`` with noise level
    ``s = sigma / alpha``; ``t_of_s`` inverts ``s`` by hand for the process."""
    p, it, n = model.process, iter(draws), len(grid) - 1

    def denoise(xt, t):  # the denoiser in x~ units
        return model(float(p.alpha(t)) * xt, t)

    for i in range(n):
        t, t1 = grid[i], grid[i + 1]
        (a, s), (a1, s1) = _scalars(p, t), _scalars(p, t1)
        s, s1 = s / a, s1 / a1
        xt = x / a
        gamma = min(churn / n, math.sqrt(2.0) - 1.0) if tmin <= s <= tmax else 0.0
        s_hat, t_hat = s, t
        if gamma > 0:
            s_hat = s * (1.0 + gamma)
            t_hat = t_of_s(s_hat)
            xt = xt + math.sqrt(s_hat**2 - s**2) * snoise * next(it)
        d = (xt - denoise(xt, t_hat)) / s_hat
        nxt = xt + (s1 - s_hat) * d
        if heun:
            d1 = (nxt - denoise(nxt, t1)) / s1
            nxt = xt + (s1 - s_hat) * 0.5 * (d + d1)
        x = a1 * nxt
    return x


def ref_sde_dpmpp_2m(model, x, grid, draws):
    """SDE-DPM-Solver++(2M), midpoint form (Lu et al. 2022, DPM-Solver++ appendix):
    ``x_t = (s_t / s_0) e^{-h} x + a_t (1 - e^{-2h}) (D0 + D1 / 2) + s_t sqrt(1 - e^{-2h}) z``
    with ``D0 = m_0``, ``D1 = (m_0 - m_1) / r0``, ``r0 = h_0 / h``; the first step uses ``D0``."""
    p, it = model.process, iter(draws)
    lam_prev = m_prev = None
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        (a, s), (a1, s1) = _scalars(p, t), _scalars(p, t1)
        lam, lam1 = math.log(a / s), math.log(a1 / s1)
        h = lam1 - lam
        m0 = model(x, t)
        d = m0
        if m_prev is not None:
            r0 = (lam - lam_prev) / h
            d = m0 + 0.5 * (m0 - m_prev) / r0
        x = (
            (s1 / s) * math.exp(-h) * x
            + a1 * (1.0 - math.exp(-2.0 * h)) * d
            + s1 * math.sqrt(1.0 - math.exp(-2.0 * h)) * next(it)
        )
        lam_prev, m_prev = lam, m0
    return x


def ref_dpmpp_2s_ancestral(model, x, grid, draws, t_of_s, *, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++(2S) to ``s_down`` then noise up to ``s'`` (Lu et al. 2022, Algorithm 1,
    with the ancestral split), on ``x~ = x / alpha``, ``s = sigma / alpha``:
    ``s_up = min(s', eta s' sqrt(1 - s'^2 / s^2))``, ``s_down = sqrt(s'^2 - s_up^2)``;
    ``h = log(s / s_down)``, stage at ``s_mid = s e^{-r h}``:
    ``u = (s_mid / s) x~ + (1 - e^{-r h}) x0``,
    ``x~_down = (s_down / s) x~ + (1 - e^{-h}) ((1 - 1/(2r)) x0 + 1/(2r) x0(u, s_mid))``,
    ``x~' = x~_down + s_noise s_up z``."""
    p, it = model.process, iter(draws)

    def denoise(xt, t):
        return model(float(p.alpha(t)) * xt, t)

    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        (a, s), (a1, s1) = _scalars(p, t), _scalars(p, t1)
        s, s1 = s / a, s1 / a1
        xt = x / a
        up = min(s1, eta * s1 * math.sqrt(1.0 - (s1 / s) ** 2))
        down = math.sqrt(s1 * s1 - up * up)
        x0 = denoise(xt, t)
        if down == 0.0:  # all of s' is noise: the limit s_down -> 0 of the step is x0
            x = a1 * (x0 + s_noise * up * next(it))
            continue
        h = math.log(s / down)
        s_mid = s * math.exp(-r * h)
        u = (s_mid / s) * xt + (1.0 - math.exp(-r * h)) * x0
        x0_mid = denoise(u, t_of_s(s_mid))
        d = (1.0 - 1.0 / (2.0 * r)) * x0 + (1.0 / (2.0 * r)) * x0_mid
        xt = (down / s) * xt + (1.0 - math.exp(-h)) * d
        x = a1 * (xt + s_noise * up * next(it))
    return x


# ------------------------------------------------------------------ library vs reference
def _compare(model, grid, solver, reference, **options):
    x = _start(model.process)
    rec = Recorder(11)
    got = diffusolve.sample(model, x, grid, solver, final="none", noise=rec, **options)
    want = reference(model, x, grid, rec.draws)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    return rec


@pytest.mark.parametrize("process_name", ["ddpm-linear", "edm"])
@pytest.mark.parametrize("eta", [0.3, 1.0, 1.7])
def test_ddim_eta_matches_the_paper(process_name, eta):
    p = get_process(process_name)
    model = _mixture(p)
    grid = make_grid(p, 5, "logsnr")
    rec = _compare(model, grid, "ddim", lambda m, x, g, d: ref_ddim(m, x, g, eta, d), eta=eta)
    assert len(rec.draws) == 5


@pytest.mark.parametrize("process_name", ["ddpm-linear", "rectified-flow"])
def test_ddpm_and_lcm_match_the_references(process_name):
    p = get_process(process_name)
    model = _mixture(p)
    grid = make_grid(p, 4, "logsnr")
    _compare(model, grid, "ddpm", lambda m, x, g, d: ref_ddim(m, x, g, 1.0, d))
    _compare(model, grid, "lcm", ref_lcm)


@pytest.mark.parametrize("process_name", ["ddpm-linear", "edm", "rectified-flow"])
def test_sde_dpmpp_2m_matches_the_reference(process_name):
    p = get_process(process_name)
    model = _mixture(p)
    grid = make_grid(p, 16, "logsnr")  # 16 >= 15: no lower-order-final rule applies
    rec = _compare(model, grid, "sde_dpmpp_2m", ref_sde_dpmpp_2m)
    assert len(rec.draws) == 16


#: processes with a hand inverse of s = sigma / alpha
EDM_PROCESSES = {
    "edm": (edm(), lambda s: s),
    "rectified-flow": (rectified_flow(), lambda s: s / (1.0 + s)),  # s = t / (1 - t)
    "ve": (ve(), lambda s: math.log(s / 0.01) / math.log(50.0 / 0.01)),  # s = 0.01 5000^t
}
CHURN = [
    dict(churn=10.0),  # gamma = 10 / n: capped at sqrt(2) - 1 for n < 25
    dict(churn=1.0),  # gamma = 1 / n, uncapped
    dict(churn=40.0, tmin=0.05, tmax=5.0),  # a window: the first steps draw no noise
    dict(churn=3.0, snoise=1.003),
]


@pytest.mark.parametrize("heun", [False, True], ids=["euler", "heun"])
@pytest.mark.parametrize("process_name", sorted(EDM_PROCESSES))
@pytest.mark.parametrize("churn", CHURN, ids=["cap", "nocap", "window", "snoise"])
def test_edm_churn_matches_algorithm_2(process_name, heun, churn):
    p, t_of_s = EDM_PROCESSES[process_name]
    model = _mixture(p)
    grid = make_grid(p, 6, "karras")
    options = dict(s_churn=churn["churn"])
    for ours, theirs in (("tmin", "s_tmin"), ("tmax", "s_tmax"), ("snoise", "s_noise")):
        if ours in churn:
            options[theirs] = churn[ours]

    def reference(m, x, g, d):
        return ref_edm(m, x, g, d, t_of_s, heun=heun, **churn)

    rec = _compare(model, grid, "heun" if heun else "euler", reference, **options)
    s = [float(p.sigma(t) / p.alpha(t)) for t in grid[:-1]]
    lo, hi = churn.get("tmin", 0.0), churn.get("tmax", math.inf)
    assert len(rec.draws) == sum(lo <= v <= hi for v in s)


@pytest.mark.parametrize("process_name", ["edm", "rectified-flow"])
@pytest.mark.parametrize(
    "options",
    [{}, {"eta": 0.5}, {"eta": 0.8, "s_noise": 1.05}, {"r1": 1.0 / 3.0}, {"eta": 10.0}],
    ids=["eta1", "eta.5", "snoise", "r1", "all-noise"],
)
def test_dpmpp_2s_ancestral_matches_the_reference(process_name, options):
    p, t_of_s = EDM_PROCESSES[process_name]
    model = _mixture(p)
    grid = make_grid(p, 6, "logsnr")

    reference_options = {("r" if k == "r1" else k): v for k, v in options.items()}

    def reference(m, x, g, d):
        return ref_dpmpp_2s_ancestral(m, x, g, d, t_of_s, **reference_options)

    rec = _compare(model, grid, "dpmpp_2s_ancestral", reference, **options)
    assert len(rec.draws) == 6


# ------------------------------------------------------------------ options on exact laws
def _law(model, grid, solver, **options):
    p = model.process
    m_in, c_in = gaussian_marginal(MEAN, COV, *_scalars(p, grid[0]))

    def run(x, noise):
        return diffusolve.sample(model, x, grid, solver, final="none", noise=noise, **options)

    return affine_output_moments(run, 3, m_in, c_in)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_s_noise_scales_only_the_noise_response(solver):
    p = get_process("ddpm-linear")
    prior = Gaussian(MEAN, COV, process=p)
    grid = make_grid(p, 6, "karras")
    base = _law(prior, grid, solver, s_churn=5.0)
    for c in (0.5, 1.003, 2.0):
        law = _law(prior, grid, solver, s_churn=5.0, s_noise=c)
        torch.testing.assert_close(law.A, base.A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(law.b, base.b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(law.noise_cov, c * c * base.noise_cov, rtol=1e-9, atol=1e-12)


def test_churn_outside_its_window_is_the_deterministic_solver():
    p = get_process("vp-cosine")
    prior = Gaussian(MEAN, COV, process=p)
    grid = make_grid(p, 8, "karras")
    top = float(p.sigma(grid[0]) / p.alpha(grid[0]))
    law = _law(prior, grid, "heun", s_churn=10.0, s_tmin=2 * top, s_tmax=4 * top)
    assert law.draws == 0
    det = _law(prior, grid, "heun")
    torch.testing.assert_close(law.A, det.A, rtol=0, atol=0)
    torch.testing.assert_close(law.b, det.b, rtol=0, atol=0)


def test_ddim_eta_one_is_ddpm_and_eta_sets_the_noise():
    p = get_process("ddpm-linear")
    prior = Gaussian(MEAN, COV, process=p)
    x = _start(p)
    grid = make_grid(p, 7, "logsnr")
    a = diffusolve.sample(prior, x, grid, "ddim", eta=1.0, noise=3)
    b = diffusolve.sample(prior, x, grid, "ddpm", noise=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one step: the noise covariance is std^2 I with DDIM's sigma_eta (VP form, by hand)
    t, t1 = grid[2], grid[3]
    one = torch.stack([t, t1])
    abar, abar1 = float(p.alpha(t)) ** 2, float(p.alpha(t1)) ** 2
    for eta in (0.25, 1.0):
        std2 = eta**2 * (1 - abar1) / (1 - abar) * (1 - abar / abar1)
        law = _law(prior, one, "ddim", eta=eta)
        torch.testing.assert_close(
            law.noise_cov, std2 * torch.eye(3, dtype=F64), rtol=1e-10, atol=0
        )


def test_lcm_with_a_plain_denoiser_follows_its_own_recursion():
    """With the exact denoiser ``D(x) = m + M (x / a - m)``, ``M = C (C + r^2 I)^{-1}``, LCM's
    law obeys ``mean' = a' (m + M (mean / a - m))``, ``P' = (a'/a)^2 M P M^T + s'^2 I``
    (hand recursion) -- and is not the data law (the sampler forgets x_t)."""
    p = get_process("edm")
    prior = Gaussian(MEAN, COV, process=p)
    grid = make_grid(p, 6, "logsnr")
    a0, s0 = _scalars(p, grid[0])
    mean, cov = gaussian_marginal(MEAN, COV, a0, s0)
    eye = torch.eye(3, dtype=F64)
    for i in range(6):
        (a, s), (a1, s1) = _scalars(p, grid[i]), _scalars(p, grid[i + 1])
        M = COV @ torch.linalg.inv(COV + (s / a) ** 2 * eye)
        mean = a1 * (MEAN + M @ (mean / a - MEAN))
        cov = (a1 / a) ** 2 * M @ cov @ M.T + s1 * s1 * eye
    law = _law(prior, grid, "lcm")
    torch.testing.assert_close(law.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(law.cov, cov, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["ddpm", "sde_dpmpp_2m", "lcm"])
def test_noise_seeds_drive_the_result(name):
    p = get_process("ddpm-linear")
    model = _mixture(p)
    x = _start(p)
    a = diffusolve.sample(model, x, 6, name, noise=1)
    b = diffusolve.sample(model, x, 6, name, noise=1)
    c = diffusolve.sample(model, x, 6, name, noise=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((a - c).abs().min()) > 1e-6  # every sample moved with its own noise
