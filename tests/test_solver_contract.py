"""The solver contract, registry-wide: immutable options, honest NFE, pure steps.

Every registered name is checked, so a solver added later is covered without editing this
file.
"""

import copy
import dataclasses
import math

import pytest
import torch

import diffusolve
from diffusolve.models import Gaussian
from diffusolve.process import make_grid, vp_linear
from diffusolve.solvers import ALIASES, BoundModel, StepContext, get_solver, list_solvers
from diffusolve.solvers.endpoint import zero_weights

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
NAMES = list_solvers()


def _prior():
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.5]], dtype=F64)
    return Gaussian(torch.tensor([0.3, -0.2], dtype=F64), cov, process=vp_linear())


def _fixed_noise(shape, *, dtype, device=None):
    """A pure noise source: the same tensor for the same shape."""
    g = torch.Generator().manual_seed(sum(shape) * 7919 + len(shape))
    return torch.randn(shape, generator=g, dtype=F64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip(name):
    s = get_solver(name)
    assert dataclasses.is_dataclass(s)
    assert type(s)(**s.options()) == s
    assert s.replace() == s and s.replace() is not s
    assert s.name == name
    assert eval(repr(s), {type(s).__name__: type(s), "inf": math.inf}) == s
    assert hash(s) == hash(type(s)(**s.options()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.__setattr__(next(iter(s.options())) if s.options() else "x", 1)
    for key, values in s.search_space().items():
        assert key in s.options(), (name, key)
        for v in values:
            assert s.replace(**{key: v}).options()[key] == v
    # capabilities are declared, not written per instance
    assert not set(vars(s)) - set(s.options())


def test_unknown_option_is_a_clear_error():
    with pytest.raises(TypeError, match="its options are"):
        get_solver("dpmpp_2m", orderr=3)
    with pytest.raises(TypeError, match="noise="):
        get_solver("ddpm", generator=torch.Generator())


def test_aliases_resolve_to_registered_solvers():
    assert {"euler_ancestral", "dpmpp_2m_sde", "lms"} <= set(ALIASES)
    for alias, (target, meaning) in ALIASES.items():
        assert target in NAMES and meaning
        assert get_solver(alias) == get_solver(target)


def test_euler_ancestral_alias_is_the_ancestral_step():
    """Euler-ancestral in x / alpha against sigma / alpha (independent formula) equals the
    DDPM ancestral step the alias maps to."""
    prior = _prior()
    p = prior.process
    x = p.prior_sample((6, 2), torch.Generator().manual_seed(0), dtype=F64)
    t, t1 = torch.tensor(0.7, dtype=F64), torch.tensor(0.4, dtype=F64)
    ctx = StepContext(0, 1, "none", _fixed_noise)
    out, _ = get_solver("euler_ancestral").step(BoundModel(prior), x, t, t1, None, ctx)
    a, a1 = float(p.alpha(t)), float(p.alpha(t1))
    s, s1 = float(p.sigma(t)) / a, float(p.sigma(t1)) / a1
    up = math.sqrt(s1**2 * (s**2 - s1**2) / s**2)
    down = math.sqrt(s1**2 - up**2)
    xt = x / a
    d = (xt - prior(x, t)) / s
    ref = (xt + (down - s) * d + up * _fixed_noise((6, 2), dtype=F64)) * a1
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_nfe_matches_the_loop(name):
    """``solver.nfe(n)`` equals the evaluations the loop makes, for n = 1..30."""
    prior = _prior()
    s = get_solver(name)
    x = prior.process.prior_sample((2, 2), torch.Generator().manual_seed(0), dtype=F64)
    for n in range(max(1, s.min_steps), 31):
        for final, extra in (("none", 0), ("denoise", 1), ("zero", 1)):
            if final != "none" and n % 7:
                continue  # the final evaluation is the same for every n
            stats = {}
            diffusolve.sample(prior, x, n, s, final=final, noise=0, stats=stats)
            assert stats["nfe"] == s.nfe(n) + extra, (name, n, final)
        assert diffusolve.steps_for_nfe(s, s.nfe(n) + 1) >= n


def _record_solve(solver, prior, x, grid, noise):
    bound = BoundModel(prior, None, grid)
    state = solver.init(bound, x)
    n = grid.numel() - 1
    rec = []
    for i in range(n):
        ctx = StepContext(i, n, "none", noise)
        before = copy.deepcopy(state)
        x_next, new_state = solver.step(bound, x, grid[i], grid[i + 1], state, ctx)
        rec.append((x, state, before, ctx, x_next))
        x, state = x_next, new_state
    return rec


def _same_state(a, b):
    """Bitwise equality of two states (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same_state(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_step_is_a_pure_function(name):
    """Re-running each step from its recorded ``(x, t, t_next, state, ctx)`` reproduces it
    bitwise, and no step mutates its input state."""
    prior = _prior()
    s = get_solver(name)
    x = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(1), dtype=F64)
    grid = make_grid(prior.process, 8, s.natural_grid)
    for i, (xi, state, before, ctx, x_next) in enumerate(
        _record_solve(s, prior, x, grid, _fixed_noise)
    ):
        assert _same_state(state, before), (name, i, "input state mutated")
        again, _ = s.step(BoundModel(prior, None, grid), xi, grid[i], grid[i + 1], state, ctx)
        assert torch.equal(again, x_next), (name, i)


def test_loop_equals_the_recorded_steps():
    prior = _prior()
    s = get_solver("unipc_bh2_3")
    x = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(1), dtype=F64)
    grid = make_grid(prior.process, 8, "logsnr")
    rec = _record_solve(s, prior, x, grid, None)
    out = diffusolve.sample(prior, x, grid, s, final="none")
    assert torch.equal(out, rec[-1][-1])


def test_int_grid_uses_the_natural_grid():
    prior = _prior()
    x = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(1), dtype=F64)
    for name in ("euler", "deis_tab3", "plms", "dpmpp_2m"):
        kind = get_solver(name).natural_grid
        a = diffusolve.sample(prior, x, 10, name)
        b = diffusolve.sample(prior, x, make_grid(prior.process, 10, kind), name)
        assert torch.equal(a, b), name


def test_x0_transform_is_the_wrapper():
    from diffusolve.models.transforms import Clamp

    prior = Gaussian(
        torch.tensor([3.0, -2.0], dtype=F64), torch.eye(2, dtype=F64), process=vp_linear()
    )
    x = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(1), dtype=F64)
    a = diffusolve.sample(prior, x, 10, "dpmpp_2m", x0_transform=lambda v: v.clamp(-1, 1))
    b = diffusolve.sample(Clamp(prior), x, 10, "dpmpp_2m")
    assert torch.equal(a, b) and float(b.abs().max()) <= 1.0


def test_zero_weights_are_exact_on_the_basis():
    """The endpoint weights reproduce c0 for D = c0 + c2 s^2 + c3 s^3 (independent check)."""
    s = [0.02, 0.05, 0.11]
    w = zero_weights(s)
    for powers in ([0], [2], [3]):
        vals = [sum(v**p for p in powers) for v in s]
        want = 1.0 if powers == [0] else 0.0
        assert abs(sum(a * b for a, b in zip(w, vals, strict=True)) - want) < 1e-12
    assert len(zero_weights([0.3])) == 1 and zero_weights([0.3])[0] == 1.0


def test_zero_endpoint_beats_the_final_denoise():
    """On a Gaussian the sigma -> 0 endpoint of the probability-flow ODE is known in closed
    form; the plain final denoise at t_min misses it by O(s_min^2), the extrapolated
    endpoint is much closer (here t_min is raised so that s_min = 0.1)."""
    from diffusolve.process import Process

    base = vp_linear()
    p = Process(base.alpha, base.sigma, t_min=float(base.t_of_sigma_tilde(0.1)), t_max=base.t_max)
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.2]], dtype=F64)
    prior = Gaussian(mean, cov, process=p)
    x = p.prior_sample((64, 2), torch.Generator().manual_seed(3), dtype=F64)
    # closed form: x~ = x / alpha has covariance C + s^2 I along the flow, so the PF map
    # from s to 0 is x0 = mu + C^{1/2} (C + s^2 I)^{-1/2} (x~ - mu)
    s_max = float(p.sigma_tilde(p.t_max))
    evals, vecs = torch.linalg.eigh(cov)
    mapping = vecs @ torch.diag((evals / (evals + s_max**2)).sqrt()) @ vecs.T
    exact = mean + (x / float(p.alpha(p.t_max)) - mean) @ mapping.T

    def err(final):
        out = diffusolve.sample(prior, x, 200, "dpmpp_3m", final=final)
        return float(((out - exact).norm(dim=1) / exact.norm(dim=1)).mean())

    e_denoise, e_zero = err("denoise"), err("zero")
    assert e_denoise > 1e-3  # the s_min^2 floor is visible
    assert e_zero < e_denoise / 20, (e_zero, e_denoise)
