"""Sample metrics: sliced Wasserstein, its noise floor and the relative error."""

from __future__ import annotations

import pytest
import torch

from diffusolve.metrics import rel_error, sliced_wasserstein, sw_noise_floor

pytestmark = pytest.mark.usefixtures("single_thread")


def _x(n: int = 2000, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sw_zero_for_identical_and_grows_with_shift() -> None:
    x = _x()
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(x.shape[0])]) < 1e-12  # order-free
    shifts = [0.1, 0.5, 2.0]
    vals = [sliced_wasserstein(x, x + c) for c in shifts]
    assert vals[0] < vals[1] < vals[2]
    # a translation by c (1, ..., 1) gives SW_2 = c sqrt(mean_theta (sum_i theta_i)^2) ~ c
    for c, v in zip(shifts, vals, strict=True):
        assert v == pytest.approx(c, rel=0.15)


def test_sw_fixed_projections_and_flattening() -> None:
    x, y = _x(500, 4, 0), _x(500, 4, 1) + 0.3
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)
    assert sliced_wasserstein(x, y, seed=3) != sliced_wasserstein(x, y, seed=4)
    v = sliced_wasserstein(x.reshape(500, 2, 2), y.reshape(500, 2, 2).float(), seed=3)
    assert v == pytest.approx(sliced_wasserstein(x, y, seed=3), rel=1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        sliced_wasserstein(x, y[:, :3])


def test_sw_noise_floor_positive_and_shrinks() -> None:
    def sample(n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 8, generator=g, dtype=torch.float64)

    small = sw_noise_floor(sample, 100, repeats=3)
    large = sw_noise_floor(sample, 2000, repeats=3)
    for floor in (small, large):
        vals = torch.tensor(floor["values"], dtype=torch.float64)
        assert floor["mean"] == pytest.approx(float(vals.mean()), rel=1e-12)
        assert floor["std"] == pytest.approx(float(vals.std(correction=1)), rel=1e-12)
        assert 0 < floor["std"] < floor["mean"]  # independent repeats differ, around the mean
    assert sw_noise_floor(sample, 100, repeats=1)["std"] == 0.0
    assert small["values"] != large["values"][:3]
    assert large["mean"] < 0.5 * small["mean"]  # ~ 1 / sqrt(n)
    assert large["mean"] < 0.1
    assert len(large["values"]) == 3 and large["n"] == 2000
    # a real difference (a shift of 0.3) stands far above the floor at n = 2000
    g = torch.Generator().manual_seed(99)
    assert sliced_wasserstein(sample(2000, g), sample(2000, g) + 0.3) > 3 * large["mean"]


def test_rel_error() -> None:
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x = torch.tensor([[3.0, 4.5], [1.0, 0.0]])
    assert rel_error(x, ref) == pytest.approx(0.05)
    assert rel_error(x, ref, "max") == pytest.approx(0.1)
    torch.testing.assert_close(
        rel_error(x, ref, "none"), torch.tensor([0.1, 0.0], dtype=torch.float64)
    )
    assert rel_error(ref, ref) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        rel_error(x, ref[:1])
    with pytest.raises(ValueError, match="reduction"):
        rel_error(x, ref, "sum")


def test_frechet_target_is_the_frechet_distance_and_differentiable():
    """FrechetTarget's torch expression equals the scipy Frechet distance of the same sets
    and autograd's gradient matches finite differences (gradcheck, float64)."""
    from diffusolve.metrics import FrechetTarget, frechet_distance

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64)
    ref = torch.randn(500, 5, generator=g, dtype=torch.float64) @ mix
    target = FrechetTarget(ref)
    for shift in (0.0, 0.7):
        f = torch.randn(300, 5, generator=g, dtype=torch.float64) @ (0.5 * mix) + shift
        assert float(target(f)) == pytest.approx(frechet_distance(f, ref), rel=1e-9, abs=1e-9)
    assert float(target(ref)) == pytest.approx(0.0, abs=1e-8)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(target, (x,))
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        target(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        target(torch.zeros(1, 5, dtype=torch.float64))
