"""Euler and Heun on the EDM form of the probability-flow ODE (Karras et al. 2022).

With ``x~ = x / alpha`` and ``s = sigma / alpha`` the probability-flow ODE of every process
is ``dx~/ds = (x~ - D(x~, s)) / s`` (EDM eq. 3 with scaling). Euler on this ODE equals
DDIM; Heun (EDM Algorithm 1) is second order with two evaluations per step. Both support
EDM's stochastic churn (Algorithm 2): before a step, noise is added to raise ``s`` to
``s_hat = s (1 + gamma)``, ``gamma = min(s_churn / N, sqrt(2) - 1)`` for ``s`` in
``[s_tmin, s_tmax]``, with noise scale ``s_noise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .base import BoundModel, Solver, StepContext, check_positive, register

__all__ = ["Euler", "Heun"]

KARRAS_2022 = (
    "Karras, Aittala, Aila & Laine, Elucidating the Design Space of Diffusion-Based "
    "Generative Models, NeurIPS 2022"
)


@dataclass(frozen=True)
class _EDMBase(Solver):
    """Options shared by Euler and Heun: EDM's churn ``s_churn, s_tmin, s_tmax, s_noise``."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    natural_grid = "karras"  # EDM (rho = 7)
    citation = KARRAS_2022

    def __post_init__(self) -> None:
        check_positive("s_churn", self.s_churn, allow_zero=True)
        check_positive("s_tmin", self.s_tmin, allow_zero=True)
        if not self.s_tmax >= self.s_tmin:
            raise ValueError(f"s_tmax must be >= s_tmin, got {self.s_tmax} < {self.s_tmin}")
        check_positive("s_noise", self.s_noise)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.s_churn > 0

    def _churn(
        self, model: BoundModel, x: Tensor, t: Tensor, ctx: StepContext
    ) -> tuple[Tensor, float, Tensor]:
        """``(x~_hat, s_hat, t_hat)`` after optional churn."""
        a, _, lam = model.scalars(t)
        s = math.exp(-lam)
        xt = x / a
        if self.s_churn == 0 or not (self.s_tmin <= s <= self.s_tmax):
            return xt, s, t
        gamma = min(self.s_churn / ctx.n, math.sqrt(2) - 1)
        s_hat = s * (1 + gamma)
        z = ctx.noise(tuple(x.shape), dtype=x.dtype, device=x.device)
        xt = xt + math.sqrt(s_hat**2 - s**2) * self.s_noise * z
        return xt, s_hat, model.process.t_of_sigma_tilde(s_hat)

    @staticmethod
    def _d(model: BoundModel, xt: Tensor, s: float, t: Tensor) -> Tensor:
        a = model.scalars(t)[0]
        return (xt - model(a * xt, t)) / s


@register("euler")
@dataclass(frozen=True)
class Euler(_EDMBase):
    """Euler on the EDM ODE (equal to DDIM without churn). Order 1, one evaluation per step.

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> get_solver("euler", s_churn=10.0).stochastic
        True
    """

    order = 1

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: None, ctx: StepContext
    ) -> tuple[Tensor, None]:
        xt, s, t_hat = self._churn(model, x, t, ctx)
        a1, _, lam1 = model.scalars(t_next)
        xt1 = xt + (math.exp(-lam1) - s) * self._d(model, xt, s, t_hat)
        return xt1 * a1, None


@register("heun")
@dataclass(frozen=True)
class Heun(_EDMBase):
    """Heun's method on the EDM ODE (EDM Algorithms 1 and 2). Order 2, two evaluations per step.

    Paper defaults for stochastic sampling (ImageNet-64): ``s_churn=40, s_tmin=0.05,
    s_tmax=50, s_noise=1.003``; deterministic (``s_churn=0``) by default.

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> get_solver("heun").nfe(10)
        20
    """

    order = 2
    evals_per_step = 2

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: None, ctx: StepContext
    ) -> tuple[Tensor, None]:
        xt, s, t_hat = self._churn(model, x, t, ctx)
        a1, _, lam1 = model.scalars(t_next)
        s1 = math.exp(-lam1)
        d = self._d(model, xt, s, t_hat)
        xe = xt + (s1 - s) * d
        d1 = self._d(model, xe, s1, t_next)
        xt1 = xt + (s1 - s) * 0.5 * (d + d1)
        return xt1 * a1, None
