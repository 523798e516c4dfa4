"""Intrinsic dimension on low-rank mixtures of known ranks; conservativity closed forms."""

import math

import pytest
import torch

from diffusolve.analysis import (
    asymmetry,
    component_samples,
    flipd_id,
    flow_jacobian_id,
    low_rank_mixture,
    stanczuk_id,
)
from diffusolve.models import CallableDenoiser, GaussianMixture
from diffusolve.process import edm, rectified_flow, ve, vp_linear

pytestmark = pytest.mark.usefixtures("single_thread")
ESTIMATORS = {"stanczuk": stanczuk_id, "flipd": flipd_id, "flow": flow_jacobian_id}


@pytest.mark.parametrize(
    "seed, dim, ranks, make",
    [
        (0, 16, [1, 3, 5, 8], edm),  # the mixture the defaults were chosen on
        (11, 32, [2, 4, 7, 12], rectified_flow),  # not tuned on
        (12, 24, [1, 10, 20, 23], vp_linear),  # not tuned on
    ],
)
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_exact_rank_on_every_component(seed, dim, ranks, make, name):
    gmm, ranks = low_rank_mixture(dim, ranks, process=make(), seed=seed)
    x, comp = component_samples(gmm, 3, seed=seed + 1)
    est, _ = ESTIMATORS[name](gmm, x)
    true = torch.tensor(ranks, dtype=torch.float64)[comp]
    assert torch.equal(est.round(), true)


def test_flipd_closed_form_on_one_gaussian():
    """FLIPD = sum l/(l+s^2) + sum s^2 y^2/(l+s^2)^2 for one rank-k Gaussian (y: tangent
    coordinates of x0 - mu), exactly."""
    gmm, _ = low_rank_mixture(6, [3], process=edm(), seed=4)
    x, _ = component_samples(gmm, 2, seed=5)
    s = 0.3
    est, info = flipd_id(gmm, x, sigma=s)
    l = gmm.evals[0]
    y = (x - gmm.means[0]) @ gmm.evecs[0]
    ref = (l / (l + s**2)).sum() + (s**2 * y**2 / (l + s**2) ** 2).sum(1)
    assert torch.allclose(est, ref, rtol=1e-10)
    hutch, _ = flipd_id(gmm, x, sigma=s, trace_mode="hutchinson", probes=64)
    assert torch.allclose(hutch, ref, atol=0.5)


def test_flow_jacobian_singular_values():
    """On one Gaussian the flow map is affine: normal singular values are s1/s0 and tangent
    ones sqrt((l + s1^2) / (l + s0^2)) (up to the RK4 error)."""
    gmm, _ = low_rank_mixture(5, [2], process=edm(), seed=6)
    x, _ = component_samples(gmm, 1, seed=7)
    est, info = flow_jacobian_id(gmm, x, sigma_start=0.05, sigma_end=0.5, steps=16)
    sv = info["singular_values"][0]
    tangent = torch.sqrt((gmm.evals[0][:2] + 0.25) / (gmm.evals[0][:2] + 0.0025))
    ref = torch.cat([torch.full((3,), 10.0, dtype=torch.float64), tangent.sort(descending=True)[0]])
    assert torch.allclose(sv, ref, rtol=1e-5)
    assert est.tolist() == [2.0]


def test_stanczuk_spectrum_gap():
    """The normal singular values exceed the tangent ones by about l / sigma^2."""
    gmm, _ = low_rank_mixture(8, [3], process=edm(), seed=8)
    x, _ = component_samples(gmm, 1, seed=9)
    est, info = stanczuk_id(gmm, x, sigma=0.01)
    sv = info["singular_values"][0]
    assert est.tolist() == [3.0]
    assert float(sv[4] / sv[5]) > 1e3 * float(gmm.evals[0][:3].min())


def test_low_rank_mixture_properties():
    gmm, ranks = low_rank_mixture(10, [2, 7], process=ve(), seed=3)
    assert gmm.singular and ranks == [2, 7]
    assert [int((gmm.evals[k] > 0).sum()) for k in range(2)] == [2, 7]
    assert float(torch.dist(gmm.means[0], gmm.means[1])) == pytest.approx(10.0)
    # exact noised density: integrates the singular covariance + s^2 I (closed form, K = 1)
    one, _ = low_rank_mixture(4, [1], process=edm(), seed=0)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = one.covs[0] + 0.25 * torch.eye(4, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(one.means[0], cov).log_prob(x)
    assert torch.allclose(one.log_prob(x, 0.5), ref, atol=1e-10)
    with pytest.raises(ValueError, match="rank-deficient"):
        one.reference_zero(x, 0.5)
    with pytest.raises(ValueError, match="singular=True"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), process=edm())


def test_asymmetry_zero_on_exact_scores():
    for make, t in ((vp_linear, 0.3), (rectified_flow, 0.05), (edm, 2.0)):
        gmm = GaussianMixture.random(5, 3, process=make(), seed=1)
        x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        rel, info = asymmetry(gmm, x, t)
        assert float(rel.max()) < 1e-12 and float(info["denoiser"].max()) < 1e-12


def test_asymmetry_closed_form_linear_field():
    """D(x) = A x with a non-symmetric A: J_s = (alpha A - I) / sigma^2."""
    a = torch.tensor([[0.5, 0.3], [-0.1, 0.2]], dtype=torch.float64)
    proc = vp_linear()
    model = CallableDenoiser(lambda x, t: x @ a.T, proc, "x0")
    rel, info = asymmetry(model, torch.ones(1, 2, dtype=torch.float64), 0.4)
    al = float(proc.alpha(0.4))
    js = al * a - torch.eye(2, dtype=torch.float64)
    ref = torch.linalg.matrix_norm(al * (a - a.T)) / torch.linalg.matrix_norm(js)
    assert float(rel) == pytest.approx(float(ref), rel=1e-12)
    assert float(info["denoiser"]) == pytest.approx(
        float(torch.linalg.matrix_norm(a - a.T) / torch.linalg.matrix_norm(a)), rel=1e-12
    )


def test_errors():
    gmm, _ = low_rank_mixture(4, [1], process=edm(), seed=0)
    x = gmm.means[:1].clone()
    with pytest.raises(ValueError, match="outside"):
        stanczuk_id(gmm, x, sigma=1e-4)
    with pytest.raises(ValueError, match="rule"):
        flow_jacobian_id(gmm, x, rule="bogus")
    with pytest.raises(ValueError, match="sigma_start"):
        flow_jacobian_id(gmm, x, sigma_start=0.5, sigma_end=0.1)
    assert math.isfinite(float(flipd_id(gmm, x)[0]))
