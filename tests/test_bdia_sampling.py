"""BDIA as a sampler (``bdia_ddim``, ``bdia_edm``): reduction to DDIM / Heun, agreement with
the exact-inversion scheme's generator, and convergence orders on an exact mixture."""

import math

import pytest
import torch

from diffusolve import get_solver, sample
from diffusolve.inversion.bdia import BDIA
from diffusolve.models.analytic import GaussianMixture
from diffusolve.process import PROCESSES, get_process, make_grid, vp_linear

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _gmm(process):
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.5]], dtype=F64)
    covs = torch.tensor([[0.05, 0.2], [0.3, 0.02], [0.1, 0.1]], dtype=F64)
    return GaussianMixture(weights, means, covs, process=process)


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_gamma_zero_is_the_plain_sampler_bitwise(process_name):
    p = get_process(process_name)
    gmm = _gmm(p)
    x = p.prior_sample((8, 2), torch.Generator().manual_seed(0), dtype=F64)
    for kind in ("logsnr", "karras"):
        grid = make_grid(p, 9, kind)
        for bdia, plain in (("bdia_ddim", "ddim"), ("bdia_edm", "heun")):
            for backward in ("euler", "quadratic") if bdia == "bdia_edm" else (None,):
                opts = {"gamma": 0.0} | ({"backward": backward} if backward else {})
                a = sample(gmm, x, grid, bdia, final="none", **opts)
                b = sample(gmm, x, grid, plain, final="none")
                assert torch.equal(a, b), (process_name, kind, bdia, backward)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 1.0])
def test_bdia_ddim_equals_the_exact_inversion_generator(gamma):
    """The inversion package's BDIA (two-state form with its own coefficients) generates
    the same states from noise."""
    p = vp_linear()
    gmm = _gmm(p)
    x = p.prior_sample((16, 2), torch.Generator().manual_seed(1), dtype=F64)
    grid = make_grid(p, 12, "logsnr")
    ours = sample(gmm, x, grid, "bdia_ddim", gamma=gamma, final="none")
    theirs = BDIA(gamma=gamma).generate(gmm, x, grid)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_bdia_edm_step_by_hand():
    """Two steps of bdia_edm against the formula written out in x / alpha, s = sigma / alpha."""
    p = vp_linear()
    gmm = _gmm(p)
    x = p.prior_sample((5, 2), torch.Generator().manual_seed(2), dtype=F64)
    grid = make_grid(p, 2, "karras")
    g = 0.3
    a = [float(p.alpha(t)) for t in grid]
    s = [float(p.sigma(t)) / a[i] for i, t in enumerate(grid)]

    def D(xt, i):
        return gmm(a[i] * xt, grid[i])

    def heun(xt, i):
        d = (xt - D(xt, i)) / s[i]
        xe = xt + (s[i + 1] - s[i]) * d
        d1 = (xe - D(xe, i + 1)) / s[i + 1]
        return xt + (s[i + 1] - s[i]) * (d + d1) / 2, d, d1

    for backward in ("euler", "quadratic"):
        z0 = x / a[0]
        z1, _, _ = heun(z0, 0)
        f, d, d1 = heun(z1, 1)
        hb, hf = s[0] - s[1], s[2] - s[1]
        back = z1 + hb * d
        if backward == "quadratic":
            back = back + hb**2 / (2 * hf) * (d1 - d)
        want = (g * (z0 - back) + f) * a[2]
        got = sample(gmm, x, grid, "bdia_edm", gamma=g, backward=backward, final="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_options_are_validated():
    for bad in (-0.1, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="gamma"):
            get_solver("bdia_ddim", gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            get_solver("bdia_edm", gamma=bad)
    with pytest.raises(ValueError, match="backward"):
        get_solver("bdia_edm", backward="heun")
    assert get_solver("bdia_ddim").gamma == 0.5  # the README's sampling default
    assert get_solver("bdia_edm").nfe(7) == 14 and get_solver("bdia_ddim").nfe(7) == 7
    # the first step is the plain sampler's: one step is a valid grid
    assert get_solver("bdia_ddim", gamma=1.0).min_steps == 1


def _fit(steps, errs):
    lx = torch.log(torch.tensor(steps, dtype=F64))
    ly = torch.log(torch.tensor(errs, dtype=F64))
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


@pytest.fixture(scope="module")
def mixture_refs():
    p = vp_linear()
    gmm = _gmm(p)
    x = p.prior_sample((32, 2), torch.Generator().manual_seed(3), dtype=F64)
    refs = {}
    for kind in ("logsnr", "karras"):
        grid = make_grid(p, 8, kind, t_end=0.02)
        refs[kind] = gmm.reference(x, grid[0], grid[-1], final="none")
    return gmm, x, refs


def _errors(mixture_refs, name, steps, **opts):
    gmm, x, refs = mixture_refs
    solver = get_solver(name, **opts)
    kind = solver.natural_grid
    errs = []
    for n in steps:
        grid = make_grid(gmm.process, n, kind, t_end=0.02)
        out = sample(gmm, x, grid, solver, final="none")
        errs.append(float(((out - refs[kind]).norm(dim=1) / refs[kind].norm(dim=1)).mean()))
    return solver, errs


# measured slopes (64-256 steps, this mixture, DOP853 reference): ddim 0.98, heun 2.00,
# bdia_ddim gamma 0.5 -> 1.01, 1.0 -> 2.00; bdia_edm euler 0.1 -> 1.11, quadratic 0.5 -> 2.06;
# a solver that loses an order misses the 0.25 margin by 0.6 or more
@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("bdia_ddim", {}),
        ("bdia_ddim", {"gamma": 1.0}),
        ("bdia_edm", {}),
        ("bdia_edm", {"gamma": 0.5, "backward": "quadratic"}),
    ],
)
def test_convergence_order_on_a_mixture(mixture_refs, name, opts):
    steps = [64, 128, 256]
    solver, errs = _errors(mixture_refs, name, steps, **opts)
    slope = _fit(steps, errs)
    assert abs(slope - solver.order) <= 0.25, (name, opts, slope, errs)


def test_error_constant_of_bdia_ddim():
    """On a uniform grid the two-step recursion has roots 1 and -gamma: its global error is
    (1 - gamma) / (1 + gamma) times DDIM's (a third at gamma = 0.5; measured 0.334 on the
    exact Gaussian flow, 0.334 at 0.5 and 0.111 at 0.8 on this mixture at 256 steps)."""
    p = vp_linear()
    gmm = _gmm(p)
    x = p.prior_sample((32, 2), torch.Generator().manual_seed(4), dtype=F64)
    grid = make_grid(p, 256, "logsnr", t_end=0.02)
    ref = gmm.reference(x, grid[0], grid[-1], final="none")

    def err(name, **o):
        out = sample(gmm, x, grid, name, final="none", **o)
        return float(((out - ref).norm(dim=1) / ref.norm(dim=1)).mean())

    e_ddim = err("ddim")
    for g in (0.5, 0.8):
        ratio = err("bdia_ddim", gamma=g) / e_ddim
        assert abs(ratio - (1 - g) / (1 + g)) < 0.05, (g, ratio)
