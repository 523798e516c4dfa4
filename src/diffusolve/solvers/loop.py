"""The one sampling loop: runs any solver over an explicit time grid."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..process import check_grid, make_grid
from .base import BoundModel, Solver, StepContext, get_solver
from .endpoint import extrapolate_to_zero
from .noise import NoiseSource, as_noise_source

__all__ = ["sample", "steps_for_nfe", "grid_for_nfe", "FINALS"]

#: final policies: the x0 estimate at the last grid time, the endpoint at sigma = 0
#: extrapolated from the trajectory (see :mod:`.endpoint`), or the state at the last time
FINALS = ("denoise", "zero", "none")
#: grid-time outputs used by ``final="zero"`` (the last one included)
ZERO_POINTS = 3


def _final_evals(final: str) -> int:
    return 0 if final == "none" else 1


def steps_for_nfe(solver: Solver | str, nfe: int, final: str = "denoise") -> int:
    """The number of grid steps that uses at most ``nfe`` model evaluations.

    Raises a clear error when the budget is below what the solver needs to reach its order.

    Example:
        >>> steps_for_nfe("heun", 11)
        5
    """
    solver = get_solver(solver)
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}, got {final!r}")
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    budget = int(nfe) - _final_evals(final)
    n = 0
    while solver.nfe(n + 1) <= budget:
        n += 1
    if n < max(1, solver.min_steps):
        need = solver.nfe(max(1, solver.min_steps)) + _final_evals(final)
        raise ValueError(
            f"NFE={nfe} is too small for {solver.name} (order {solver.order}, "
            f"{solver.evals_per_step} evaluation(s) per step): it needs at least NFE={need} "
            f"with final={final!r}."
        )
    return n


def grid_for_nfe(
    process, solver: Solver | str, nfe: int, kind: str | None = None, final: str = "denoise", **kw
) -> Tensor:
    """A grid whose solve costs at most ``nfe`` evaluations (``kind``: default the solver's
    natural grid; see :func:`~diffusolve.process.make_grid`)."""
    solver = get_solver(solver)
    return make_grid(process, steps_for_nfe(solver, nfe, final), kind or solver.natural_grid, **kw)


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


class _ZeroRecorder:
    """Keeps the newest output at each grid time (for ``final="zero"``)."""

    def __init__(self, bound: BoundModel, grid: Tensor) -> None:
        self.bound = bound
        self.times = {t: i for i, t in enumerate(grid.tolist())}
        self.outputs: dict[int, Tensor] = {}
        inner = bound.model

        def call(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            out = inner(x, t, cond)
            if t.ndim == 0:
                i = self.times.get(float(t))
                if i is not None:
                    self.outputs[i] = out
            return out

        call.process = inner.process  # type: ignore[attr-defined]
        bound.model = call

    def endpoint(self, n: int) -> Tensor:
        idx = [i for i in range(n, max(-1, n - ZERO_POINTS), -1) if i in self.outputs]
        # the last output must be the one at the last grid time
        s = [math.exp(-self.bound.scalars(self._time(i))[2]) for i in idx]
        return extrapolate_to_zero(s, [self.outputs[i].to(self.outputs[n].dtype) for i in idx])

    def _time(self, i: int) -> float:
        for t, j in self.times.items():
            if j == i:
                return t
        raise KeyError(i)


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
    grid_kind: str | None = None,
    x0_transform: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    compile: bool | dict[str, Any] = False,
    **solver_options: Any,
) -> Tensor:
    """Integrate from ``grid[0]`` to ``grid[-1]`` with ``solver`` and return the result.

    Args:
        model: a :class:`~diffusolve.models.Denoiser` (``model(x, t, cond) -> x0``).
        x: the starting state at ``grid[0]`` (e.g. ``model.process.prior_sample(shape)``).
            It is not modified.
        grid: decreasing float64 times, or an int number of steps for a ``grid_kind``
            grid from ``t_max`` to ``t_min``.
        solver: a registry name or alias (see ``diffusolve solvers``) or a solver object.
        cond: passed to every model call.
        final: ``"denoise"`` returns the x0 estimate at ``grid[-1]`` (one more model
            evaluation, through ``solver.finish``: the plain estimate for every solver but
            one whose result combines all its outputs, ``ns``); ``"zero"`` returns the endpoint at sigma = 0, extrapolated from the
            denoiser's outputs at the last grid times (same cost; see
            :mod:`diffusolve.solvers.endpoint`); ``"none"`` returns ``x`` at ``grid[-1]``.
        noise: for stochastic solvers: an int seed (per-sample seeds ``seed + i``), a list
            of per-sample seeds, a ``torch.Generator`` or a noise source.
        dtype: compute dtype (e.g. ``torch.float64`` for references); default ``x.dtype``.
        grid_kind: the kind of grid built when ``grid`` is an int; default the solver's
            natural grid (``solver.natural_grid``), as on the command line.
        x0_transform: applied to every x0 estimate (sugar for wrapping the model in
            :class:`~diffusolve.models.transforms.MapX0`).
        callback: called after every step with a dict (``i``, ``t``, ``t_next``, ``x``,
            ``x_next``, ``nfe``).
        progress: show a tqdm bar with the NFE count (default: when stderr is a terminal).
        stats: if given, filled with ``nfe``, ``n_steps`` and ``solver``.
        compile: run the model's networks through ``torch.compile`` (a dict: its options,
            e.g. ``{"mode": "max-autotune"}``); the solver loop stays Python. The compiled
            network is cached per module, so only the first call (and each new batch
            shape) pays the compilation; without a working compiler a warning says so and
            the network runs eagerly (:func:`diffusolve.models.precision.compile_network`).
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
    if "generator" in solver_options:
        raise TypeError(
            "sample() takes no generator=; pass noise=generator (or noise=SEED for "
            "per-sample seeds, or a list of seeds)"
        )
    process = model.process
    solver = get_solver(solver, **solver_options)
    if isinstance(grid, bool) or not isinstance(grid, (int, Tensor, Sequence)):
        raise TypeError(f"grid must be an int number of steps or a tensor of times, got {grid!r}")
    if isinstance(grid, int):
        grid = make_grid(process, grid, grid_kind or solver.natural_grid)
    grid = check_grid(process, grid)
    n_steps = grid.numel() - 1
    if n_steps < solver.min_steps:
        raise ValueError(
            f"{solver.name} has order {solver.order} and needs at least {solver.min_steps} "
            f"steps to reach it; the grid has {n_steps}. Use more steps or a lower order."
        )
    if dtype is not None:
        x = x.to(dtype)
    if compile:
        from ..models.precision import compile_network

        model = compile_network(model, **(compile if isinstance(compile, dict) else {}))
    if x0_transform is not None:
        from ..models.transforms import MapX0

        model = MapX0(model, x0_transform)
    bound = BoundModel(model, cond, grid)
    recorder = _ZeroRecorder(bound, grid) if final == "zero" else None
    state = solver.init(bound, x)
    source = as_noise_source(noise, x.shape[0]) if solver.stochastic else None
    bar = None
    if _show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, desc=solver.name, unit="step", leave=False)
    times = grid.unbind()
    try:
        for i in range(n_steps):
            t, t_next = times[i], times[i + 1]
            ctx = StepContext(i, n_steps, final, source)
            x_next, state = solver.step(bound, x, t, t_next, state, ctx)
            if callback is not None:
                callback(
                    {"i": i, "t": t, "t_next": t_next, "x": x, "x_next": x_next, "nfe": bound.nfe}
                )
            x = x_next
            if bar is not None:
                bar.set_postfix(nfe=bound.nfe)
                bar.update(1)
        if final == "denoise":
            x = solver.finish(bound, x, times[-1], state)
        elif final == "zero":
            x = bound(x, times[-1])
            x = recorder.endpoint(n_steps)  # type: ignore[union-attr]
        if not torch.isfinite(x).all():
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
