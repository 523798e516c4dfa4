"""The posterior-sampler contract: one loop over a time grid, one model call per step.

A posterior sampler draws ``x ~ p(x | y)`` for ``y = A(x) + noise`` with a diffusion prior
given by a :class:`~diffusolve.models.Denoiser` (any process: VP, VE, EDM, rectified flow).
Every sampler is a **frozen dataclass** whose fields are its options (paper defaults), with
class variables that declare

* ``needs``: what it needs from the operator (``linear``, ``svd``, ``pinv``, ``prox``,
  ``grad``); :meth:`PosteriorSampler.check` refuses other operators with an error that
  names what is missing;
* ``citation``; ``stochastic``; ``SEARCH``: the free step sizes worth tuning (the bench
  tunes them on separate problems).

**The loop** (:meth:`PosteriorSampler.run`). ``steps`` evaluation times
``t_0 > ... > t_(n-1)`` come from :func:`~diffusolve.process.make_grid` (``steps``
intervals from ``t_max`` to ``t_min``, the last time dropped); the step from ``t_(n-1)``
goes to ``sigma = 0``, so the result is a data estimate and a run costs exactly ``steps``
network evaluations (samplers with inner loops say so: ``nfe(steps)``). A step sees a
:class:`Problem` (the bound model, the operator, ``y``, per-sample ``sigma_y``, the grid's
``alpha``/``sigma`` as Python floats, the noise source) and returns the next state.

**Per sample.** Data terms, step sizes and gradients are per sample (a batch never changes a
sample's result: losses are summed over the batch only to take per-sample gradients, never
normalised by it), and with per-sample noise seeds (``noise=SEED``) a sample's result does
not depend on the batch it is drawn in. The one deliberate exception: a particle sampler
with ``pool=True`` (TDS's default) treats rows repeating one measurement as requests for
several samples of one posterior and draws them from one shared filter; rows with other
measurements still never affect them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...process import check_grid, make_grid
from ...solvers.noise import NoiseSource, as_noise_source
from ..base import Operator, declare_needs

__all__ = ["Problem", "PosteriorSampler", "SAMPLERS", "register", "get_sampler"]

#: registered posterior samplers, by name
SAMPLERS: dict[str, type[PosteriorSampler]] = {}


def register(cls: type[PosteriorSampler]) -> type[PosteriorSampler]:
    """Class decorator: add a sampler to :data:`SAMPLERS` and record its needs."""
    if cls.name in SAMPLERS:
        raise ValueError(f"a posterior sampler named {cls.name!r} is already registered")
    declare_needs(cls.name, cls.needs)
    SAMPLERS[cls.name] = cls
    return cls


def get_sampler(method: str | PosteriorSampler, **options: Any) -> PosteriorSampler:
    """A sampler by name (with options), or the given sampler with options replaced.

    Example:
        >>> from diffusolve.inverse.samplers import get_sampler
        >>> get_sampler("dps", zeta=0.5).zeta
        0.5
    """
    if isinstance(method, PosteriorSampler):
        return method.replace(**options) if options else method
    key = str(method).lower().replace("-", "_")
    cls = SAMPLERS.get(key)
    if cls is None:
        raise ValueError(
            f"unknown posterior sampler {method!r}; choose from {', '.join(sorted(SAMPLERS))}"
        )
    return cls(**options)


def _per_sample_sigma(sigma_y: float | Tensor, batch: int, dtype: torch.dtype, device) -> Tensor:
    s = torch.as_tensor(sigma_y, dtype=torch.float64)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.ndim != 1 or s.numel() != batch:
        raise ValueError(
            f"sigma_y must be a number or one value per sample ([{batch}]); got shape "
            f"{tuple(s.shape)}"
        )
    if not torch.all(torch.isfinite(s)) or torch.any(s < 0):
        raise ValueError(f"sigma_y must be finite and >= 0; got {s.tolist()[:4]}")
    return s.to(dtype=dtype, device=device)


class Problem:
    """What a step sees: the model, the operator, the measurement and the grid.

    Attributes:
        model: the denoiser; call :meth:`denoise` (it counts evaluations).
        operator: the forward :class:`~diffusolve.inverse.Operator`.
        y: ``[B, *out_shape]`` measurements (one per sample).
        sigma_y: ``[B]`` measurement noise standard deviations.
        times: float64 ``[n]`` evaluation times.
        alpha, sigma: Python floats per evaluation time, with one more entry for the end
            (``alpha[n] = 1, sigma[n] = 0``: the data).
        noise: the noise source (per-sample seeds or a generator).
        nfe: network evaluations so far.
    """

    def __init__(
        self,
        model: Any,
        operator: Operator,
        y: Tensor,
        sigma_y: Tensor,
        times: Tensor,
        noise: NoiseSource,
        cond: Any = None,
    ) -> None:
        self.model, self.operator, self.y, self.sigma_y = model, operator, y, sigma_y
        self.process = model.process
        self.times = times
        self.n = int(times.numel())
        self.alpha = [float(a) for a in self.process.alpha(times)] + [1.0]
        self.sigma = [float(s) for s in self.process.sigma(times)] + [0.0]
        self.noise, self.cond = noise, cond
        self.nfe = 0
        self.batch = y.shape[0]

    # ---------------------------------------------------------------- grid scalars
    def st(self, i: int) -> float:
        """``sigma / alpha`` at grid index ``i`` (``0`` at the end, ``inf`` where alpha = 0)."""
        a, s = self.alpha[i], self.sigma[i]
        return s / a if a > 0 else math.inf

    def t(self, i: int) -> Tensor:
        return self.times[i]

    # ---------------------------------------------------------------- the model
    def denoise(self, x: Tensor, i: int) -> Tensor:
        """``E[x0 | x_t = x]`` at grid time ``i`` (one network evaluation)."""
        self.nfe += 1
        out = self.model(x, self.times[i], self.cond)
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(x.shape)}"
            )
        return out

    def denoise_with_grad(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """``(x_leaf, x0_hat)`` with the graph kept, for vector-Jacobian products."""
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            x0 = self.denoise(xg, i)
        return xg, x0

    def randn(self, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like`` (from the problem's noise source)."""
        return self.noise(tuple(like.shape), dtype=like.dtype, device=like.device)

    def col(self, v: Tensor, like: Tensor) -> Tensor:
        """A per-sample ``[B]`` tensor shaped to broadcast against ``like``."""
        return v.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)

    # ---------------------------------------------------------------- data terms
    def residual(self, x0: Tensor) -> Tensor:
        """``y - A(x0)`` (in the measurement's real or complex dtype)."""
        return self.y - self.operator.A(x0)

    def sq_norm(self, r: Tensor) -> Tensor:
        """Per-sample squared norm ``[B]`` of a measurement-space tensor (complex as 2 reals)."""
        v = torch.view_as_real(r) if r.is_complex() else r
        return v.reshape(v.shape[0], -1).pow(2).sum(1)


@dataclass(frozen=True)
class PosteriorSampler:
    """Base class of posterior samplers (see the module docstring).

    Subclasses implement :meth:`step` (and :meth:`init`, :meth:`finish` when they keep a
    state or return something else than the last iterate).
    """

    name: ClassVar[str] = "posterior-sampler"
    needs: ClassVar[tuple[str, ...]] = ()
    #: what the sampler asks of the operator beyond the capability flags, in words (shown
    #: by ``diffusolve restore --list``; its own :meth:`check` enforces it)
    requires: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    stochastic: ClassVar[bool] = True
    #: grid kind of the evaluation times (see :data:`diffusolve.process.GRIDS`)
    grid_kind: ClassVar[str] = "time_uniform"
    #: free options worth tuning, with the values the bench tries
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @property
    def rows_independent(self) -> bool:
        """Whether each output row depends only on its own measurement and noise seed, so
        that a batch run in pieces (with the pieces' per-sample seeds) gives the same rows;
        ``False`` for particle filters that pool the rows of a measurement (``pool=True``)."""
        return not bool(getattr(self, "pool", False))

    # ---------------------------------------------------------------- options
    def options(self) -> dict[str, Any]:
        """The options as a dict (``type(s)(**s.options()) == s``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> PosteriorSampler:
        """A copy with some options changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"{self.name} has no option {unknown[0]!r}; its options are "
                f"{sorted(self.options())}"
            )
        return dataclasses.replace(self, **changes)

    def search_space(self) -> dict[str, tuple[Any, ...]]:
        """The options worth tuning and the values to try."""
        return dict(self.SEARCH)

    def nfe(self, steps: int) -> int:
        """Network evaluations of a run with ``steps`` steps."""
        return int(steps)

    def _positive(self, **values: float) -> None:
        for k, v in values.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{self.name}: {k} must be a positive number; got {v!r}")

    def _count(self, **values: int) -> None:
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name}: {k} must be a positive int; got {v!r}")

    def _unit(self, **values: float) -> None:
        for k, v in values.items():
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ValueError(f"{self.name}: {k} must lie in [0, 1]; got {v!r}")

    # ---------------------------------------------------------------- contract
    def check(self, operator: Operator) -> None:
        """Refuse an operator that lacks what this sampler needs (a clear error)."""
        if not isinstance(operator, Operator):
            raise TypeError(
                f"{self.name} needs a diffusolve.inverse.Operator; got {type(operator).__name__}"
            )
        operator.require(*self.needs, method=self.name)

    def init(self, problem: Problem, x: Tensor) -> Any:
        """The state before the first step (default: none)."""
        return None

    def step(self, problem: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        """Move ``x`` from grid time ``i`` to ``i + 1`` (``i + 1 == n`` is the data)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def finish(self, problem: Problem, x: Tensor, state: Any) -> Tensor:
        """The result from the last iterate (default: the iterate itself, at sigma = 0)."""
        return x

    def times(self, process: Any, steps: int, operator: Operator, sigma_y: Tensor) -> Tensor:
        """The ``steps`` evaluation times (default: a :attr:`grid_kind` grid from ``t_max``
        to ``t_min`` with its last time dropped, since the last step goes to sigma = 0)."""
        return make_grid(process, steps, self.grid_kind)[:-1]

    def initial(self, problem: Problem, shape: tuple[int, ...], dtype, device) -> Tensor:
        """The starting state at ``t_0``: a sample of the process's prior at ``t_0``."""
        eps = problem.noise(shape, dtype=dtype, device=device)
        a, s = problem.alpha[0], problem.sigma[0]
        # x_t0 = alpha x0 + sigma eps with x0 unknown: the process prior at t_0 for data of
        # unit variance near the origin (alpha |x0| is small there for VP, VE, EDM and
        # rectified flow on such data; TDS importance-weights its start where it is not)
        return math.sqrt(a * a + s * s) * eps

    # ---------------------------------------------------------------- the loop
    def run(
        self,
        model: Any,
        operator: Operator,
        y: Tensor,
        sigma_y: float | Tensor = 0.0,
        *,
        steps: int = 100,
        x: Tensor | None = None,
        noise: NoiseSource | torch.Generator | Sequence[int] | int | None = None,
        grid: Tensor | None = None,
        cond: Any = None,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> Tensor:
        """Draw one posterior sample per measurement.

        Args:
            model: a :class:`~diffusolve.models.Denoiser` carrying its process.
            operator: the forward operator (checked against :attr:`needs`).
            y: ``[B, *operator.out_shape]`` measurements, one per sample (repeat one
                measurement to draw several samples of its posterior).
            sigma_y: the measurement noise std (a number or ``[B]``).
            steps: evaluation times (network evaluations for most samplers; see
                :meth:`nfe`).
            x: the starting state at ``t_0`` (default: a prior sample from ``noise``).
            noise: an int seed (per-sample seeds ``seed + i``: a sample's result does not
                depend on its batch), a list of seeds, a ``torch.Generator`` or ``None``.
            grid: explicit decreasing evaluation times (overrides ``steps``); the step
                from the last one goes to sigma = 0.
            cond: passed to every model call.
            dtype: compute dtype (default ``y``'s real dtype, or ``x``'s).
            progress: a tqdm bar (default: when stderr is a terminal).
            callback: called after every step with ``i``, ``t``, ``x``, ``x_next``, ``nfe``.
            stats: if given, filled with ``nfe`` and ``steps``.

        Returns:
            ``[B, *operator.in_shape]`` posterior samples.
        """
        self.check(operator)
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor; got {type(y).__name__}")
        operator._check(y, operator.out_shape, "y")
        batch = y.shape[0]
        if dtype is None:
            dtype = x.dtype if x is not None else (y.real.dtype if y.is_complex() else y.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point; got {dtype}")
        device = y.device
        process = model.process
        if grid is None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive int; got {steps!r}")
            times = self.times(
                process,
                steps,
                operator,
                _per_sample_sigma(sigma_y, batch, torch.float64, torch.device("cpu")),
            )
        else:
            times = torch.as_tensor(grid, dtype=torch.float64).flatten()
            if times.numel() == 1:
                times = times.clone()
            else:
                times = check_grid(process, times)
        noise_source = as_noise_source(noise, batch)
        y = y.to(device=device, dtype=_complex_like(dtype) if y.is_complex() else dtype)
        s_y = _per_sample_sigma(sigma_y, batch, dtype, device)
        problem = Problem(model, operator, y, s_y, times, noise_source, cond)
        shape = (batch, *operator.in_shape)
        if x is None:
            x = self.initial(problem, shape, dtype, device)
        else:
            if tuple(x.shape) != shape:
                raise ValueError(f"x must have shape {shape}; got {tuple(x.shape)}")
            x = x.to(device=device, dtype=dtype)
        state = self.init(problem, x)
        bar = None
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=problem.n, desc=self.name, unit="step", leave=False)
        try:
            for i in range(problem.n):
                x_next, state = self.step(problem, x, i, state)
                if not torch.all(torch.isfinite(x_next)):
                    raise FloatingPointError(
                        f"{self.name}: non-finite values at step {i} (t={float(times[i]):g}); "
                        "lower the step size or use float64"
                    )
                if callback is not None:
                    callback(
                        {
                            "i": i,
                            "t": float(times[i]),
                            "x": x,
                            "x_next": x_next,
                            "nfe": problem.nfe,
                            "state": state,
                        }
                    )
                x = x_next.detach()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(nfe=problem.nfe)
        finally:
            if bar is not None:
                bar.close()
        out = self.finish(problem, x, state).detach()
        if stats is not None:
            stats.update(nfe=problem.nfe, steps=problem.n, method=self.name)
        return out


def _complex_like(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
