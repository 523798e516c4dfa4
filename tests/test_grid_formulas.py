"""Time grids against their defining formulas (hand-computed, per grid kind and process).

``make_grid(process, n, kind)`` returns ``n + 1`` decreasing times from ``t_max`` to
``t_min`` (or the given ends) that are equally spaced in one transformed coordinate:

* ``logsnr``: ``lambda(t) = log(alpha / sigma)``;
* ``time_uniform``: ``t``;
* ``time_quadratic``: ``sqrt(t - t_end)`` (DPM-Solver's quadratic time steps);
* ``karras``: ``(sigma / alpha)^(1 / rho)`` (EDM, rho = 7 by default).

The coordinates are computed here from ``alpha`` and ``sigma`` by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusolve.process import get_process, make_grid

pytestmark = pytest.mark.usefixtures("single_thread")

PROCESSES = ["ddpm-linear", "vp-cosine", "edm", "rectified-flow", "ve"]


def _coordinate(p, kind, t, t_end, rho=7.0):
    a, s = float(p.alpha(t)), float(p.sigma(t))
    if kind == "logsnr":
        return math.log(a / s)
    if kind == "time_uniform":
        return float(t)
    if kind == "time_quadratic":
        return math.sqrt(max(float(t) - t_end, 0.0))
    if kind == "karras":
        return (s / a) ** (1.0 / rho)
    raise AssertionError(kind)


@pytest.mark.parametrize("process_name", PROCESSES)
@pytest.mark.parametrize("kind", ["logsnr", "time_uniform", "time_quadratic", "karras"])
def test_grid_is_uniform_in_its_coordinate(process_name, kind):
    p = get_process(process_name)
    for n in (7, 12):
        grid = make_grid(p, n, kind)
        assert grid.shape == (n + 1,) and grid.dtype == torch.float64
        assert float(grid[0]) == p.t_max and float(grid[-1]) == p.t_min
        c = [_coordinate(p, kind, t, p.t_min) for t in grid]
        step = (c[-1] - c[0]) / n
        for i, v in enumerate(c):
            assert v == pytest.approx(c[0] + i * step, rel=1e-7, abs=1e-9 * abs(c[0])), (i, c)


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_karras_rho_and_custom_ends(rho):
    p = get_process("edm")  # sigma / alpha = t: the grid is the EDM formula itself
    grid = make_grid(p, 10, "karras", rho=rho, t_start=40.0, t_end=0.01)
    i = torch.arange(11, dtype=torch.float64)
    want = (40.0 ** (1 / rho) + i / 10 * (0.01 ** (1 / rho) - 40.0 ** (1 / rho))) ** rho
    torch.testing.assert_close(grid, want, rtol=1e-12, atol=1e-12)


def test_time_quadratic_formula_with_custom_ends():
    p = get_process("vp-linear")
    grid = make_grid(p, 8, "time_quadratic", t_start=0.9, t_end=0.05)
    u = torch.arange(9, dtype=torch.float64) / 8
    torch.testing.assert_close(grid, 0.05 + 0.85 * (1 - u) ** 2, rtol=1e-12, atol=1e-12)
