"""The solver contract, the step context, the model view every solver calls, and the registry.

A solver is an immutable object (a frozen dataclass) whose fields are exactly its options:
``repr``, ``options()``, ``dataclasses.replace`` and ``type(s)(**s.options()) == s`` hold for
every registered name. Its capabilities (``order``, ``evals_per_step``, ``stochastic``,
``multistep``, ``natural_grid``, ``prediction``, the options worth searching) are declared
on the class, or computed from the fields by a property, never written per instance.

The contract::

    state = solver.init(model, x)                          # the solver's own typed state
    x_next, state = solver.step(model, x, t, t_next, state, ctx)

``model`` is a :class:`BoundModel` (``model(x, t) -> x0`` with the condition bound,
evaluations counted, outputs checked; ``model.scalars(t)`` gives ``alpha``, ``sigma``,
``lambda`` as Python floats). ``ctx`` is a :class:`StepContext`: what the loop knows (step
index, number of steps, final policy, noise source). A step never reads the grid and never
mutates its input state, so the same step runs on a reversed grid (inversion) or on a
searched per-step schedule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..process import Process, as_time

__all__ = [
    "Solver",
    "StepContext",
    "BoundModel",
    "REGISTRY",
    "ALIASES",
    "register",
    "get_solver",
    "list_solvers",
    "resolve_name",
]


class StepContext(NamedTuple):
    """What the loop knows at a step; passed to every :meth:`Solver.step`.

    Attributes:
        i: the index of the step (``0 .. n - 1``).
        n: the number of grid steps of the solve.
        final: the final policy of the solve (``"denoise"``, ``"zero"`` or ``"none"``).
        noise: the noise source of a stochastic solve (``None`` for a deterministic one).
    """

    i: int = 0
    n: int = 1
    final: str = "none"
    noise: Any = None


class BoundModel:
    """``model(x, t) -> x0`` with ``cond`` bound, NFE counting and output checks.

    ``scalars(t)`` returns ``(alpha, sigma, lambda)`` at ``t`` as Python floats (float64
    arithmetic), from a table built once per grid: a solve's coefficients depend only on the
    grid, so the process is evaluated once per grid time, not once per use.
    ``process`` is the model's process (for ``t_of_lambda`` and other inverses).
    """

    def __init__(self, model: Any, cond: Any = None, grid: Tensor | None = None) -> None:
        self.model = model
        self.process: Process = model.process
        self.cond = cond
        self.nfe = 0
        self._table: dict[float, tuple[float, float, float]] = {}
        if grid is not None:
            p = self.process
            a, s, lam = p.alpha(grid).tolist(), p.sigma(grid).tolist(), p.lam(grid).tolist()
            for i, t in enumerate(grid.tolist()):
                self._table[t] = (a[i], s[i], lam[i])

    def scalars(self, t: Tensor | float) -> tuple[float, float, float]:
        """``(alpha(t), sigma(t), lambda(t))`` as floats (cached per time)."""
        key = float(t)
        hit = self._table.get(key)
        if hit is None:
            p = self.process
            hit = (float(p.alpha(key)), float(p.sigma(key)), float(p.lam(key)))
            self._table[key] = hit
        return hit

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        if not (isinstance(t, Tensor) and t.dtype == torch.float64):
            t = as_time(t)
        out = self.model(x, t, self.cond)
        self.nfe += 1
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(x.shape)}; check the data shape you sample."
            )
        # one reduction on the hot path; the element-wise check only confirms a failure
        if not math.isfinite(out.sum(dtype=torch.float64).item()) and not bool(
            torch.isfinite(out).all()
        ):
            raise FloatingPointError(
                f"the model returned non-finite values at t={float(t.flatten()[0]):.6g} "
                f"(evaluation {self.nfe}); try float64 (dtype=torch.float64), a grid that "
                "stays inside the model's trained range, or a lower-order solver."
            )
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out

    def eps(self, x: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
        """The epsilon prediction implied by an x0 estimate at ``(x, t)``."""
        a, s, _ = self.scalars(t)
        return (x - a * x0) / s

    def output(self, x: Tensor, t: Tensor | float, prediction: str) -> Tensor:
        """The model output in ``prediction`` (``"data"``: x0, ``"noise"``: epsilon)."""
        x0 = self(x, t)
        return x0 if prediction == "data" else self.eps(x, t, x0)


@dataclass(frozen=True)
class Solver:
    """Base class: a frozen dataclass whose fields are the solver's options.

    Subclasses are ``@dataclass(frozen=True)``, declare their options as fields, validate
    them in ``__post_init__``, and implement :meth:`step` (and :meth:`init` when they keep
    state). Capabilities are class variables, or properties computed from the fields:

    Attributes:
        order: global convergence order of the deterministic ODE solve.
        evals_per_step: model evaluations per step (for NFE budgets; see :meth:`nfe`).
        stochastic: whether the step draws noise (from ``ctx.noise``).
        multistep: whether the solver keeps a history of model outputs.
        prediction: what the update is written in (``"data"`` or ``"noise"``).
        natural_grid: the grid kind the solver is designed for.
        citation: the paper.
        SEARCH: options worth searching by a bench, with their candidate values.
    """

    order: ClassVar[int] = 1
    evals_per_step: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    multistep: ClassVar[bool] = False
    prediction: ClassVar[str] = "data"
    natural_grid: ClassVar[str] = "logsnr"
    citation: ClassVar[str] = ""
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {}

    # ------------------------------------------------------------------ the contract
    def init(self, model: BoundModel, x: Tensor) -> Any:
        """The initial state (``None`` for solvers without history)."""
        return None

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: Any, ctx: StepContext
    ) -> tuple[Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, model: BoundModel, x: Tensor, t: Tensor, state: Any) -> Tensor:
        """The result of ``final="denoise"``: one model evaluation at the last grid point.

        The default is the model's x0 estimate ``model(x, t)``; a solver whose result
        combines all its outputs (:class:`~diffusolve.solvers.search.ns.NS`) overrides it.
        Same purity rule as :meth:`step` (no mutation of ``state``).
        """
        return model(x, t)

    def nfe(self, n_steps: int) -> int:
        """Model evaluations used by ``n_steps`` steps (without the final evaluation)."""
        return self.evals_per_step * n_steps

    @property
    def min_steps(self) -> int:
        """The number of steps below which the solver never reaches its order."""
        return self.order if self.multistep else 1

    # ------------------------------------------------------------------ options
    def options(self) -> dict[str, Any]:
        """The options (dataclass fields) of this solver: ``type(s)(**s.options()) == s``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Solver:
        """A copy with some options changed (validated like a new solver)."""
        return dataclasses.replace(self, **changes)

    def search_space(self) -> dict[str, tuple[Any, ...]]:
        """Options worth searching (name -> candidate values), declared by the class."""
        return dict(self.SEARCH)

    @property
    def name(self) -> str:
        """The registry name whose preset this solver matches (the most specific one)."""
        return _name_of(self)

    def __str__(self) -> str:
        return self.name


REGISTRY: dict[str, tuple[type[Solver], dict[str, Any]]] = {}
#: per-name citation overrides (one class registered under names from different papers)
CITATIONS: dict[str, str] = {}
#: other libraries' names -> (our registry name, what the mapping means)
ALIASES: dict[str, tuple[str, str]] = {}


def register(name: str, *, citation: str | None = None, **preset: Any):
    """Class decorator: register ``cls`` under ``name`` with preset options.

    One class can be registered under several names (``dpmpp_2m`` and ``dpmpp_3m`` are the
    same class with ``solver_order=2`` and ``solver_order=3``).
    """

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in REGISTRY or name in ALIASES:
            raise ValueError(f"solver {name!r} registered twice")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(preset) - fields
        if unknown:
            raise TypeError(f"preset {name!r} sets unknown options {sorted(unknown)}")
        REGISTRY[name] = (cls, dict(preset))
        if citation is not None:
            CITATIONS[name] = citation
        return cls

    return deco


def alias(name: str, target: str, meaning: str) -> None:
    """Register another library's solver name as an alias of one of ours."""
    if name in REGISTRY or name in ALIASES:
        raise ValueError(f"solver {name!r} registered twice")
    ALIASES[name] = (target, meaning)


def resolve_name(name: str) -> str:
    """The registry name behind ``name`` (itself, or the target of an alias)."""
    _ensure_loaded()
    return ALIASES[name][0] if name in ALIASES else name


def get_solver(name: str | Solver, **options: Any) -> Solver:
    """Build a registered solver by name (or alias), overriding its preset options.

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> s = get_solver("dpmpp_2m", lower_order_final=True)
        >>> s.name, type(s)(**s.options()) == s
        ('dpmpp_2m', True)
    """
    if isinstance(name, Solver):
        return name.replace(**options) if options else name
    _ensure_loaded()
    key = resolve_name(name)
    try:
        cls, preset = REGISTRY[key]
    except KeyError:
        raise ValueError(
            f"unknown solver {name!r}; available: {', '.join(sorted(REGISTRY))} "
            f"(aliases: {', '.join(sorted(ALIASES))}; see `diffusolve solvers`)"
        ) from None
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hint = ""
        if "generator" in unknown:
            hint = " To seed a stochastic solver pass noise=SEED (or a list of per-sample seeds)."
        raise TypeError(f"{name} has no option(s) {unknown}; its options are {valid}.{hint}")
    return cls(**{**preset, **options})


def list_solvers() -> list[str]:
    """Names of all registered solvers (aliases not included)."""
    _ensure_loaded()
    return sorted(REGISTRY)


_NAME_CACHE: dict[tuple[type, tuple], str] = {}


def _name_of(solver: Solver) -> str:
    cls = type(solver)
    opts = solver.options()
    try:
        key: tuple | None = (cls, tuple(sorted(opts.items())))
        hit = _NAME_CACHE.get(key)  # type: ignore[arg-type]
    except TypeError:  # unhashable option values
        key, hit = None, None
    if hit is not None:
        return hit
    _ensure_loaded()
    best, best_size, first = None, -1, None
    for name in sorted(REGISTRY):
        rcls, preset = REGISTRY[name]
        if rcls is not cls:
            continue
        first = first or name
        if all(opts.get(k) == v for k, v in preset.items()) and len(preset) > best_size:
            best, best_size = name, len(preset)
    out = best or first or cls.__name__
    if key is not None:
        _NAME_CACHE[key] = out
    return out


def citation_of(solver: Solver) -> str:
    """The citation of a solver (per-name override, else the class's)."""
    return CITATIONS.get(solver.name, solver.citation)


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise a clear error unless ``value`` is one of ``choices`` (bools are not ints)."""
    ok = any(
        value is c if isinstance(c, bool) else (value == c and not isinstance(value, bool))
        for c in choices
    )
    if not ok:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (or >= 0)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _ensure_loaded() -> None:
    from . import _all  # noqa: F401  (imports every solver module, filling the registry)
