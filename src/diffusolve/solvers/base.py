"""Solver base class, registry and the model wrapper every solver calls.

A solver is a small object with ``init(model, x, grid) -> state`` and
``step(model, x, t, t_next, state) -> (x_next, state)``. ``model`` is a
:class:`BoundModel`: ``model(x, t) -> x0_hat`` with the condition bound, evaluations
counted and outputs checked; ``model.process`` gives ``alpha``, ``sigma`` and ``lambda``.
Multistep history lives in ``state`` (a dict); the loop sets ``state["i"]`` (the index of
the current step), ``state["n"]`` (the number of steps) and ``state["final"]`` (the final
policy) before each step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..process import Process, as_time
from ..process.param import coef, eps_from_x0

__all__ = [
    "Solver",
    "BoundModel",
    "GridProcess",
    "REGISTRY",
    "register",
    "get_solver",
    "list_solvers",
    "coef",
]


class GridProcess:
    """A process view that serves ``alpha``, ``sigma``, ``lam`` at the grid times from a table.

    The loop evaluates these once per grid (vectorised) instead of once per use; any other
    time falls through to the wrapped process. Everything else is delegated.
    """

    def __init__(self, process: Process, grid: Tensor | None) -> None:
        self._p = process
        self._table: dict[float, tuple[Tensor, Tensor, Tensor]] = {}
        if grid is not None:
            a, s, lam = process.alpha(grid), process.sigma(grid), process.lam(grid)
            for i, t in enumerate(grid.tolist()):
                self._table[t] = (a[i], s[i], lam[i])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)

    def _get(self, t: Tensor | float, k: int, fn: Any) -> Tensor:
        if isinstance(t, Tensor) and t.ndim == 0 or isinstance(t, float):
            hit = self._table.get(float(t))
            if hit is not None:
                return hit[k]
        return fn(t)

    def alpha(self, t: Tensor | float) -> Tensor:
        return self._get(t, 0, self._p.alpha)

    def sigma(self, t: Tensor | float) -> Tensor:
        return self._get(t, 1, self._p.sigma)

    def lam(self, t: Tensor | float) -> Tensor:
        return self._get(t, 2, self._p.lam)

    def sigma_tilde(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self.lam(t))


class BoundModel:
    """``model(x, t) -> x0`` with ``cond`` bound, NFE counting and output checks.

    ``model.process`` is a :class:`GridProcess` over the grid being solved.
    """

    def __init__(
        self, model: Any, cond: Any = None, x0_transform: Any = None, grid: Tensor | None = None
    ) -> None:
        self.model = model
        self.process: Process = GridProcess(model.process, grid)  # type: ignore[assignment]
        self.cond = cond
        self.nfe = 0
        self.x0_transform = x0_transform

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t)
        out = self.model(x, t, self.cond)
        self.nfe += 1
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(x.shape)}; check the data shape you sample."
            )
        if not torch.all(torch.isfinite(out)):
            raise FloatingPointError(
                f"the model returned non-finite values at t={float(t.flatten()[0]):.6g} "
                f"(evaluation {self.nfe}); try float64 (dtype=torch.float64), a grid that "
                "stays inside the model's trained range, or a lower-order solver."
            )
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.x0_transform is not None:
            out = self.x0_transform(out)
        return out

    def eps(self, x: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
        """The epsilon prediction implied by an x0 estimate at ``(x, t)``."""
        t = as_time(t)
        return eps_from_x0(x, x0, self.process.alpha(t), self.process.sigma(t))


#: diffusers applies ``lower_order_final`` only on grids with fewer steps than this
LOWER_ORDER_FINAL_BELOW = 15


LOWER_ORDER_FINAL = (False, True, "grid")


def check_lower_order_final(value: bool | str) -> bool | str:
    """Validate a ``lower_order_final`` option (``False``, ``True`` or ``"grid"``)."""
    if value not in LOWER_ORDER_FINAL or (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"lower_order_final must be one of {LOWER_ORDER_FINAL}, got {value!r}")
    return value


def final_order_cap(state: dict[str, Any], mode: bool | str = True) -> int:
    """The largest order ``lower_order_final=mode`` allows at the current step.

    diffusers' rule: on a schedule of fewer than 15 steps, step ``i`` uses at most the
    number of steps left (``n - i``), so the last step is first order and the one before at
    most second order. With ``mode=True`` and ``final="denoise"`` our final denoise is the
    step diffusers takes to sigma = 0 (``final_sigmas_type="zero"``), so it counts as the
    last step and the last grid step may use order 2. ``mode="grid"`` counts grid steps
    only (the last grid step is first order whatever the final policy). ``False``: no cap.
    Returns a large number when no cap applies.
    """
    if not mode:
        return 1 << 30
    extra = 1 if (mode is True and state.get("final") == "denoise") else 0
    n = int(state.get("n", 1 << 30)) + extra
    if n >= LOWER_ORDER_FINAL_BELOW:
        return 1 << 30
    return max(1, n - int(state.get("i", 0)))


class Solver:
    """Base class. Subclasses set the class variables and implement :meth:`step`.

    Class variables:
        name: registry name.
        order: theoretical global convergence order of the deterministic ODE solve.
        evals_per_step: model evaluations per step (for NFE budgets).
        stochastic: whether the step draws noise (from ``state["noise"]``).
        multistep: whether the solver keeps a history of model outputs.
        citation: the paper.
        prediction: what the update is written in (``"data"`` or ``"noise"``).
        natural_grid: the grid kind the solver is designed for (default ``"logsnr"``).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 1
    evals_per_step: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    multistep: ClassVar[bool] = False
    citation: ClassVar[str] = ""
    prediction: ClassVar[str] = "data"
    #: the grid kind the solver is designed for (used by tests and benches as its default)
    natural_grid: ClassVar[str] = "logsnr"

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")

    # the number of steps below which the solver never reaches its order
    @property
    def min_steps(self) -> int:
        return self.order if self.multistep else 1

    def nfe(self, n_steps: int) -> int:
        """Model evaluations used by ``n_steps`` steps (without the final denoise).

        Override when the cost per step varies (e.g. PNDM's Runge-Kutta warm start)."""
        return self.evals_per_step * n_steps

    def init(self, model: BoundModel, x: Tensor, grid: Tensor) -> dict[str, Any]:
        """Initial state; multistep solvers add their history lists here."""
        return {"grid": grid}

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (for records and tables)."""
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("name", "stochastic", "citation")
        }

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


REGISTRY: dict[str, tuple[type[Solver], dict[str, Any]]] = {}
#: per-name citation overrides (one class registered under names from different papers)
CITATIONS: dict[str, str] = {}


def register(name: str, *, citation: str | None = None, **preset: Any):
    """Class decorator: register ``cls`` under ``name`` with preset options.

    One class can be registered under several names (``dpmpp_2m`` and ``dpmpp_3m`` are the
    same class with ``order=2`` and ``order=3``).
    """

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in REGISTRY:
            raise ValueError(f"solver {name!r} registered twice")
        REGISTRY[name] = (cls, dict(preset))
        if citation is not None:
            CITATIONS[name] = citation
        return cls

    return deco


def get_solver(name: str | Solver, **options: Any) -> Solver:
    """Build a registered solver by name, overriding its preset options.

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> get_solver("ddim").name
        'ddim'
    """
    if isinstance(name, Solver):
        if options:
            raise TypeError("options can only be given together with a solver name")
        return name
    _ensure_loaded()
    try:
        cls, preset = REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown solver {name!r}; available: {', '.join(sorted(REGISTRY))} "
            "(see `diffusolve solvers`)"
        ) from None
    solver = cls(**{**preset, **options})
    solver.name = name  # instance attribute: the registry name it was built from
    if name in CITATIONS:
        solver.citation = CITATIONS[name]
    return solver


def list_solvers() -> list[str]:
    """Names of all registered solvers."""
    _ensure_loaded()
    return sorted(REGISTRY)


def _ensure_loaded() -> None:
    from . import _all  # noqa: F401  (imports every solver module, filling the registry)
