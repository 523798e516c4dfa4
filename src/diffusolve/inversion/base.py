"""The inversion contract: an inverter maps data to the noise that regenerates it.

**Grid convention.** Every inversion works on a *sampling* grid ``t_0 > t_1 > ... > t_n``
(decreasing float64 times, as :func:`diffusolve.sample` takes it). The data ``x`` is the
state at the clean end ``t_n``; :meth:`Inverter.invert` runs the grid backwards
(``t_n -> t_(n-1) -> ... -> t_0``) and returns an :class:`Inversion` whose ``latent`` is
the state at ``t_0``. :meth:`Inverter.reconstruct` runs the grid forwards from that
latent and returns the state at ``t_n`` (no final denoising step), so that for an exact
scheme ``reconstruct(invert(x)) == x`` up to rounding. Inverting to an intermediate
noise level (an editing "strength") is a grid whose ``t_0`` is below ``t_max``.

**Inverters** are frozen dataclasses whose fields are their options (paper defaults), like
solvers and posterior samplers, with class variables

* ``name``: the registry name; ``citation``;
* ``exact``: ``True`` when the reconstruction equals the input up to rounding by
  construction (EDICT, BDIA, BELM, direct inversion's source branch, DDCM); ``False``
  for approximate inversions (plain reversed-grid solvers, fixed-point, ReNoise, ...);
* ``needs_guidance``: ``True`` when the method needs a classifier-free-guidance model
  (null-text inversion optimises the null condition of a
  :class:`~diffusolve.guidance.ClassifierFreeGuidance` model).

**Extra state.** What a method needs besides the latent to regenerate its input (EDICT's
second sequence, BDIA's previous state, per-step null conditions, direct inversion's
offsets) is kept in ``Inversion.aux`` (a dict of tensors or lists of tensors), and
:meth:`Inversion.save` / :func:`load_inversion` write and read it as safetensors with
JSON metadata.

**Editing** regenerates under another condition: ``reconstruct(model, inv, cond=target)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..process import check_grid, make_grid

__all__ = [
    "Inversion",
    "Inverter",
    "INVERTERS",
    "register",
    "get_inverter",
    "list_inverters",
    "sampling_grid",
    "load_inversion",
]

#: registered inverters, by name
INVERTERS: dict[str, type[Inverter]] = {}


def register(cls: type[Inverter]) -> type[Inverter]:
    """Class decorator: add an inverter to :data:`INVERTERS` under ``cls.name``."""
    if cls.name in INVERTERS:
        raise ValueError(f"an inverter named {cls.name!r} is already registered")
    INVERTERS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from . import _all  # noqa: F401  (registers every inverter)


def list_inverters() -> list[str]:
    """The registered inverter names (sorted)."""
    _ensure_loaded()
    return sorted(INVERTERS)


def get_inverter(method: str | Inverter, **options: Any) -> Inverter:
    """An inverter by name (with options), or the given inverter with options replaced.

    A name that is not an inverter but a registered *deterministic* solver (``"ddim"``,
    ``"dpmpp_2m"``, ...) gives :class:`~diffusolve.inversion.reverse.SolverInversion` of
    that solver (the solver run on the reversed grid), with ``options`` passed to the solver
    except the inverter's own (``evaluate_at``).
    """
    _ensure_loaded()
    if isinstance(method, Inverter):
        return method.replace(**options) if options else method
    if not isinstance(method, str):
        raise TypeError(f"method must be an inverter name or object, got {method!r}")
    if method in INVERTERS:
        return INVERTERS[method](**options)
    from ..solvers import get_solver, list_solvers
    from .reverse import SolverInversion

    # the reversed-grid inverter's own options (evaluate_at); the rest are the solver's
    own = {f.name for f in dataclasses.fields(SolverInversion)} - {"solver"}
    inverter_options = {k: options.pop(k) for k in list(options) if k in own}
    try:
        solver = get_solver(method, **options)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"unknown inversion method {method!r}: inverters are {sorted(INVERTERS)}; any "
            f"deterministic solver also inverts on the reversed grid ({list_solvers()}). "
            f"({err})"
        ) from None
    return SolverInversion(solver=solver, **inverter_options)


def sampling_grid(
    model: Any, steps: int | Tensor, grid_kind: str = "time_uniform", t_start: float | None = None
) -> Tensor:
    """The decreasing sampling grid an inversion runs backwards.

    ``steps`` is an int number of steps (``grid_kind`` grid from ``t_start``, default
    ``t_max``, to ``t_min``) or an explicit decreasing grid. An increasing grid is refused
    with a message saying to pass the sampling grid (the inversion reverses it itself).
    """
    process = model.process
    if isinstance(steps, bool):
        raise TypeError("steps must be an int or a decreasing tensor of times")
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return make_grid(process, steps, grid_kind, t_start=t_start)
    grid = torch.as_tensor(steps, dtype=torch.float64)
    if grid.ndim == 1 and grid.numel() >= 2 and bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(
            "pass the decreasing *sampling* grid (t_max ... t_min); the inversion runs it "
            "backwards itself. Got an increasing grid."
        )
    return check_grid(process, grid)


@dataclass
class Inversion:
    """The result of an inversion.

    Attributes:
        latent: the state at ``grid[0]`` (the noisiest time).
        grid: the decreasing sampling grid (float64) the reconstruction runs.
        method: the inverter that produced it (reconstruct with the same one).
        cond: the condition the inversion used (the default condition of the
            reconstruction).
        aux: the method's extra state (tensors or lists of tensors), see the module doc.
        nfe: the number of network evaluations the inversion used.
    """

    latent: Tensor
    grid: Tensor
    method: Inverter
    cond: Any = None
    aux: dict[str, Any] = field(default_factory=dict)
    nfe: int = 0

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the inversion as safetensors (``latent``, ``grid``, ``aux`` tensors) with
        the method, its options and the condition in the metadata.

        Refuses to overwrite an existing file unless ``force=True``.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
        tensors: dict[str, Tensor] = {"latent": self.latent, "grid": self.grid}
        layout: dict[str, Any] = {}
        for key, value in self.aux.items():
            if isinstance(value, Tensor):
                tensors[f"aux.{key}"] = value
                layout[key] = "tensor"
            elif isinstance(value, (list, tuple)) and all(isinstance(v, Tensor) for v in value):
                for i, v in enumerate(value):
                    tensors[f"aux.{key}.{i}"] = v
                layout[key] = len(value)
            else:
                layout[key] = {"json": value}
        cond = self.cond
        if isinstance(cond, Tensor):
            tensors["cond"] = cond
            cond_meta: Any = {"tensor": True}
        else:
            cond_meta = {"json": cond}
        meta = {
            "method": self.method.name,
            "options": json.dumps(_jsonable(self.method.options())),
            "aux": json.dumps(layout),
            "cond": json.dumps(cond_meta),
            "nfe": str(self.nfe),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if hasattr(v, "options") and hasattr(v, "name"):  # a nested solver
            out[k] = {"solver": v.name, "options": _jsonable(v.options())}
        else:
            out[k] = v
    return out


def load_inversion(path: str | Path) -> Inversion:
    """Read an :class:`Inversion` written by :meth:`Inversion.save`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no inversion file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "method" not in meta:
            raise ValueError(f"{path} is not an inversion file (no 'method' in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    options = json.loads(meta["options"])
    for k, v in list(options.items()):
        if isinstance(v, dict) and "solver" in v:
            from ..solvers import get_solver

            options[k] = get_solver(v["solver"], **v["options"])
    method = get_inverter(meta["method"], **options)
    aux: dict[str, Any] = {}
    for key, kind in json.loads(meta["aux"]).items():
        if kind == "tensor":
            aux[key] = tensors[f"aux.{key}"]
        elif isinstance(kind, int):
            aux[key] = [tensors[f"aux.{key}.{i}"] for i in range(kind)]
        else:
            aux[key] = kind["json"]
    cond_meta = json.loads(meta["cond"])
    cond = tensors["cond"] if cond_meta.get("tensor") else cond_meta.get("json")
    return Inversion(
        latent=tensors["latent"],
        grid=tensors["grid"].to(torch.float64),
        method=method,
        cond=cond,
        aux=aux,
        nfe=int(meta.get("nfe", 0)),
    )


@dataclass(frozen=True)
class Inverter:
    """Base class: a frozen dataclass whose fields are the inverter's options.

    Subclasses implement :meth:`invert` and :meth:`reconstruct`, and are registered with
    ``@register``. ``progress`` shows a tqdm bar; ``callback`` is called after every step
    with a dict (``i``, ``t``, ``t_next``, ``x``, ``x_next``).
    """

    name: ClassVar[str] = "?"
    citation: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    needs_guidance: ClassVar[bool] = False

    def invert(
        self,
        model: Any,
        x: Tensor,
        grid: Tensor,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Inversion:  # pragma: no cover - abstract
        raise NotImplementedError

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options as a dict (``type(m)(**m.options()) == m``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Inverter:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})"
