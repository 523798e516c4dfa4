"""The stochastic sampling paths under test, read from the registry.

A *path* is a solver name with options that make it draw noise: every registered solver
whose ``.stochastic`` is true (with its preset), every alias that resolves to one, and the
declared stochastic options of deterministic solvers (:data:`STOCHASTIC_OPTIONS`). A newly
registered stochastic solver joins every registry-driven test automatically; the tests
then ask for its weak order in :data:`WEAK_ORDER_GAUSSIAN` (or its membership of
:data:`CONSISTENCY`), so its convergence is stated, not assumed.
"""

from __future__ import annotations

from typing import Any

import diffusolve.solvers.base as _base
from diffusolve.solvers import get_solver, list_solvers

#: stochastic options of deterministic solvers (name, options); each must make the solver
#: stochastic. eta: DDIM's noise fraction (1 is DDPM, above 1 extra Langevin-like noise);
#: s_churn / s_tmin / s_tmax / s_noise: EDM's churn (Karras et al. 2022, Algorithm 2),
#: here with a window that excludes the highest and lowest noise levels.
STOCHASTIC_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("ddim", {"eta": 0.5}),
    ("ddim", {"eta": 1.5}),
    ("euler", {"s_churn": 10.0}),
    ("heun", {"s_churn": 10.0}),
    ("euler", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ("dpmpp_2s_ancestral", {"eta": 0.5}),
]

#: weak order of each registry name's stochastic path on a Gaussian prior, measured as the
#: slope of the exact W2 distance to the target against NFE (128-512 steps):
#: DDPM / DDIM-eta / Euler-churn 0.93-1.00, Heun-churn 1.93-2.00 (churn adds noise exactly,
#: the ODE step is Heun's), SDE-DPM-Solver++(2M) 1.99-2.00 (linear drift and additive noise
#: on a Gaussian prior; weak order 1 is all one expects for a general denoiser),
#: DPM-Solver++(2S) ancestral 1.97-1.99 at eta = 1, 1.96-1.98 at eta = 0.5 (same reason),
#: the stochastic-interpolant SDE (default sbdm eps = 1, Euler drift) 0.96-1.00.
WEAK_ORDER_GAUSSIAN: dict[str, int] = {
    "ddpm": 1,
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "sde_dpmpp_2m": 2,
    "dpmpp_2s_ancestral": 2,
    "si_sde": 1,
}

#: samplers that are exact at any number of steps when the model is a consistency function
#: (the exact probability-flow map to the data), and do not converge to the data
#: distribution with a plain denoiser (they forget x_t except through x0).
CONSISTENCY: set[str] = {"lcm"}


def _label(name: str, options: dict[str, Any]) -> str:
    return name + "".join(f"-{k}={v:g}" for k, v in options.items())


def stochastic_paths() -> list[tuple[str, dict[str, Any]]]:
    """Every stochastic path: registered stochastic names and the declared options.

    Aliases are other names of registered solvers (see :func:`stochastic_aliases`); they
    build the same solver, so they are checked to resolve to a covered path, not re-run."""
    paths: list[tuple[str, dict[str, Any]]] = []
    for name in list_solvers():
        if get_solver(name).stochastic:
            paths.append((name, {}))
    paths += [(n, dict(o)) for n, o in STOCHASTIC_OPTIONS]
    return paths


def stochastic_aliases() -> list[str]:
    """Aliases (other libraries' names) that build a stochastic solver."""
    return [a for a in sorted(getattr(_base, "ALIASES", {})) if get_solver(a).stochastic]


def path_ids(paths: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [_label(n, o) for n, o in paths]


def registry_name(name: str, options: dict[str, Any]) -> str:
    """The registry name of the solver the path builds (aliases resolved, presets matched)."""
    return get_solver(name, **options).name


def weak_order(name: str, options: dict[str, Any]) -> int:
    key = registry_name(name, options)
    if key not in WEAK_ORDER_GAUSSIAN:
        raise AssertionError(
            f"stochastic path {_label(name, options)} ({key}) has no declared weak order: "
            "measure it (tests/test_stochastic_exact.py prints the fitted slope) and add it "
            "to WEAK_ORDER_GAUSSIAN in tests/_stochastic.py, or to CONSISTENCY"
        )
    return WEAK_ORDER_GAUSSIAN[key]
