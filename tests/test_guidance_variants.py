"""Guidance variants against exact references on analytic class-conditional models.

CFG++ against a hand-written CFG++ DDIM loop; interval guidance against CFG / the
conditional model (bitwise); rescaled CFG against a direct computation; classifier guidance
with the exact classifier of a mixture (= the conditional model at scale 1, = CFG at scale
s); loss guidance against finite differences and the Gaussian closed form; EluCD against a
hand-written DDPM loop with its mean update; one network call per evaluation; per-sample
scales against separate runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import diffusolve
from diffusolve.guidance import (
    CFGPlusPlus,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ClassifierTerm,
    EluCD,
    EluCDTerm,
    Guided,
    IntervalGuidance,
    LossGuidance,
    LossTerm,
    RescaledCFG,
    calibrated_log_prob,
    cfgpp_scale,
    softplus_relu,
)
from diffusolve.guidance.elucd import ddpm_step_coefficients
from diffusolve.models import Gaussian
from diffusolve.models.analytic.conditional import ClassConditionalMixture
from diffusolve.models.base import Denoiser
from diffusolve.process import ddpm, from_x0, make_grid, vp_linear

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


@pytest.fixture(scope="module")
def mix():
    return ClassConditionalMixture.random(3, num_classes=2, per_class=2, process=ddpm(), seed=3)


def _start(model, b=6, seed=0):
    return model.process.prior_sample((b, 3), noise=seed).to(F64)


class Counting(Denoiser):
    """Counts calls of the wrapped model (the 'network')."""

    def __init__(self, model):
        self.model, self.process, self.calls = model, model.process, 0
        self.null_cond = model.null_cond

    def denoise(self, x, t, cond=None):
        self.calls += 1
        return self.model(x, t, cond)


def exact_classifier(model: ClassConditionalMixture):
    """``log p(y | x_t)`` of the mixture: log of the summed responsibilities per class."""

    prior = torch.stack(
        [model.mixture.weights[model.classes == c].sum() for c in range(model.num_classes)]
    )

    def logits(x, t):  # log pi_c + log p_t(x | c) (the softmax normalises)
        t = t[0] if t.ndim else t
        return torch.log(prior) + torch.stack(
            [model.parts[c].log_prob(x, t) for c in range(model.num_classes)], 1
        )

    return logits


# ---------------------------------------------------------------------------- CFG++
def test_cfgpp_ddim_equals_hand_written_loop(mix):
    grid = make_grid(mix.process, 12, "time_uniform")
    lam, y = 0.6, torch.tensor([0, 1, 0, 1, 1, 0])
    x = _start(mix)
    out = diffusolve.sample(CFGPlusPlus(mix, lam, grid=grid), x, grid, "ddim", cond=y)
    p, z = mix.process, x.clone()
    for t, t1 in zip(grid[:-1], grid[1:], strict=True):
        x0_c, x0_u = mix(z, t, y), mix(z, t, None)
        x0_l = x0_u + lam * (x0_c - x0_u)
        eps_u = (z - p.alpha(t) * x0_u) / p.sigma(t)
        z = p.alpha(t1) * x0_l + p.sigma(t1) * eps_u
    x0_c, x0_u = mix(z, grid[-1], y), mix(z, grid[-1], None)
    ref = x0_u + lam * (x0_c - x0_u)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_cfgpp_scale_off_grid_uses_next_grid_time_below():
    p = ddpm()
    grid = torch.tensor([999.0, 600.0, 200.0, 0.0], dtype=F64)
    t = torch.tensor([999.0, 700.0, 600.0, 100.0, 0.0], dtype=F64)
    w = cfgpp_scale(p, grid, t, 0.5)
    nxt = torch.tensor([600.0, 600.0, 200.0, 0.0], dtype=F64)
    st, st1 = p.sigma_tilde(t[:4]), p.sigma_tilde(nxt)
    assert torch.allclose(w[:4], 0.5 * st / (st - st1), rtol=1e-14)
    assert float(w[4]) == 0.5  # last grid time: the CFG++ x0 itself


# ---------------------------------------------------------------------------- interval
def test_interval_inside_is_cfg_and_outside_is_conditional_bitwise(mix):
    count = Counting(mix)
    g = IntervalGuidance(count, 2.5, sigma_lo=0.5, sigma_hi=3.0)
    cfg = ClassifierFreeGuidance(mix, 2.5, null_cond=mix.null_cond)
    x, y = _start(mix), torch.tensor([0, 1, 1, 0, 0, 1])
    p = mix.process
    t_in, t_hi = float(p.t_of_sigma_tilde(1.0)), float(p.t_of_sigma_tilde(3.0))
    t_out_lo, t_out_hi = float(p.t_of_sigma_tilde(0.2)), float(p.t_of_sigma_tilde(10.0))
    assert torch.equal(g(x, t_in, y), cfg(x, t_in, y))
    if float(p.sigma_tilde(t_hi)) <= 3.0:  # the closed end, when the time maps back inside
        assert torch.equal(g(x, t_hi, y), cfg(x, t_hi, y))
    for t in (t_out_lo, t_out_hi):
        before = count.calls
        assert torch.equal(g(x, t, y), mix(x, t, y))
        assert count.calls == before + 1
    # per-sample times across the boundary: each row as on its own
    tt = torch.tensor([t_in, t_out_lo, t_in, t_out_hi, t_out_lo, t_in], dtype=F64)
    out = g(x, tt, y)
    for i in range(6):
        ref = g(x[i : i + 1], float(tt[i]), y[i : i + 1])
        assert torch.allclose(out[i : i + 1], ref, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------- rescaled
@pytest.mark.parametrize("space,kind", [("eps", "epsilon"), ("v", "v"), ("x0", "x0")])
def test_rescaled_cfg_against_direct_computation(mix, space, kind):
    x, y, t, w, phi = _start(mix), torch.tensor([0, 1, 1, 0, 0, 1]), 400.0, 4.0, 0.7
    p = mix.process
    pos = from_x0(p, x, t, mix(x, t, y), kind)
    neg = from_x0(p, x, t, mix(x, t, None), kind)
    cfg = neg + w * (pos - neg)
    out = torch.empty_like(cfg)
    for i in range(x.shape[0]):  # numpy-style std per sample (unbiased, as torch.std)
        r = float(pos[i].std()) / float(cfg[i].std())
        out[i] = phi * cfg[i] * r + (1 - phi) * cfg[i]
    ref = diffusolve.process.to_x0(p, x, t, out, kind)
    got = RescaledCFG(mix, w, phi=phi, space=space)(x, t, y)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    plain = RescaledCFG(mix, w, phi=0.0, space=space)(x, t, y)  # phi = 0: CFG (round trip)
    assert torch.allclose(plain, Guided(mix, w)(x, t, y), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- classifier
@pytest.mark.parametrize("t", [50.0, 400.0, 900.0])
def test_exact_classifier_guidance_is_the_conditional_model(mix, t):
    x, y = _start(mix, seed=int(t)), torch.tensor([0, 1, 1, 0, 0, 1])
    clf = exact_classifier(mix)
    guided = ClassifierGuidance(mix, clf, 1.0, cfg=0.0)(x, t, y)
    cond = mix(x, t, y)
    assert torch.allclose(guided, cond, rtol=1e-9, atol=1e-9)
    # at scale s it equals CFG at scale s: sigma^2/alpha grad log p(y|x) = x0_c - x0_u
    s3 = ClassifierGuidance(mix, clf, 3.0, cfg=0.0)(x, t, y)
    assert torch.allclose(s3, Guided(mix, 3.0)(x, t, y), rtol=1e-9, atol=1e-9)


def test_classifier_guidance_on_the_bundled_classifier_runs_and_points_to_the_target():
    from diffusolve.models import load, load_classifier

    model, clf = load("digits"), load_classifier()
    x = model.process.prior_sample((4, 1, 16, 16), noise=1)
    y = torch.tensor([0, 3, 5, 8])
    base = model(x, 300.0, y)
    shift = ClassifierGuidance(model, clf, 1.0)(x, 300.0, y) - base
    with torch.no_grad():
        lp0 = torch.log_softmax(clf(x, torch.tensor(300.0)), 1).gather(1, y[:, None])
        step = x + 1e-3 * shift / shift.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        lp1 = torch.log_softmax(clf(step, torch.tensor(300.0)), 1).gather(1, y[:, None])
    assert bool((lp1 > lp0).all())  # the shift is an ascent direction of log p(y | x_t)


# ---------------------------------------------------------------------------- loss
def test_loss_guidance_through_denoiser_matches_finite_differences(mix):
    x, y, t, s = _start(mix, b=3), torch.tensor([0, 1, 1]), 300.0, 0.8
    c = torch.tensor([0.3, -0.2, 0.5], dtype=F64)

    def loss(x0, cond):
        return torch.sin(x0 - c).pow(2).sum(1) + 0.1 * (x0**4).sum(1)

    shift = LossGuidance(mix, loss, s, through_denoiser=True)(x, t, y) - mix(x, t, y)
    p = mix.process
    coef = -s * float(p.sigma(t)) ** 2 / float(p.alpha(t))
    h = 1e-6
    fd = torch.zeros_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        fd[:, j] = (loss(mix(x + e, t, y), y) - loss(mix(x - e, t, y), y)) / (2 * h)
    assert torch.allclose(shift / coef, fd, rtol=1e-6, atol=1e-7)


def test_loss_guidance_on_a_gaussian_prior_closed_form_and_tilted_limit():
    d = 3
    mean = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
    cov = torch.tensor([1.0, 0.3, 2.0], dtype=F64)
    prior = Gaussian(mean, cov, process=vp_linear())
    p, t = prior.process, 0.4
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x = torch.randn(4, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    c, rho2 = torch.tensor([1.0, 1.0, -1.0], dtype=F64), 2.0
    post = 1.0 / (1.0 / cov + a * a / (s * s))  # diagonal posterior covariance

    def loss(x0, cond):
        return ((x0 - c) ** 2).sum(1) / (2 * rho2)

    x0 = prior(x, t)
    for scale in (1.0, 0.1, 0.01):
        got = LossGuidance(prior, loss, scale, through_denoiser=True)(x, t)
        assert torch.allclose(got, x0 - scale * post * (x0 - c) / rho2, rtol=1e-12, atol=1e-12)
    # exact tilted x0: x0 - (s/rho2) post (1 + s post / rho2)^-1 (x0 - c); error O(s^2)
    errs = []
    for scale in (0.1, 0.01):
        got = LossGuidance(prior, loss, scale, through_denoiser=True)(x, t)
        k = scale / rho2
        exact = x0 - k * post / (1 + k * post) * (x0 - c)
        errs.append(float((got - exact).abs().max()))
    assert errs[1] < errs[0] / 50  # quadratic convergence to the tilted posterior mean
    # without the denoiser's Jacobian: - s (sigma/alpha)^2 grad_x0
    got = LossGuidance(prior, loss, 1.0)(x, t)
    assert torch.allclose(got, x0 - (s / a) ** 2 * (x0 - c) / rho2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- EluCD
def test_softplus_relu_swaps_every_relu_in_a_copy():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    soft = softplus_relu(net, 3.0)
    assert isinstance(net[1], nn.ReLU) and isinstance(net[2][1], nn.ReLU)
    assert isinstance(soft[1], nn.Softplus) and soft[2][1].beta == 3.0
    x = torch.randn(5, 3)
    h = torch.nn.functional.softplus(net[0](x), beta=3.0)
    ref = torch.nn.functional.softplus(net[2][0](h), beta=3.0)
    assert torch.allclose(soft(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        softplus_relu(nn.Linear(2, 2))


def test_calibrated_log_prob_reduces_to_log_softmax():
    f = torch.randn(4, 5, dtype=F64)
    y = torch.tensor([0, 4, 2, 1])
    ref = torch.log_softmax(f, 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(calibrated_log_prob(f, y, 1.0, 1.0), ref, rtol=1e-14)


class Recorder:
    """A noise source that records its draws."""

    def __init__(self, seed):
        self.gen, self.draws = torch.Generator().manual_seed(seed), []

    def __call__(self, shape, dtype=None, device=None):
        z = torch.randn(shape, generator=self.gen, dtype=dtype)
        self.draws.append(z)
        return z


def test_elucd_with_ddpm_steps_equals_the_published_mean_update(mix):
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).to(F64)
    grid = make_grid(mix.process, 8, "time_uniform")
    scale, gamma, y = 1.5, 0.3, torch.tensor([0, 1, 1, 0])
    x = _start(mix, b=4)
    rec = Recorder(5)
    g = EluCD(mix, clf, scale, grid=grid, gamma=gamma)
    out = diffusolve.sample(g, x, grid, "ddpm", cond=y, noise=rec, final="none")
    soft = softplus_relu(clf, 3.0)
    p = mix.process
    _, var = ddpm_step_coefficients(p, grid[:-1], grid[1:])
    vmax = float(var.max())
    z = x.clone()
    for i, (t, t1) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x0 = mix(z, t, y)
        x0r = x0.clone().requires_grad_(True)
        lp = calibrated_log_prob(soft(x0r), y, 1.0, 0.5).sum()
        (gr,) = torch.autograd.grad(lp, x0r)
        a, s, a1, s1 = p.alpha(t), p.sigma(t), p.alpha(t1), p.sigma(t1)
        c0, v = ddpm_step_coefficients(p, t, t1)
        mean = a1 * x0 + (z - a * x0) / s * torch.sqrt(s1 * s1 - v)  # q(x_t' | x_t, x0) mean
        u = (t - p.t_min) / (p.t_max - p.t_min)
        mean = mean + (v + gamma * math.sin(math.pi * float(u)) * vmax) * scale * gr
        z = mean + torch.sqrt(v) * rec.draws[i]
    assert torch.allclose(out, z, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- sharing
def test_one_network_call_per_evaluation_shared_by_every_term(mix):
    count = Counting(mix)
    grid = make_grid(mix.process, 6, "time_uniform")
    clf = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    terms = [
        ClassifierTerm(exact_classifier(mix), 0.5),
        LossTerm(lambda x0, c: (x0**2).sum(1), 0.3, through_denoiser=True),
        LossTerm(lambda x0, c: (x0**2).sum(1), 0.3),
        EluCDTerm(clf, 0.2, grid),
    ]
    g = Guided(count, 2.0, terms)
    stats = {}
    x = _start(mix, b=4)
    out = diffusolve.sample(g, x, grid, "dpmpp_2m", cond=torch.tensor([0, 1, 0, 1]), stats=stats)
    assert torch.isfinite(out).all()
    assert count.calls == stats["nfe"] == 7


def test_per_sample_scales_equal_separate_runs(mix):
    grid = make_grid(mix.process, 6, "time_uniform")
    x, y = _start(mix, b=4), torch.tensor([0, 1, 1, 0])
    cfg = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=F64)
    cls = torch.tensor([0.5, 0.0, 1.0, 2.0], dtype=F64)
    lam = torch.tensor([0.2, 0.5, 0.8, 1.0], dtype=F64)
    clf = exact_classifier(mix)

    def run(model, x, y):
        return diffusolve.sample(model, x, grid, "ddim", cond=y)

    batch = run(Guided(mix, cfg, [ClassifierTerm(clf, cls)]), x, y)
    batch_pp = run(CFGPlusPlus(mix, lam, grid=grid), x, y)
    batch_rs = run(RescaledCFG(mix, cfg, phi=cls / 2), x, y)
    for i in range(4):
        sl = slice(i, i + 1)
        one = run(Guided(mix, float(cfg[i]), [ClassifierTerm(clf, float(cls[i]))]), x[sl], y[sl])
        assert torch.allclose(batch[sl], one, rtol=1e-12, atol=1e-12)
        one = run(CFGPlusPlus(mix, float(lam[i]), grid=grid), x[sl], y[sl])
        assert torch.allclose(batch_pp[sl], one, rtol=1e-12, atol=1e-12)
        one = run(RescaledCFG(mix, float(cfg[i]), phi=float(cls[i]) / 2), x[sl], y[sl])
        assert torch.allclose(batch_rs[sl], one, rtol=1e-12, atol=1e-12)


def test_label_model_wrapping_keeps_int_labels_and_validates():
    from diffusolve.models import load

    model = load("digits")
    x = model.process.prior_sample((2, 1, 16, 16), noise=0)
    ref = diffusolve.load("digits", guidance=2.0)(x, 500.0, [1, 2])
    assert torch.equal(Guided(model, 2.0)(x, 500.0, [1, 2]), ref)
    with pytest.raises(ValueError, match="lambda"):
        CFGPlusPlus(model, 1.5, grid=make_grid(model.process, 4))
    with pytest.raises(ValueError, match="finite"):
        Guided(model, torch.tensor([1.0, float("nan")]))
