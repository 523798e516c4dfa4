"""A searched solver schedule: process, NFE, time grid, solver (or per-step decisions), final.

A :class:`Schedule` is plain data (a frozen dataclass of JSON types): what it was searched
for (the process, by name and by its ``lambda`` and ``alpha`` at five probe times), the
NFE it uses, the decreasing time grid in the process's time units, the final policy, and
either a registered solver with options (a timestep-only schedule) or one USF
:class:`~diffusolve.solvers.search.usf.Decision` per grid step. It runs through the one
loop: :meth:`Schedule.sample` checks the model's process, then calls
:func:`diffusolve.sample` with its grid, its solver and its final policy, and checks that
the loop counted exactly ``nfe`` model evaluations.

Example:
    >>> import torch
    >>> from diffusolve.models import Gaussian
    >>> from diffusolve.process import make_grid, vp_linear
    >>> from diffusolve.solvers.search import Schedule
    >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=vp_linear())
    >>> sch = Schedule.for_solver(prior.process, make_grid(prior.process, 4), "dpmpp_2m")
    >>> sch.nfe, Schedule.from_dict(sch.to_dict()) == sch
    (5, True)
    >>> xT = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(0))
    >>> sch.sample(prior, xT).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...process import Process, check_grid
from ..base import Solver, get_solver
from ..loop import FINALS, sample
from .usf import USF, Decision

__all__ = ["Schedule", "ProcessSpec", "FORMAT"]

#: the ``format`` tag of a schedule file
FORMAT = "diffusolve-schedule/1"
#: fractions of ``[t_min, t_max]`` at which a process is fingerprinted
PROBES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: relative tolerance of the process check
PROCESS_RTOL = 1e-9


@dataclass(frozen=True)
class ProcessSpec:
    """The process a schedule was searched for: its name, time range and ``lambda(t)``,
    ``alpha(t)`` at :data:`PROBES` of the range (enough to tell two processes apart)."""

    name: str
    t_min: float
    t_max: float
    lam: tuple[float, ...]
    alpha: tuple[float, ...]

    @classmethod
    def of(cls, process: Process) -> ProcessSpec:
        """The spec of ``process``."""
        lo, hi = process.t_min, process.t_max
        ts = torch.tensor([lo + f * (hi - lo) for f in PROBES], dtype=torch.float64)
        return cls(
            process.name,
            lo,
            hi,
            tuple(process.lam(ts).tolist()),
            tuple(process.alpha(ts).tolist()),
        )

    def mismatch(self, process: Process) -> str | None:
        """Why ``process`` is not this one (``None`` when it is)."""
        other = ProcessSpec.of(process)
        if other.name != self.name:
            return f"process {other.name!r} is not {self.name!r}"
        pairs = [("t_min", self.t_min, other.t_min), ("t_max", self.t_max, other.t_max)]
        pairs += [
            (f"lambda(t{i})", a, b)
            for i, (a, b) in enumerate(zip(self.lam, other.lam, strict=False))
        ]
        pairs += [
            (f"alpha(t{i})", a, b)
            for i, (a, b) in enumerate(zip(self.alpha, other.alpha, strict=False))
        ]
        for what, a, b in pairs:
            if not math.isclose(a, b, rel_tol=PROCESS_RTOL, abs_tol=PROCESS_RTOL):
                return f"{self.name}: {what} is {b!r}, the schedule's is {a!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "probes": list(PROBES),
            "lambda": list(self.lam),
            "alpha": list(self.alpha),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessSpec:
        if tuple(d.get("probes", PROBES)) != PROBES:
            raise ValueError(f"unsupported process probes {d.get('probes')!r}")
        return cls(
            str(d["name"]),
            float(d["t_min"]),
            float(d["t_max"]),
            tuple(float(v) for v in d["lambda"]),
            tuple(float(v) for v in d["alpha"]),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}  # JSON has no inf
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    raise ValueError(f"a schedule option must be a JSON value, got {value!r}")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


@dataclass(frozen=True)
class Schedule:
    """A solver schedule for one process at one NFE (see the module docstring).

    Attributes:
        process: the :class:`ProcessSpec` it was searched for.
        nfe: the model evaluations a run makes (checked by :meth:`sample`).
        grid: decreasing times, in the process's units (``len(grid) - 1`` steps).
        final: the loop's final policy (``"denoise"`` or ``"zero"``; ``"none"`` allowed).
        solver: a registered solver name (``"usf"`` for a decision schedule).
        options: that solver's options (without ``decisions``), as JSON values.
        decisions: one :class:`~diffusolve.solvers.search.usf.Decision` per step (only
            with ``solver="usf"``), or ``()``.
        info: free provenance (proxy before/after, search settings); not used to run.
    """

    process: ProcessSpec
    nfe: int
    grid: tuple[float, ...]
    final: str
    solver: str
    options: tuple[tuple[str, Any], ...] = ()
    decisions: tuple[Decision, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        g = list(self.grid)
        if len(g) < 2 or any(not math.isfinite(v) for v in g):
            raise ValueError("a schedule's grid needs at least two finite times")
        if any(b >= a for a, b in zip(g, g[1:], strict=False)):
            raise ValueError(f"a schedule's grid must be strictly decreasing, got {g}")
        if self.decisions and self.solver != "usf":
            raise ValueError("per-step decisions need solver='usf'")
        if self.decisions and len(self.decisions) != len(g) - 1:
            raise ValueError(
                f"{len(self.decisions)} decisions for a grid of {len(g) - 1} steps; give one "
                "decision per step"
            )
        expected = self.solver_object().nfe(len(g) - 1) + (0 if self.final == "none" else 1)
        if self.nfe != expected:
            raise ValueError(
                f"this schedule declares nfe={self.nfe} but its solver, grid and final "
                f"policy use {expected} model evaluations"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_solver(
        cls,
        process: Process,
        grid: Tensor | Sequence[float],
        solver: str | Solver,
        final: str = "denoise",
        info: dict[str, Any] | None = None,
    ) -> Schedule:
        """The schedule running ``solver`` (a name or a solver object; a
        :class:`~diffusolve.solvers.search.usf.USF` keeps its decisions) on ``grid``."""
        s = get_solver(solver)
        grid = check_grid(process, torch.as_tensor(grid, dtype=torch.float64))
        opts = s.options()
        decisions = tuple(opts.pop("decisions", ())) if isinstance(s, USF) else ()
        nfe = s.nfe(grid.numel() - 1) + (0 if final == "none" else 1)
        return cls(
            ProcessSpec.of(process),
            nfe,
            tuple(grid.tolist()),
            final,
            s.name,
            tuple(sorted((k, _jsonable(v)) for k, v in opts.items())),
            decisions,
            dict(info or {}),
        )

    # ------------------------------------------------------------------ running
    def solver_object(self) -> Solver:
        """The solver this schedule runs (with its decisions)."""
        opts = {k: _from_json(v) for k, v in self.options}
        if self.solver == "usf":
            return get_solver("usf", **opts, decisions=tuple(self.decisions))
        return get_solver(self.solver, **opts)

    def grid_tensor(self) -> Tensor:
        """The grid as a float64 tensor."""
        return torch.tensor(self.grid, dtype=torch.float64)

    def check_process(self, process: Process) -> None:
        """Raise ``ValueError`` unless ``process`` is the one this schedule was searched for."""
        why = self.process.mismatch(process)
        if why is not None:
            raise ValueError(
                f"this schedule was searched for process {self.process.name!r} "
                f"(t in [{self.process.t_min:g}, {self.process.t_max:g}]) and the model's "
                f"process differs ({why}); search a schedule for this model "
                "(`diffusolve search`)"
            )

    def sample(self, model: Any, x: Tensor, **kwargs: Any) -> Tensor:
        """Run the schedule: :func:`diffusolve.sample` with this grid, solver and final
        policy (``kwargs``: ``cond``, ``dtype``, ``progress``, ``stats``, ...).

        Raises ``ValueError`` when the model's process is not the schedule's.
        """
        for key in ("grid", "solver", "final", "grid_kind"):
            if key in kwargs:
                raise TypeError(f"a schedule fixes {key}; build another schedule to change it")
        self.check_process(model.process)
        stats = kwargs.pop("stats", None)
        own: dict[str, Any] = {}
        out = sample(
            model,
            x,
            self.grid_tensor(),
            self.solver_object(),
            final=self.final,
            stats=own,
            **kwargs,
        )
        if own["nfe"] != self.nfe:  # pragma: no cover - guarded by __post_init__
            raise RuntimeError(f"the schedule declares nfe={self.nfe}, the run used {own['nfe']}")
        if stats is not None:
            stats.update(own)
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (:meth:`from_dict` inverts it)."""
        return {
            "format": FORMAT,
            "process": self.process.to_dict(),
            "nfe": self.nfe,
            "grid": list(self.grid),
            "final": self.final,
            "solver": self.solver,
            "options": {k: v for k, v in self.options},
            "decisions": [d.to_dict() for d in self.decisions],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        """The schedule of a :meth:`to_dict` dict (validated)."""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a schedule file (format {d.get('format')!r}, want {FORMAT!r})")
        return cls(
            ProcessSpec.from_dict(d["process"]),
            int(d["nfe"]),
            tuple(float(v) for v in d["grid"]),
            str(d["final"]),
            str(d["solver"]),
            tuple(sorted((str(k), v) for k, v in dict(d.get("options", {})).items())),
            tuple(Decision(**x) for x in d.get("decisions", [])),
            dict(d.get("info", {})),
        )

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the schedule as JSON; refuses to overwrite an existing file unless
        ``force``."""
        path = Path(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        path.write_text(text + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a schedule written by :meth:`save`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a schedule file (invalid JSON: {exc})") from None
        return cls.from_dict(d)

    def describe(self) -> str:
        """One line: solver, NFE, final and grid (and decisions, compactly)."""
        grid = ", ".join(f"{t:.4g}" for t in self.grid)
        text = f"{self.solver} NFE {self.nfe} final={self.final} grid [{grid}]"
        if self.decisions:
            text += " steps " + " ".join(
                f"{d.prediction[0]}{d.order}c{d.corrector}{d.variant}"
                + ("" if d.scale == 1.0 else f"x{d.scale:.3g}")
                for d in self.decisions
            )
            text += " (prediction, order, corrector order, B(h), relaxation scale)"
        return text
