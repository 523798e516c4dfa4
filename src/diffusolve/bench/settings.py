"""The settings search: which settings a method is tried with, and how the winner is chosen.

Both libraries get the same latitude. Each setting of a method is tried at the NFE budget
on the first ``n_select`` samples (a ``select`` record each); the setting with the lowest
finite mean relative error wins (ties: the first tried) and is re-run on all samples (the
``final`` record).

Our side: the grid kind (the solver's ``natural_grid`` first, then the other grid kinds) and
where the grid ends (:data:`ENDS`) are bench settings; every other option comes from what
the solver declares worth searching, ``solver.search_space()`` (option name -> candidate
values). No solver is named here. Diffusers' side: :func:`.diffusers_runner.settings_for`.

Example:
    >>> from diffusolve.bench.settings import our_settings
    >>> our_settings("ddim", quick=True)[:2]
    [{'grid': 'logsnr', 'end': 't_min'}, {'grid': 'time_uniform', 'end': 't_min'}]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..process import GRIDS, make_grid
from ..solvers import get_solver, sample, steps_for_nfe

__all__ = [
    "ENDS",
    "search_space",
    "our_settings",
    "our_grid",
    "run_ours",
    "pick_winner",
]

#: where our grid ends before the final denoise: at t_min, or "early" -- at the
#: second-to-last point of a grid with one more interval, i.e. the final denoise jumps from
#: there to the clean estimate exactly as diffusers' final_sigmas_type="zero" (and EDM's
#: last Euler step to sigma = 0) do
ENDS = ("t_min", "early", "zero")
#: ``end="zero"``: the grid ends at t_min like ``"t_min"``, and the final evaluation returns
#: the sigma -> 0 endpoint extrapolated from the trajectory (``sample(final="zero")``)
#: bench-level keys of our settings (not solver options)
BENCH_KEYS = ("grid", "end")


def search_space(solver: Any) -> dict[str, tuple[Any, ...]]:
    """The options of ``solver`` worth searching, as the solver declares them.

    ``solver.search_space()`` where the solver has it; otherwise the rule the bench used
    before solvers declared it: ``lower_order_final`` in ``(True, "grid", False)`` when
    the solver has that option.
    """
    declared = getattr(solver, "search_space", None)
    if callable(declared):
        return {k: tuple(v) for k, v in dict(declared()).items()}
    if "lower_order_final" in solver.options():
        return {"lower_order_final": (True, "grid", False)}
    return {}


def our_settings(name: str, quick: bool = False) -> list[dict[str, Any]]:
    """Ends x grid kinds (natural first) x the solver's declared search space.

    With ``quick`` only the natural grid, the next kind and ``logsnr`` are tried.
    """
    solver = get_solver(name)
    kinds = [solver.natural_grid] + [k for k in GRIDS if k != solver.natural_grid]
    if quick:
        kinds = kinds[:2] + (["logsnr"] if "logsnr" not in kinds[:2] else [])
    space = search_space(solver)
    keys = list(space)
    combos = list(itertools.product(*space.values())) if keys else [()]
    out = []
    for end in ENDS:
        for k in kinds:
            for vals in combos:
                st: dict[str, Any] = {"grid": k, "end": end}
                st.update(zip(keys, vals, strict=True))
                out.append(st)
    return out


def our_grid(process: Any, n_steps: int, kind: str, end: str = "t_min") -> Tensor:
    """The grid of ``n_steps`` steps for a bench setting (see :data:`ENDS`)."""
    if end in ("t_min", "zero"):
        return make_grid(process, n_steps, kind)
    if end == "early":
        return make_grid(process, n_steps + 1, kind)[:-1]
    raise ValueError(f"unknown grid end {end!r}; choose from {ENDS}")


def run_ours(
    model: Any, x_T: Tensor, name: str, setting: dict[str, Any], nfe: int
) -> dict[str, Any]:
    """Run one of our solvers with one setting at an NFE budget from ``x_T``.

    Returns ``dict(x, nfe_used, steps, notes)`` like :func:`.diffusers_runner.run_scheduler`.
    """
    opts = {k: v for k, v in setting.items() if k not in BENCH_KEYS}
    solver = get_solver(name, **opts)
    n = steps_for_nfe(solver, nfe, "denoise")
    grid = our_grid(model.process, n, setting["grid"], setting.get("end", "t_min"))
    stats: dict[str, Any] = {}
    final = "zero" if setting.get("end") == "zero" else "denoise"
    x = sample(
        model, x_T, grid, solver, final=final, dtype=torch.float64, stats=stats, progress=False
    )
    return {"x": x, "nfe_used": stats["nfe"], "steps": n, "notes": []}


def pick_winner(trials: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial record with the lowest finite ``rel_error`` (the first on ties), or None."""
    best, best_err = None, math.inf
    for r in trials:
        err = r.get("rel_error")
        if err is not None and math.isfinite(err) and err < best_err:
            best, best_err = r, err
    return best
