"""Devices and precision (issue 13): half networks with float32/float64 states, analytic
priors that move with ``.to``, dtype propagation through guidance and the loop, and the
``torch.compile`` fallback. Runs on the CPU (CUDA is checked by ``scripts/gpu_check.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffusolve
from diffusolve.guidance import classifier_free
from diffusolve.models import (
    Empirical,
    Gaussian,
    GaussianMixture,
    NetworkPrecision,
    compile_network,
    load,
)
from diffusolve.models.analytic import ClassConditionalMixture
from diffusolve.models.precision import networks
from diffusolve.process import edm, vp_linear

#: bf16 network vs float32 network, same float32 state: relative L2 of the samples
#: (measured 0.0023-0.0048 over ddim/dpmpp_2m/unipc/heun x denoise/zero at 10 steps, 64
#: samples; the bound leaves room for other BLAS kernels)
BF16_REL = 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def digits_pair():
    return load("digits"), load("digits", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("solver", "final"), [("ddim", "denoise"), ("dpmpp_3m", "zero"), ("unipc_bh2_3", "zero")]
)
def test_bf16_network_float32_state_finite_and_close(digits_pair, solver, final):
    m32, m16 = digits_pair
    x = m32.process.prior_sample((12, 1, 16, 16), noise=0)
    cond = torch.arange(12) % 10
    with torch.no_grad():
        ref = diffusolve.sample(m32, x, 8, solver, cond=cond, final=final)
        out = diffusolve.sample(m16, x, 8, solver, cond=cond, final=final)
    assert out.dtype == torch.float32  # the state keeps its dtype
    assert bool(torch.isfinite(out).all())
    assert _rel(out, ref) < BF16_REL


def test_bf16_network_float64_state_and_autocast(digits_pair):
    m32, m16 = digits_pair
    x = m32.process.prior_sample((8, 1, 16, 16), noise=1, dtype=torch.float64)
    with torch.no_grad():
        ref = diffusolve.sample(m32, x, 6, "dpmpp_2m", cond=3, final="zero")
        half = diffusolve.sample(m16, x, 6, "dpmpp_2m", cond=3, final="zero")
        auto = diffusolve.sample(NetworkPrecision(m32), x, 6, "dpmpp_2m", cond=3, final="zero")
        off = diffusolve.sample(
            NetworkPrecision(m32, enabled=False), x, 6, "dpmpp_2m", cond=3, final="zero"
        )
    assert half.dtype == auto.dtype == torch.float64
    assert bool(torch.isfinite(half).all()) and bool(torch.isfinite(auto).all())
    assert _rel(half, ref) < BF16_REL and _rel(auto, ref) < BF16_REL
    assert torch.equal(off, ref)  # disabled: exactly the wrapped model


def test_half_network_final_step_has_no_overflow():
    """The x0 conversion at the smallest grid time runs in the state's dtype: an epsilon
    network under float16 autocast whose output is exactly representable gives the float32
    result bitwise (no half-precision rounding of ``(x - sigma eps) / alpha``)."""
    proc = vp_linear()
    net = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.constant_(net.weight, 0.5)
    model32 = diffusolve.models.from_callable(lambda x, t: net(x), proc, "epsilon")
    x = torch.full((2, 1, 2, 2), 0.25)
    t = torch.tensor(proc.t_min, dtype=torch.float64)
    a = model32(x, t)
    b = NetworkPrecision(model32, torch.float16)(x, t)
    assert bool(torch.isfinite(b).all())
    assert torch.equal(a, b)


def _tensors(obj, seen=None):
    """Every tensor reachable from an analytic prior's attributes (nested priors, lists)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v, seen)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("diffusolve.models"):
        return [t for v in vars(obj).values() for t in _tensors(v, seen)]
    return []


def _priors():
    gmm = GaussianMixture.random(3, 4, process=edm(), seed=0)
    return [
        Gaussian(torch.zeros(3), torch.tensor([0.5, 1.0, 2.0]), process=edm()),
        gmm,
        Empirical(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), process=edm()),
        ClassConditionalMixture(gmm, torch.tensor([0, 0, 1, 1])),
    ]


@pytest.mark.parametrize("prior", _priors(), ids=lambda p: type(p).__name__)
def test_prior_to_moves_every_tensor_and_keeps_results(prior):
    before = [t.clone() for t in _tensors(prior)]
    meta = prior.to("meta")  # the meta device: every tensor must leave the CPU
    assert all(t.device.type == "meta" for t in _tensors(meta))
    f32 = prior.to(dtype=torch.float32)
    assert f32.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in _tensors(f32) if t.is_floating_point())
    back = f32.to(dtype=torch.float64)
    # the original is unchanged (a moved copy, not a mutation)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(prior), strict=True))
    assert prior.dtype == torch.float64 and prior.device.type == "cpu"
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = {} if not isinstance(prior, ClassConditionalMixture) else {"cond": [0, 1, 2] * 2}
    for t in (0.05, 1.0, 20.0):
        ref = prior(x, t, **cond)
        assert torch.equal(prior.to(device="cpu")(x, t, **cond), ref)
        out32 = f32(x, t, **cond)
        assert out32.dtype == torch.float64  # returned in the input's dtype
        assert torch.allclose(out32, ref, rtol=1e-4, atol=1e-4)
        # float32 parameters rounded once: back in float64 within float32 rounding
        assert torch.allclose(back(x, t, **cond), ref, rtol=1e-5, atol=1e-6)
    if hasattr(prior, "log_prob"):
        assert torch.allclose(f32.log_prob(x, 1.0).double(), prior.log_prob(x, 1.0), rtol=1e-5)
    g = torch.Generator().manual_seed(3)
    s64 = prior.sample(4, generator=g)
    s32 = f32.sample(4, generator=torch.Generator().manual_seed(3))
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), s64, atol=1e-6)  # same draws, either dtype


def test_prior_to_refuses_half():
    with pytest.raises(ValueError, match="float32 or float64"):
        _priors()[0].to(dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_propagates_through_guidance_and_loop(dtype):
    """A guided exact model sampled with a float32 or float64 state returns that dtype, and
    the two agree to float32 accuracy; the prior moved to float32 gives the same solve."""
    model = ClassConditionalMixture.random(4, num_classes=2, per_class=2, process=vp_linear())
    guided = classifier_free(model, 2.0, null_cond=model.null_cond)
    guided32 = classifier_free(
        model.to(dtype=torch.float32), 2.0, null_cond=model.to(dtype=torch.float32).null_cond
    )
    x = model.process.prior_sample((6, 4), noise=0, dtype=torch.float64)
    cond = torch.tensor([0, 1, 0, 1, 0, 1])
    ref = diffusolve.sample(guided, x, 12, "dpmpp_2m", cond=cond, final="zero")
    out = diffusolve.sample(guided, x, 12, "dpmpp_2m", cond=cond, final="zero", dtype=dtype)
    out32 = diffusolve.sample(guided32, x, 12, "dpmpp_2m", cond=cond, final="zero", dtype=dtype)
    assert out.dtype == out32.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert _rel(out, ref) < tol
    assert _rel(out32, ref) < 1e-4


def test_networks_found_through_wrappers():
    model = diffusolve.load("digits", guidance=2.0)
    nets = networks(model)
    assert [type(n).__name__ for n in nets] == ["UNet2DModel"]
    assert networks(GaussianMixture.random(2, 2, process=edm())) == []


def test_compile_fallback_warns_and_matches_eager(monkeypatch):
    """A compiler that fails at the first call: one warning, then eager results (bitwise);
    the original model is not modified."""
    calls = {"n": 0}

    def broken_compile(module, **options):
        def run(*args, **kwargs):
            calls["n"] += 1
            raise RuntimeError("no working C compiler (test)")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = load("digits")
    unet = model.model.unet
    fast = compile_network(model, dynamic=False)
    assert model.model.unet is unet and fast.model.unet is not unet
    x = model.process.prior_sample((3, 1, 16, 16), noise=0)
    with torch.no_grad():
        ref = diffusolve.sample(model, x, 3, "ddim", cond=[1, 2, 3])
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            out = diffusolve.sample(fast, x, 3, "ddim", cond=[1, 2, 3])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            again = diffusolve.sample(
                model, x, 3, "ddim", cond=[1, 2, 3], compile={"dynamic": False}
            )
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert calls["n"] == 1  # the failed compiled call is not retried


def test_compile_unavailable_warns(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    model = GaussianMixture.random(2, 2, process=edm())
    assert compile_network(model) is model  # no network: nothing to compile, no warning
    net = diffusolve.models.from_callable(torch.nn.Identity(), edm(), "x0")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert compile_network(net).fn is net.fn


@pytest.mark.slow
def test_compile_matches_eager():
    """The real torch.compile (minutes on a small CPU): same samples to float tolerance."""
    model = load("digits")
    x = model.process.prior_sample((4, 1, 16, 16), noise=0)
    with torch.no_grad():
        ref = diffusolve.sample(model, x, 4, "dpmpp_2m", cond=[1, 2, 3, 4])
        out = diffusolve.sample(model, x, 4, "dpmpp_2m", cond=[1, 2, 3, 4], compile=True)
    assert _rel(out, ref) < 1e-4
