"""Time grids: a strictly decreasing float64 tensor ``t[0] > t[1] > ... > t[N]``.

Each builder returns ``N + 1`` times from ``t_start`` (default ``process.t_max``) to
``t_end`` (default ``process.t_min``). The final-step policy is the ``final`` argument of
:func:`diffusolve.sample`: ``"none"`` returns ``x`` at ``t[N]``; ``"denoise"`` (default)
returns the model's x0 estimate at ``t[N]`` (one more model evaluation, counted in the
NFE). To jump to the clean estimate from higher noise, as diffusers' ``final_sigmas_type=
"zero"`` does, end the grid earlier (``t_end``, or drop the last point of a finer grid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Process

__all__ = ["GRIDS", "make_grid", "check_grid"]


def _ends(process: Process, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    ts = process.t_max if t_start is None else float(t_start)
    te = process.t_min if t_end is None else float(t_end)
    if not (process.t_min - 1e-12 <= te < ts <= process.t_max + 1e-12):
        raise ValueError(
            f"grid ends must satisfy t_min <= t_end < t_start <= t_max for {process.name} "
            f"(t_min={process.t_min:g}, t_max={process.t_max:g}); got t_start={ts}, t_end={te}."
        )
    return ts, te


def make_grid(
    process: Process,
    n_steps: int,
    kind: str = "logsnr",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Build a time grid with ``n_steps`` intervals.

    Args:
        process: the noise process.
        n_steps: number of solver steps (intervals), at least 1.
        kind: ``"logsnr"`` (uniform in lambda), ``"time_uniform"``, ``"time_quadratic"``
            (uniform in sqrt(t - t_end), DPM-Solver's choice for high resolution),
            ``"karras"`` (uniform in ``(sigma/alpha)^(1/rho)``, EDM).
        t_start, t_end: override the process's ``t_max`` / ``t_min``.
        rho: the Karras exponent.

    Example:
        >>> from diffusolve.process import ddpm, make_grid
        >>> g = make_grid(ddpm(), 4, "time_uniform")
        >>> g.tolist()
        [999.0, 749.25, 499.5, 249.75, 0.0]
    """
    n = int(n_steps)
    if n < 1:
        raise ValueError(f"n_steps must be at least 1 (got {n_steps}).")
    ts, te = _ends(process, t_start, t_end)
    u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    if kind == "time_uniform":
        grid = ts + (te - ts) * u
    elif kind == "time_quadratic":
        grid = te + (ts - te) * (1 - u) ** 2
    elif kind == "logsnr":
        l0, l1 = process.lam(ts), process.lam(te)
        grid = process.t_of_lambda(l0 + (l1 - l0) * u)
    elif kind == "karras":
        s0 = float(process.sigma_tilde(ts)) ** (1 / rho)
        s1 = float(process.sigma_tilde(te)) ** (1 / rho)
        grid = process.t_of_sigma_tilde((s0 + (s1 - s0) * u) ** rho)
    else:
        raise ValueError(f"unknown grid kind {kind!r}; choose from {sorted(GRIDS)}")
    grid[0], grid[-1] = ts, te  # exact ends despite round-off in the inverse maps
    check_grid(process, grid)
    return grid


GRIDS = ("logsnr", "time_uniform", "time_quadratic", "karras")


def check_grid(process: Process, grid: Tensor) -> Tensor:
    """Validate a user grid: 1-D, at least two points, finite, strictly decreasing, in range."""
    if not isinstance(grid, Tensor):
        grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(
            f"a time grid must be 1-D with at least 2 times (got shape {tuple(grid.shape)})."
        )
    if not torch.all(torch.isfinite(grid)):
        raise ValueError("the time grid contains non-finite values.")
    d = grid[1:] - grid[:-1]
    if not torch.all(d < 0):
        i = int(torch.nonzero(d >= 0)[0])
        raise ValueError(
            f"the time grid must be strictly decreasing (t[0] > t[1] > ...); "
            f"t[{i}]={float(grid[i])} is followed by t[{i + 1}]={float(grid[i + 1])}. "
            "For inversion, use diffusolve.invert, which runs the reversed grid."
        )
    lo, hi = process.t_min, process.t_max
    tol = 1e-9 * max(1.0, abs(hi))
    if float(grid.min()) < lo - tol or float(grid.max()) > hi + tol:
        raise ValueError(
            f"grid times must lie in [t_min, t_max] = [{lo:g}, {hi:g}] of {process.name}; "
            f"got [{float(grid.min()):g}, {float(grid.max()):g}]."
        )
    return grid.to(torch.float64)
