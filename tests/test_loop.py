"""The shared sampling loop: NFE counting, final policy, errors, determinism."""

import pytest
import torch

import diffusolve
from diffusolve import sample, steps_for_nfe
from diffusolve.models import Gaussian, from_callable
from diffusolve.process import ddpm, edm, make_grid, vp_linear

pytestmark = pytest.mark.usefixtures("single_thread")


def _prior(process=None):
    return Gaussian(
        torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]), process=process or vp_linear()
    )


def test_nfe_counting_and_final_policy():
    prior = _prior()
    xT = prior.process.prior_sample((8, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = make_grid(prior.process, 6)
    st = {}
    out = sample(prior, xT, grid, "heun", stats=st)
    assert st["nfe"] == 2 * 6 + 1 and st["n_steps"] == 6
    st2 = {}
    xe = sample(prior, xT, grid, "heun", final="none", stats=st2)
    assert st2["nfe"] == 12
    assert torch.allclose(out, prior(xe, grid[-1]))


def test_steps_for_nfe():
    assert steps_for_nfe("ddim", 10) == 9
    assert steps_for_nfe("heun", 10) == 4
    assert steps_for_nfe("heun", 10, final="none") == 5
    with pytest.raises(ValueError, match="too small"):
        steps_for_nfe("heun", 2)


def test_input_not_mutated_and_dtype():
    prior = _prior()
    xT = torch.randn(4, 2)
    before = xT.clone()
    out = sample(prior, xT, 5, "ddim", dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(xT, before)


def test_integer_grid_uses_logsnr_grid():
    prior = _prior(ddpm())
    xT = torch.randn(3, 2, dtype=torch.float64)
    a = sample(prior, xT, 7, "ddim")
    b = sample(prior, xT, make_grid(prior.process, 7, "logsnr"), "ddim")
    assert torch.equal(a, b)


def test_callback_sees_every_step():
    prior = _prior()
    seen = []
    sample(prior, torch.randn(2, 2), 4, "euler", callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2, 3]


def test_errors_are_clear():
    prior = _prior()
    with pytest.raises(ValueError, match="unknown solver"):
        sample(prior, torch.randn(2, 2), 4, "nope")
    with pytest.raises(ValueError, match="expected samples of shape"):
        sample(prior, torch.randn(2, 3), 4, "ddim")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(prior, torch.randn(2, 2), torch.tensor([0.5, 0.8, 0.1], dtype=torch.float64), "ddim")
    with pytest.raises(ValueError, match="final"):
        sample(prior, torch.randn(2, 2), 4, "ddim", final="clean")

    def bad(x, t):
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite"):
        sample(from_callable(bad, edm(), "x0"), torch.randn(2, 2), 3, "ddim")

    def wrong_shape(x, t):
        return x[:, :1]

    with pytest.raises(ValueError, match="shape"):
        sample(from_callable(wrong_shape, edm(), "epsilon"), torch.randn(2, 2), 3, "ddim")


def test_multistep_needs_enough_steps():
    solvers = [n for n in diffusolve.list_solvers() if diffusolve.get_solver(n).min_steps > 1]
    prior = _prior()
    for name in solvers:
        s = diffusolve.get_solver(name)
        with pytest.raises(ValueError, match="needs at least"):
            sample(prior, torch.randn(2, 2), s.min_steps - 1, name)


def test_stochastic_seeding_is_per_sample():
    prior = _prior()
    xT = torch.randn(5, 2, dtype=torch.float64)
    for name in diffusolve.list_solvers():
        if not diffusolve.get_solver(name).stochastic:
            continue
        full = sample(prior, xT, 6, name, noise=100)
        one = sample(prior, xT[3:4], 6, name, noise=[103])
        assert torch.allclose(full[3:4], one, atol=1e-12), name
        again = sample(prior, xT, 6, name, noise=100)
        assert torch.equal(full, again), name


def test_final_order_cap_follows_diffusers_rule():
    from diffusolve.solvers.base import StepContext
    from diffusolve.solvers.multistep import check_lower_order_final, final_order_cap

    caps = lambda mode, final: [  # noqa: E731
        final_order_cap(StepContext(i, 5, final), mode) for i in range(5)
    ]
    # the final denoise is diffusers' step to sigma = 0: it counts as the last step
    assert caps(True, "denoise") == [6, 5, 4, 3, 2]
    assert caps(True, "none") == [5, 4, 3, 2, 1]
    assert caps("grid", "denoise") == [5, 4, 3, 2, 1]
    assert min(caps(False, "none")) > 100
    assert caps(True, "zero") == caps(True, "denoise")  # the endpoint also evaluates once more
    assert final_order_cap(StepContext(0, 20, "none")) > 100  # >= 15 steps: no cap
    with pytest.raises(ValueError, match="lower_order_final"):
        check_lower_order_final("yes")
