"""SuperDiff: the Ito log-density estimator against exact mixture log-densities; OR and AND."""

import pytest
import torch

from diffusolve.compose import (
    and_kappa,
    ito_density_check,
    ito_log_density_step,
    superdiff_sample,
)
from diffusolve.compose._fields import sde_coefficients
from diffusolve.metrics import sliced_wasserstein, sw_noise_floor
from diffusolve.models import GaussianMixture
from diffusolve.process import edm, make_grid, rectified_flow, vp_linear


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def _rel(r, key):
    return float((r[key] - r["exact"]).abs().mean() / r["exact"].abs().mean())


def test_sde_coefficients_reproduce_the_marginal_variance():
    # d sigma^2/dt = 2 f sigma^2 + g^2 for the forward SDE of x_t = alpha x0 + sigma eps
    for p in (vp_linear(), rectified_flow(), edm()):
        t = 0.3 * p.t_min + 0.7 * p.t_max
        f, g2 = sde_coefficients(p, t)
        h = 1e-6 * (p.t_max - p.t_min)
        dvar = (float(p.sigma(t + h)) ** 2 - float(p.sigma(t - h)) ** 2) / (2 * h)
        assert dvar == pytest.approx(2 * f * float(p.sigma(t)) ** 2 + g2, rel=1e-6)


def test_single_gaussian_estimator_is_exact_to_first_order():
    # q_t = N(0, (alpha^2 v + sigma^2) I): mean increment over many noises matches exactly
    p = vp_linear()
    g = GaussianMixture(torch.ones(1), torch.zeros(1, 3), torch.tensor([0.5]), process=p)
    x = torch.randn(40000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, dt = 0.4, -1e-3
    f, g2 = sde_coefficients(p, t)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = g.score(x, t)
    xn = x + f * dt * x - g2 * dt * s + (g2 * -dt) ** 0.5 * z
    est = ito_log_density_step(p, t, t + dt, x, xn, s)
    exact = g.log_prob(xn, t + dt) - g.log_prob(x, t)
    err = (est - exact).mean()
    assert abs(float(err)) < 5 * float((est - exact).std()) / 200 + 1e-6
    flipped = ito_log_density_step(p, t, t + dt, x, xn, s, form="or_code")
    assert abs(float((flipped - exact).mean())) > 20 * abs(float(err))


@pytest.mark.parametrize("process", [vp_linear(), rectified_flow()], ids=["vp", "rf"])
def test_estimator_on_mixtures_vs_exact_and_the_sign(process):
    gs = [GaussianMixture.random(8, 3, process=process, seed=s) for s in (1, 2)]
    x = process.prior_sample((100, 8), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = ito_density_check(gs, x, make_grid(process, 300), torch.Generator().manual_seed(1))
    assert _rel(r, "trapezoid") < 0.01  # the corrected estimator within 1% at 300 steps
    assert _rel(r, "ito") < 0.04
    assert _rel(r, "or_code") > 1.0  # the flipped quadratic term is wrong by the change itself


def test_estimator_converges_with_steps():
    p = vp_linear()
    gs = [GaussianMixture.random(4, 3, process=p, seed=s) for s in (3, 4)]
    x = p.prior_sample((100, 4), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = [
        _rel(ito_density_check(gs, x, make_grid(p, k), torch.Generator().manual_seed(1)), "ito")
        for k in (50, 200)
    ]
    assert errs[1] < 0.5 * errs[0]


def test_or_samples_the_equal_mixture():
    p = vp_linear()
    a = GaussianMixture.random(2, 3, process=p, seed=1, eig_range=(0.01, 0.1))
    b = GaussianMixture.random(2, 3, process=p, seed=2, eig_range=(0.01, 0.1))
    mix = GaussianMixture(
        torch.cat([a.weights, b.weights]),
        torch.cat([a.means, b.means]),
        torch.cat([a.covs, b.covs]),
        process=p,
    )
    n = 800
    x = p.prior_sample((n, 2), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, info = superdiff_sample([a, b], x, 100, "or", noise=torch.Generator().manual_seed(1))
    ref = mix.sample(n, torch.Generator().manual_seed(2))
    floor = sw_noise_floor(mix.sample, n, repeats=3)["mean"]
    assert sliced_wasserstein(y, ref) < 2.0 * floor
    assert info.nfe == 2 * 101  # two separate models: two calls per step and the final
    k = info.kappa
    assert torch.allclose(k.sum(1), torch.ones_like(k.sum(1)))


def test_and_equalises_the_log_densities():
    p = vp_linear()
    a = GaussianMixture.random(2, 3, process=p, seed=1, eig_range=(0.05, 0.3))
    b = GaussianMixture.random(2, 3, process=p, seed=2, eig_range=(0.05, 0.3))
    x = p.prior_sample((200, 2), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
    gaps = {}
    for mode in ("and", "or"):
        y, info = superdiff_sample(
            [a, b], x, 200, mode, noise=torch.Generator().manual_seed(1), final="none"
        )
        t = p.t_min
        gaps[mode] = float((a.log_prob(y, t) - b.log_prob(y, t)).abs().mean())
        if mode == "and":  # the estimates stay equal step by step
            est = info.log_q[-1]
            assert torch.allclose(est[0], est[1], atol=1e-6)
    assert gaps["and"] < 0.2 * gaps["or"]


def test_and_kappa_two_models_matches_the_linear_solve():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    k2 = and_kappa(s, z, 2.0, -0.01)
    s3 = torch.cat([s, s[1:]])  # a third expert equal to the second: same equalities
    k3 = and_kappa(s3, z, 2.0, -0.01)
    assert torch.allclose(k2[0], k3[0], atol=1e-8)
    # the equalised increments: -g^2 dt (A kappa)_i + b_i equal for i = 1, 2
    comb = (k2[..., None] * s).sum(0)
    inc = [
        -2.0 * -0.01 * (si * comb).sum(-1)
        + (2.0 * 0.01) ** 0.5 * (si * z).sum(-1)
        + 0.5 * 2.0 * -0.01 * (si * si).sum(-1)
        for si in s
    ]
    assert torch.allclose(inc[0], inc[1], atol=1e-10)


def test_stacked_conditional_calls_the_network_once_per_step():
    from diffusolve.models.analytic.conditional import ClassConditionalMixture

    p = vp_linear()
    model = ClassConditionalMixture.random(3, 2, 2, process=p, seed=0)
    calls = []

    class Counted:
        process = p

        def __call__(self, x, t, cond=None):
            calls.append(x.shape[0])
            return model(x, t, cond)

    x = p.prior_sample((5, 3), noise=0, dtype=torch.float64)
    y, info = superdiff_sample(Counted(), x, 10, "or", cond=[0, 1], noise=1)
    assert info.nfe == 11 and calls == [10] * 11
    z, _ = superdiff_sample([model.parts[0], model.parts[1]], x, 10, "or", noise=1)
    assert torch.allclose(y, z, atol=1e-12)  # stacked == separate experts


def test_errors():
    p = vp_linear()
    a = GaussianMixture.random(2, 2, process=p, seed=1)
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        superdiff_sample([a, a], x, 5, "xor")
    with pytest.raises(ValueError, match="at least two"):
        superdiff_sample([a], x, 5, "or")
    with pytest.raises(ValueError, match="share one process"):
        superdiff_sample([a, GaussianMixture.random(2, 2, process=edm(), seed=1)], x, 5)
    with pytest.raises(ValueError, match="list of conditions"):
        superdiff_sample(a, x, 5)
