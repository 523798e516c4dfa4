"""Rectified-flow inversion: the flow ODE run backwards, and RF-Inversion's controlled ODEs.

**"rf"**: the probability-flow ODE in time, ``dx/dt = v(x, t) = alpha'(t) x0 + sigma'(t)
eps`` (for rectified flow ``x = (1 - t) x0 + t eps``, ``v = eps - x0 = (x - x0) / t``),
integrated up the grid by explicit Euler (first order), Heun (trapezoidal
predictor-corrector) or the midpoint rule (both second order), and reconstructed down the
grid by the same scheme. The round trip is not exact: its error falls as ``h`` (Euler) or
``h^2`` (Heun, midpoint). It runs on any process; it is meant for flows, whose ODE is
nearly straight in ``t``.

**"rf_inversion"** (Rout, Chen, Ruiz, Kumar, Caramanis, Shakkottai, Chu, ICLR 2025):
controlled ODEs on rectified flow. Inversion (data to noise), with ``y1 ~ N(0, I)``
seeded:

    Y <- Y + h [v(Y, t) + gamma ((y1 - Y) / (1 - t) - v(Y, t))],   h = t_up - t > 0,

(``(y1 - Y) / (1 - t)`` is the velocity of the straight line from ``Y`` at ``t`` to
``y1`` at ``t = 1``; ``gamma = 0`` is plain Euler inversion, ``gamma = 1`` lands on
``y1``). Reconstruction (noise to data), with ``y0`` the inverted data:

    X <- X + (t_next - t) [v(X, t) + eta_i ((X - y0) / t - v(X, t))],

``eta_i = eta`` for the steps ``start <= i < stop`` (``start = int(eta_start n)``,
``stop = min(int(eta_stop n), n)``) and 0 elsewhere. ``(X - y0) / t`` is the velocity of
the straight line to ``y0`` at ``t = 0``. The formulas assume ``x_t = (1 - t) x0 + t eps``,
so other processes are refused. Defaults as in the paper's Flux setting: ``gamma = 0.5``;
``eta = 0.9``, ``eta_start = 0``, ``eta_stop = 0.25`` (7 of 28 steps). ``aux["data"]`` keeps
``y0``. Editing: ``reconstruct(model, inv, cond=target)`` steers the target's flow towards
the input for the first steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..process import Process
from ..solvers.base import BoundModel
from .base import Inversion, Inverter, register
from .ddcm import _check_seed, _noise
from .fixed_point import Steps, _check_pos

__all__ = ["RFInversion", "RFControlledInversion", "velocity"]

_SCHEMES = ("euler", "heun", "midpoint")


class _Velocity:
    """``v(x, t) = alpha'(t) x0 + sigma'(t) (x - alpha(t) x0) / sigma(t)`` from the bound
    denoiser, with the process derivatives cached per time."""

    def __init__(self, bound: BoundModel) -> None:
        self.bound = bound
        self._d: dict[float, tuple[float, float]] = {}

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        key = float(t)
        d = self._d.get(key)
        p = self.bound.process
        if d is None:
            d = (float(p.d_alpha(t)), float(p.d_sigma(t)))
            self._d[key] = d
        a, s, _ = self.bound.scalars(t)
        x0 = self.bound(x, t)
        return d[0] * x0 + d[1] * (x - a * x0) / s


def velocity(model: Any, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
    """The flow velocity ``dx/dt`` of ``model`` at ``(x, t)`` (from its x0 estimate)."""
    from ..process import as_time

    return _Velocity(BoundModel(model, cond))(x, as_time(t))


def _ode_step(v: _Velocity, x: Tensor, t: Tensor, t_next: Tensor, scheme: str) -> Tensor:
    h = float(t_next) - float(t)
    v1 = v(x, t)
    if scheme == "euler":
        return x + h * v1
    if scheme == "heun":
        v2 = v(x + h * v1, t_next)
        return x + 0.5 * h * (v1 + v2)
    t_mid = torch.as_tensor(0.5 * (float(t) + float(t_next)), dtype=torch.float64)
    return x + h * v(x + 0.5 * h * v1, t_mid)


@register
@dataclass(frozen=True)
class RFInversion(Inverter):
    """The flow ODE integrated backwards (up the grid) and forwards (see the module doc).

    Args:
        scheme: ``"euler"`` (1 evaluation per step, first order), ``"heun"`` or
            ``"midpoint"`` (2 evaluations per step, second order).

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import rectified_flow
        >>> prior = Gaussian(torch.zeros(2), torch.tensor([0.3, 2.0]), process=rectified_flow())
        >>> x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
        >>> inv = invert(prior, x, 50, "rf", scheme="heun")
        >>> float((reconstruct(prior, inv) - x).abs().max()) < 1e-3
        True
    """

    name: ClassVar[str] = "rf"
    citation: ClassVar[str] = (
        "Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with "
        "Rectified Flow. ICLR 2023."
    )

    scheme: str = "euler"

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {_SCHEMES}, got {self.scheme!r}")

    def _solve(
        self, model: Any, x: Tensor, grid: Tensor, cond: Any, up: bool, progress: Any, callback: Any
    ) -> tuple[Tensor, int]:
        bound = BoundModel(model, cond, grid)
        v = _Velocity(bound)
        steps = Steps(grid, up=up, desc=self.name, progress=progress, callback=callback)
        for i, t, t_next in steps:
            x_next = _ode_step(v, x, t, t_next, self.scheme)
            steps.report(i, x, x_next, bound.nfe)
            x = x_next
        return x, bound.nfe

    def invert(
        self,
        model: Any,
        x: Tensor,
        grid: Tensor,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Inversion:
        latent, nfe = self._solve(model, x, grid, cond, True, progress, callback)
        return Inversion(latent, grid, self, cond=cond, nfe=nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        return self._solve(
            model, inversion.latent, inversion.grid, cond, False, progress, callback
        )[0]


def _check_linear(process: Process, grid: Tensor, method: str) -> None:
    """Refuse processes that are not ``x_t = (1 - t) x0 + t eps`` on the grid."""
    a, s = process.alpha(grid), process.sigma(grid)
    if not (torch.allclose(a, 1 - grid, atol=1e-9) and torch.allclose(s, grid, atol=1e-9)):
        raise ValueError(
            f"{method} needs the rectified-flow process x_t = (1 - t) x0 + t eps (its controls "
            "are straight-line velocities in t); this model's process is "
            f"{process.name!r}. Use diffusolve.process.rectified_flow(), or method='rf' (the "
            "plain flow ODE), which runs on any process."
        )


@register
@dataclass(frozen=True)
class RFControlledInversion(Inverter):
    """RF-Inversion: controlled forward and reverse ODEs on rectified flow (equations in
    the module docstring), Euler steps, 1 evaluation per step.

    Args:
        gamma: the inversion's pull towards the noise sample ``y1``, in ``[0, 1]``
            (paper: 0.5; 0 is plain Euler inversion).
        eta: the reconstruction's pull towards the input ``y0``, in ``[0, 1]`` (paper: 0.9).
        eta_start, eta_stop: the fraction of the reconstruction steps during which ``eta``
            acts (paper: 0 and 0.25).
        seed: the seed of ``y1``.

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import rectified_flow
        >>> prior = Gaussian(torch.zeros(2), torch.tensor([0.3, 2.0]), process=rectified_flow())
        >>> x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
        >>> inv = invert(prior, x, 28, "rf_inversion")
        >>> reconstruct(prior, inv).shape
        torch.Size([1, 2])
    """

    name: ClassVar[str] = "rf_inversion"
    citation: ClassVar[str] = (
        "Rout, Chen, Ruiz, Kumar, Caramanis, Shakkottai, Chu. Semantic Image Inversion and "
        "Editing using Rectified Stochastic Differential Equations. ICLR 2025."
    )

    gamma: float = 0.5
    eta: float = 0.9
    eta_start: float = 0.0
    eta_stop: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("gamma", "eta", "eta_start", "eta_stop"):
            value = getattr(self, name)
            _check_pos(name, value, zero=True)
            if value > 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.eta_start > self.eta_stop:
            raise ValueError(
                f"eta_start must not exceed eta_stop, got {self.eta_start} > {self.eta_stop}"
            )
        _check_seed(self.seed)

    def invert(
        self,
        model: Any,
        x: Tensor,
        grid: Tensor,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Inversion:
        _check_linear(model.process, grid, self.name)
        bound = BoundModel(model, cond, grid)
        v = _Velocity(bound)
        y1 = _noise(self.seed, 0, x)
        steps = Steps(grid, up=True, desc=self.name, progress=progress, callback=callback)
        y = x
        for i, t, t_up in steps:
            tf = float(t)
            u = v(y, t)
            if self.gamma:
                u = u + self.gamma * ((y1 - y) / (1.0 - tf) - u)
            y_next = y + (float(t_up) - tf) * u
            steps.report(i, y, y_next, bound.nfe)
            y = y_next
        return Inversion(y, grid, self, cond=cond, aux={"data": x}, nfe=bound.nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        grid = inversion.grid
        _check_linear(model.process, grid, self.name)
        y0 = inversion.aux.get("data")
        if not isinstance(y0, Tensor):
            raise ValueError(
                "this inversion has no data (aux['data']); invert with method='rf_inversion'"
            )
        y0 = y0.to(inversion.latent)
        bound = BoundModel(model, cond, grid)
        v = _Velocity(bound)
        steps = Steps(grid, up=False, desc=self.name, progress=progress, callback=callback)
        n = len(steps)
        start, stop = int(self.eta_start * n), min(int(self.eta_stop * n), n)
        x = inversion.latent
        for i, t, t_next in steps:
            tf = float(t)
            u = v(x, t)
            if start <= i < stop and self.eta:
                u = u + self.eta * ((x - y0) / tf - u)
            x_next = x + (float(t_next) - tf) * u
            steps.report(i, x, x_next, bound.nfe)
            x = x_next
        return x
