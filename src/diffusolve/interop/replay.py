"""A solve driven from outside, one model output at a time ("push" sampling).

Callers such as diffusers pipelines own the network call: they ask the sampler where to
evaluate, evaluate, and hand the output back. Our solvers are written the other way round
(``solver.step`` calls ``model(x, t)`` itself). :class:`PushSolve` bridges the two without
changing any solver, using the solver contract's purity (a step never mutates its input
state, so re-running it from the same ``(x, t, t_next, state, ctx)`` reproduces it bitwise):

* a step is run against a replay model that returns the outputs already received for this
  step, in call order; the first call beyond them raises :class:`NeedEvaluation` with the
  query point ``(x, t)``, which is what the caller evaluates next;
* when the output arrives, the step is re-run from its start with one more output; when it
  returns, the solve moves to the next grid step.

A k-stage step (Heun, singlestep DPM-Solver, the PNDM warm-up) is re-run k times; only the
arithmetic is repeated, never the network. Noise draws of stochastic solvers are recorded
per step and replayed in order, so a replay sees the same noise. The query times of a
deterministic solve depend on the grid alone, so :func:`evaluation_times` finds them with a
dry run on a one-element state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..process import Process, as_time
from ..solvers import FINALS, BoundModel, Solver, StepContext
from ..solvers.endpoint import extrapolate_to_zero
from ..solvers.loop import ZERO_POINTS

__all__ = ["NeedEvaluation", "PushSolve", "evaluation_times"]


class NeedEvaluation(Exception):
    """Raised by the replay model when a step needs an output it has not received."""

    def __init__(self, x: Tensor, t: Tensor) -> None:
        super().__init__("the step needs a model evaluation")
        self.x = x
        self.t = t


class _Carrier:
    """The minimal model a :class:`BoundModel` wraps: it only carries the process."""

    def __init__(self, process: Process) -> None:
        self.process = process

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover
        raise RuntimeError("the replay model answers every call itself")


class _ReplayModel(BoundModel):
    """Answers the k-th call of a step with the k-th output received for it."""

    def __init__(self, process: Process, grid: Tensor, outputs: list[tuple[float, Tensor]]):
        super().__init__(_Carrier(process), None, grid)
        self.outputs = outputs

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        if self.nfe >= len(self.outputs):
            raise NeedEvaluation(x, t if isinstance(t, Tensor) else as_time(t))
        t_rec, out = self.outputs[self.nfe]
        if float(t) != t_rec:  # pragma: no cover - purity of steps makes this unreachable
            raise RuntimeError(
                f"replayed step asked for t={float(t)!r} where t={t_rec!r} was evaluated; "
                "the solver's step is not pure"
            )
        self.nfe += 1
        return out.to(x.dtype) if out.dtype != x.dtype else out


class _ReplayNoise:
    """Noise draws of one step, recorded and replayed in order (stochastic solvers)."""

    def __init__(self) -> None:
        self.draws: list[Tensor] = []
        self.k = 0
        self.generator: torch.Generator | None = None

    def rewind(self) -> None:
        self.k = 0

    def clear(self) -> None:
        self.draws, self.k = [], 0

    def __call__(
        self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device=None
    ) -> Tensor:
        if self.k < len(self.draws):
            out = self.draws[self.k]
        else:
            g = self.generator
            gdev = g.device if g is not None else device
            out = torch.randn(tuple(shape), generator=g, dtype=dtype, device=gdev).to(device)
            self.draws.append(out)
        self.k += 1
        return out


@dataclass
class PushSolve:
    """One solve of ``solver`` over ``grid`` from ``x``, fed model outputs from outside.

    Use: ``q = solve.query`` is the point ``(x, t)`` to evaluate next (``None`` once
    finished); ``solve.feed(x0)`` hands over the x0 estimate at that point; ``solve.result``
    is the solve's result once ``solve.done`` (the same as :func:`diffusolve.sample` with
    the same grid, solver and final policy, bitwise for deterministic solvers).

    Example:
        >>> import torch
        >>> from diffusolve import sample
        >>> from diffusolve.interop.replay import PushSolve
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import make_grid, vp_linear
        >>> from diffusolve.solvers import get_solver
        >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=vp_linear())
        >>> grid = make_grid(prior.process, 4)
        >>> x = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(0))
        >>> solve = PushSolve(get_solver("heun"), prior.process, grid, x)
        >>> while not solve.done:
        ...     xq, tq = solve.query
        ...     solve.feed(prior(xq, tq))
        >>> bool(torch.equal(solve.result, sample(prior, x, grid, "heun")))
        True
    """

    solver: Solver
    process: Process
    grid: Tensor
    x: Tensor
    final: str = "denoise"
    i: int = 0
    state: Any = None
    query: tuple[Tensor, Tensor] | None = None
    result: Tensor | None = None
    evaluations: list[tuple[float, Tensor]] = field(default_factory=list)
    _pending: list[tuple[float, Tensor]] = field(default_factory=list)
    _grid_out: dict[int, Tensor] = field(default_factory=dict)
    _noise: _ReplayNoise = field(default_factory=_ReplayNoise)
    _last: Tensor | None = None

    def __post_init__(self) -> None:
        if self.final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {self.final!r}")
        self.n = self.grid.numel() - 1
        self._times = self.grid.unbind()
        self._index = {t: k for k, t in enumerate(self.grid.tolist())}
        self.state = self.solver.init(self._model(), self.x)
        self._advance()

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def newest(self) -> Tensor | None:
        """The newest x0 estimate received (``None`` before the first)."""
        return self._pending[-1][1] if self._pending else self._last

    def set_generator(self, generator: torch.Generator | None) -> None:
        """The generator new noise draws come from (stochastic solvers)."""
        self._noise.generator = generator

    def feed(self, x0: Tensor) -> None:
        """Hand over the x0 estimate at :attr:`query` and advance to the next query."""
        if self.query is None:
            raise RuntimeError("the solve is finished; it needs no more model outputs")
        t = float(self.query[1])
        self._pending.append((t, x0))
        self._last = x0
        k = self._index.get(t)
        if k is not None:
            self._grid_out[k] = x0
        self.query = None
        self._advance()

    # ------------------------------------------------------------------ internals
    def _model(self) -> _ReplayModel:
        return _ReplayModel(self.process, self.grid, self._pending)

    def _advance(self) -> None:
        while self.i < self.n:
            i = self.i
            ctx = StepContext(
                i, self.n, self.final, self._noise if self.solver.stochastic else None
            )
            self._noise.rewind()
            try:
                x_next, state = self.solver.step(
                    self._model(), self.x, self._times[i], self._times[i + 1], self.state, ctx
                )
            except NeedEvaluation as need:
                self.query = (need.x, need.t)
                return
            self.evaluations.extend(self._pending)
            self.x, self.state, self.i = x_next, state, i + 1
            self._pending = []
            self._noise.clear()
        if self.final == "none":
            self.result = self.x
            return
        if self.final == "denoise":  # through the solver (a combination for ``ns``)
            try:
                out = self.solver.finish(self._model(), self.x, self._times[-1], self.state)
            except NeedEvaluation as need:
                self.query = (need.x, need.t)
                return
            self.evaluations.extend(self._pending)
            self.result = out
            return
        if not self._pending:
            self.query = (self.x, self._times[-1])
            return
        self.evaluations.extend(self._pending)
        out = self._pending[-1][1]
        if self.final == "zero":
            idx = [
                k for k in range(self.n, max(-1, self.n - ZERO_POINTS), -1) if k in self._grid_out
            ]
            s = [float(self.process.sigma_tilde(self._times[k])) for k in idx]
            out = extrapolate_to_zero(s, [self._grid_out[k].to(out.dtype) for k in idx])
        self.result = out


def evaluation_times(solver: Solver, process: Process, grid: Tensor, final: str) -> list[float]:
    """The times at which a solve of ``solver`` over ``grid`` evaluates the model, in order
    (a dry run on a one-element state; the times of a fixed-grid solve do not depend on the
    state's values)."""
    x = torch.zeros(1, 1, dtype=torch.float64)
    solve = PushSolve(solver, process, grid, x, final)
    solve.set_generator(torch.Generator().manual_seed(0))
    times: list[float] = []
    while not solve.done:
        xq, tq = solve.query  # type: ignore[misc]
        times.append(float(tq))
        solve.feed(0.5 * xq)
    return times
