"""The one sampling loop: runs any solver over an explicit time grid."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..process import check_grid, make_grid
from .base import BoundModel, Solver, get_solver
from .noise import NoiseSource, as_noise_source

__all__ = ["sample", "steps_for_nfe", "grid_for_nfe"]

FINALS = ("denoise", "none")


def steps_for_nfe(solver: Solver | str, nfe: int, final: str = "denoise") -> int:
    """The number of grid steps that uses at most ``nfe`` model evaluations.

    Raises a clear error when the budget is below what the solver needs to reach its order.
    """
    solver = get_solver(solver)
    budget = int(nfe) - (1 if final == "denoise" else 0)
    n = 0
    while solver.nfe(n + 1) <= budget:
        n += 1
    if n < max(1, solver.min_steps):
        need = solver.nfe(max(1, solver.min_steps)) + (1 if final == "denoise" else 0)
        raise ValueError(
            f"NFE={nfe} is too small for {solver.name} (order {solver.order}, "
            f"{solver.evals_per_step} evaluation(s) per step): it needs at least NFE={need} "
            f"with final={final!r}."
        )
    return n


def grid_for_nfe(
    process, solver: Solver | str, nfe: int, kind: str = "logsnr", final: str = "denoise", **kw
) -> Tensor:
    """A grid of ``kind`` whose solve costs at most ``nfe`` evaluations (see :func:`make_grid`)."""
    return make_grid(process, steps_for_nfe(solver, nfe, final), kind, **kw)


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def sample(
    model: Any,
    x: Tensor,
    grid: Tensor | int,
    solver: Solver | str = "dpmpp_2m",
    *,
    cond: Any = None,
    final: str = "denoise",
    noise: NoiseSource | torch.Generator | Sequence[int] | int | None = None,
    dtype: torch.dtype | None = None,
    grid_kind: str = "logsnr",
    x0_transform: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    **solver_options: Any,
) -> Tensor:
    """Integrate from ``grid[0]`` to ``grid[-1]`` with ``solver`` and return the result.

    Args:
        model: a :class:`~diffusolve.models.Denoiser` (``model(x, t, cond) -> x0``).
        x: the starting state at ``grid[0]`` (e.g. ``model.process.prior_sample(shape)``).
            It is not modified.
        grid: decreasing float64 times, or an int number of steps for a ``grid_kind``
            grid from ``t_max`` to ``t_min``.
        solver: a registry name (see :func:`diffusolve.solvers.list_solvers`) or a solver.
        cond: passed to every model call.
        final: ``"denoise"`` returns the x0 estimate at ``grid[-1]`` (one more model
            evaluation); ``"none"`` returns ``x`` at ``grid[-1]``.
        noise: for stochastic solvers: an int seed (per-sample seeds ``seed + i``), a list
            of per-sample seeds, a ``torch.Generator`` or a noise source.
        dtype: compute dtype (e.g. ``torch.float64`` for references); default ``x.dtype``.
        x0_transform: applied to every x0 estimate (e.g. a clamp).
        callback: called after every step with a dict (``i``, ``t``, ``t_next``, ``x``,
            ``x_next``, ``nfe``).
        progress: show a tqdm bar with the NFE count (default: when stderr is a terminal).
        stats: if given, filled with ``nfe``, ``n_steps`` and ``solver``.
        **solver_options: options for a solver given by name.

    Example:
        >>> import torch
        >>> from diffusolve import sample
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=vp_linear())
        >>> xT = prior.process.prior_sample((4, 2), torch.Generator().manual_seed(0))
        >>> sample(prior, xT, 10, "dpmpp_2m").shape
        torch.Size([4, 2])
    """
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}, got {final!r}")
    if not isinstance(x, Tensor):
        raise TypeError("x must be a torch.Tensor")
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension")
    process = model.process
    solver = get_solver(solver, **solver_options)
    if isinstance(grid, int):
        grid = make_grid(process, grid, grid_kind)
    grid = check_grid(process, grid)
    n_steps = grid.numel() - 1
    if n_steps < solver.min_steps:
        raise ValueError(
            f"{solver.name} has order {solver.order} and needs at least {solver.min_steps} "
            f"steps to reach it; the grid has {n_steps}. Use more steps or a lower order."
        )
    if dtype is not None:
        x = x.to(dtype)
    bound = BoundModel(model, cond, x0_transform, grid)
    state = solver.init(bound, x, grid)
    state["n"] = n_steps
    state["final"] = final
    if solver.stochastic:
        state["noise"] = as_noise_source(noise, x.shape[0])
    bar = None
    if _show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, desc=solver.name, unit="step", leave=False)
    try:
        for i in range(n_steps):
            state["i"] = i
            t, t_next = grid[i], grid[i + 1]
            x_next, state = solver.step(bound, x, t, t_next, state)
            if callback is not None:
                callback(
                    {"i": i, "t": t, "t_next": t_next, "x": x, "x_next": x_next, "nfe": bound.nfe}
                )
            x = x_next
            if bar is not None:
                bar.set_postfix(nfe=bound.nfe)
                bar.update(1)
        if final == "denoise":
            x = bound(x, grid[-1])
        if not torch.all(torch.isfinite(x)):
            raise FloatingPointError(
                f"{solver.name} produced non-finite values (model outputs were finite); "
                "try dtype=torch.float64, more steps or a lower-order solver."
            )
    finally:
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(nfe=bound.nfe, n_steps=n_steps, solver=solver.name)
    return x
