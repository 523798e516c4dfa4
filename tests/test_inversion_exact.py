"""Exact inversions (EDICT, BDIA, O-BELM): round trips at rounding level, per-step inverses,
O-BELM's second order, save/load, editing sanity and option validation."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import diffusolve
from diffusolve.guidance import classifier_free
from diffusolve.inversion import (
    Inversion,
    compensated,
    get_inverter,
    invert,
    list_inverters,
    load_inversion,
    reconstruct,
)
from diffusolve.models import GaussianMixture
from diffusolve.models.analytic.conditional import ClassConditionalMixture
from diffusolve.process import Process, ddpm, edm, make_grid, rectified_flow, vp_linear
from diffusolve.solvers.base import BoundModel

# small mixtures and batches of 2 digits: a second intra-op thread only waits
pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = ("edict", "bdia", "belm")
PROCESSES = {"ddpm": ddpm, "vp": vp_linear, "rf": rectified_flow, "edm": edm}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def guided_mixture(process, scale: float, seed: int = 0):
    """A class-conditional exact mixture (2 classes) under classifier-free guidance."""
    base = ClassConditionalMixture.random(16, 2, 2, process=process, seed=seed)
    model = base if scale == 1.0 else classifier_free(base, scale, null_cond=base.null_cond)
    x = base.sample(6, 0, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def test_registered_with_flags_and_citations():
    names = list_inverters()
    for name in EXACT:
        assert name in names
        inv = get_inverter(name)
        assert type(inv).exact is True and inv.name == name
        assert inv.citation and not type(inv).needs_guidance
        assert type(inv)(**inv.options()) == inv


@pytest.mark.parametrize("proc", sorted(PROCESSES))
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("method", EXACT)
def test_round_trip_float64(method, scale, proc):
    model, x = guided_mixture(PROCESSES[proc](), scale)
    cond = torch.tensor([0])
    inv = invert(model, x, 20, method, cond=cond)
    assert inv.method.name == method and inv.latent.dtype == torch.float64
    err = rel(reconstruct(model, inv), x)
    assert err <= 1e-10, err
    # the latent is noise-like, not the data
    assert rel(inv.latent, x) > 0.5


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("method", EXACT)
def test_round_trip_float32(method, scale):
    # EDICT's two sequences drift apart in float32 unless the mixing damps the drift: with
    # p = 0.93, measured 3e-4 (20 steps), 1-4e-5 (50), 2-4e-7 (100); BDIA and O-BELM are
    # at rounding level from 10 steps on
    steps = 100 if method == "edict" else 20
    model, x = guided_mixture(ddpm(), scale)
    x = x.float()
    inv = invert(model, x, steps, method, cond=torch.tensor([0]))
    out = reconstruct(model, inv)
    assert out.dtype == torch.float32
    assert rel(out, x) <= 1e-5, rel(out, x)


def test_other_condition_edits():
    model, x = guided_mixture(ddpm(), 3.0)
    for method in EXACT:
        inv = invert(model, x, 20, method, cond=torch.tensor([0]))
        same = reconstruct(model, inv)
        other = reconstruct(model, inv, cond=torch.tensor([1]))
        assert rel(same, x) < 1e-10
        assert rel(other, x) > 1e-2, method  # another class gives another image


def test_sigma_zero_clean_end():
    """Data at sigma = 0 (rectified flow on [0, t_max]): still exact."""
    rf0 = Process(lambda t: 1 - t, lambda t: t, t_min=0.0, t_max=0.999, name="rf0")
    gmm = GaussianMixture.random(8, 3, process=rf0, seed=0, eig_range=(0.05, 0.5))
    x = gmm.sample(8, torch.Generator().manual_seed(1))
    for method in EXACT:
        inv = invert(gmm, x, 12, method)
        assert torch.isfinite(inv.latent).all()
        assert rel(reconstruct(gmm, inv), x) <= 1e-10


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_digits(dtype, scale):
    """The bundled UNet, run in the state's dtype (``diffusolve.load(..., dtype=)``)."""
    model = diffusolve.load("digits", guidance=scale, dtype=dtype)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = x.to(dtype)
    with torch.no_grad():
        for method in EXACT:
            inv = invert(model, x, 10, method, cond=[3, 7])
            err = rel(reconstruct(model, inv), x)
            if dtype == torch.float64:  # double-float64 states (default): measured 0
                assert err <= 1e-14, (method, err)
            else:  # EDICT at 10 steps in float32: ~1e-3 (see test_round_trip_float32)
                assert err <= (5e-3 if method == "edict" else 1e-5), (method, err)


def test_per_step_inverses():
    model, x = guided_mixture(vp_linear(), 3.0)
    cond = torch.tensor([1])
    bound = BoundModel(model, cond)
    g = make_grid(model.process, 6, "logsnr")
    y = x.flip(0)
    edict = get_inverter("edict")
    for i in range(3):
        xs, ys = edict.step(bound, x, y, g[i], g[i + 1], i)
        xb, yb = edict.inverse_step(model, xs, ys, g[i], g[i + 1], i, cond=cond)
        assert rel(xb, x) < 1e-12 and rel(yb, y) < 1e-12
    for name in ("bdia", "belm"):
        inv = get_inverter(name)
        z_next = inv.step(bound, y, x, g[1], g[2], g[3])
        back = inv.inverse_step(model, x, z_next, g[1], g[2], g[3], cond=cond)
        assert rel(back, y) < 1e-12
        # the first step (no previous state) is DDIM
        first = inv.step(bound, None, x, None, g[0], g[1])
        assert torch.allclose(
            first,
            diffusolve.sample(model, x, g[:2], "ddim", cond=cond, final="none"),
            rtol=0,
            atol=1e-12,
        )


def test_obelm_is_second_order():
    """O-BELM sampling from noise against the exact probability-flow endpoint (float64)."""
    for process in (vp_linear(), rectified_flow()):
        gmm = GaussianMixture.random(8, 3, process=process, seed=0, eig_range=(0.05, 0.5))
        xT = process.prior_sample((16, 8), noise=0, dtype=torch.float64)
        ref = gmm.ode_solve(xT, process.t_max, process.t_min, rtol=1e-12, atol=1e-12)
        belm = get_inverter("belm")
        steps = [16, 32, 64]
        errs = [rel(belm.generate(gmm, xT, make_grid(process, n, "logsnr")), ref) for n in steps]
        slope = -torch.tensor(errs).log().diff().div(math.log(2)).mean()
        # measured: 1.94-2.00 (vp-linear), 1.89-2.00 (rectified flow)
        assert 1.8 <= float(slope) <= 2.3, (process.name, errs)
        ddim = diffusolve.sample(gmm, xT, make_grid(process, 64, "logsnr"), "ddim", final="none")
        assert errs[-1] < rel(ddim, ref) / 4


def test_save_load_bitwise(tmp_path):
    model, x = guided_mixture(ddpm(), 3.0)
    cond = torch.tensor([0])
    for method in EXACT:
        inv = (
            invert(model, x, 8, method, cond=cond, p=0.9)
            if method == "edict"
            else invert(model, x, 8, method, cond=cond)
        )
        path = inv.save(tmp_path / f"{method}.safetensors")
        back = load_inversion(path)
        assert isinstance(back, Inversion) and back.method == inv.method
        assert set(back.aux) == set(inv.aux)
        assert torch.equal(back.cond, cond)
        assert torch.equal(reconstruct(model, back), reconstruct(model, inv))
        with pytest.raises(FileExistsError, match="force"):
            inv.save(path)
        inv.save(path, force=True)
    assert load_inversion(tmp_path / "edict.safetensors").method.p == 0.9


def test_option_validation():
    for p in (0.0, -0.5, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="p must"):
            get_inverter("edict", p=p)
    with pytest.raises(ValueError, match="leapfrog"):
        get_inverter("edict", leapfrog=1)
    for g in (-0.1, 1.1, float("inf"), False):
        with pytest.raises(ValueError, match="gamma must"):
            get_inverter("bdia", gamma=g)
    with pytest.raises(TypeError):
        get_inverter("belm", gamma=0.5)
    model, x = guided_mixture(ddpm(), 1.0)
    with pytest.raises(ValueError, match="gamma = 0"):
        invert(model, x, 10, "bdia", gamma=0.0)
    # gamma = 0 still samples (it is DDIM)
    g = make_grid(model.process, 5, "time_uniform")
    out = get_inverter("bdia", gamma=0.0).generate(model, x, g)
    assert rel(out, diffusolve.sample(model, x, g, "ddim", final="none")) < 1e-12
    for method in ("bdia", "belm"):
        with pytest.raises(ValueError, match="at least 2 steps"):
            invert(model, x, 1, method)
    inv = invert(model, x, 4, "edict")
    with pytest.raises(ValueError, match="aux"):
        reconstruct(model, Inversion(inv.latent, inv.grid, inv.method))


def _exact(t: torch.Tensor) -> list[Fraction]:
    return [Fraction(float(v)) for v in t.flatten()]


def test_compensated_arithmetic_against_exact_rationals():
    """Double-float64 ``lincomb`` and ``divide`` against exact rational arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, dtype=torch.float64, generator=g)
    y = torch.randn(64, dtype=torch.float64, generator=g) * 1e-3
    lo = torch.randn(64, dtype=torch.float64, generator=g) * 1e-20
    px = compensated.Pair.of(x, lo)
    cs = (0.93, -0.07000000000000006, 1.0 / 3.0, 7.1e4)
    out = compensated.lincomb((cs[0], px), (cs[1], y), (cs[2], px), (cs[3], y))
    q = compensated.divide(out, cs[1])
    for k, (xh, xl, yv, oh, ol, qh, ql) in enumerate(
        zip(*map(_exact, (px.hi, px.lo, y, out.hi, out.lo, q.hi, q.lo)), strict=True)
    ):
        xv = xh + xl
        want = Fraction(cs[0]) * xv + Fraction(cs[1]) * yv + Fraction(cs[2]) * xv
        want += Fraction(cs[3]) * yv
        scale = abs(Fraction(cs[0]) * xv) + abs(Fraction(cs[3]) * yv) + abs(Fraction(cs[2]) * xv)
        assert abs(oh + ol - want) <= Fraction(1, 10**30) * scale, k
        # normalised: hi is the float64 rounding of hi + lo
        assert abs(ol) <= abs(oh) * Fraction(2) ** -52, k
        assert abs(qh + ql - (oh + ol) / Fraction(cs[1])) <= Fraction(1, 10**30) * abs(qh), k
    # plain tensors: the ordinary float64 arithmetic
    plain = compensated.lincomb((cs[0], x), (cs[1], y))
    assert torch.equal(plain, torch.add(x * cs[0], y, alpha=cs[1]))
    assert torch.equal(compensated.divide(x, 3.0), x / 3.0)
    with pytest.raises(ZeroDivisionError):
        compensated.divide(px, 0.0)


@pytest.mark.parametrize("method", EXACT)
def test_double_double_state_makes_short_round_trips_exact(method):
    """At 10 steps under guidance 7.5 on a rectified-flow mixture float64 states leave
    EDICT at ~1e-11 (its inverse amplifies rounding); double-float64 states (the default)
    reproduce the float64 input to its rounding."""
    model, x = guided_mixture(rectified_flow(), 7.5)
    cond = torch.tensor([1])
    errs = {}
    for precision in ("double-double", "float64"):
        inv = invert(model, x, 10, method, cond=cond, precision=precision)
        assert inv.latent.dtype == torch.float64
        assert ("latent_lo" in inv.aux) == (precision == "double-double")
        errs[precision] = rel(reconstruct(model, inv), x)
    assert errs["double-double"] <= 1e-15, errs
    with pytest.raises(ValueError, match="precision must be one of"):
        get_inverter(method, precision="float128")
