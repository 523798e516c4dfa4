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
from typing import Any

import torch
from torch import Tensor

from .base import BoundModel, Solver, register

__all__ = ["Euler", "Heun"]


class _EDMBase(Solver):
    natural_grid = "karras"  # EDM (rho = 7)
    citation = "Karras, Aittala, Aila & Laine, Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022"

    def __init__(
        self,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        if s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn}")
        self.s_churn = float(s_churn)
        self.s_tmin = float(s_tmin)
        self.s_tmax = float(s_tmax)
        self.s_noise = float(s_noise)
        self.stochastic = self.s_churn > 0  # type: ignore[misc]

    def _churn(self, model: BoundModel, x: Tensor, t: Tensor, state: dict[str, Any]):
        """Return ``(x_tilde_hat, s_hat, t_hat)`` after optional churn."""
        p = model.process
        s = p.sigma_tilde(t)
        xt = x / float(p.alpha(t))
        if self.s_churn == 0 or not (self.s_tmin <= float(s) <= self.s_tmax):
            return xt, s, t
        gamma = min(self.s_churn / state["n"], math.sqrt(2) - 1)
        s_hat = s * (1 + gamma)
        z = state["noise"](tuple(x.shape), dtype=x.dtype, device=x.device)
        xt = xt + float(torch.sqrt(s_hat**2 - s**2)) * self.s_noise * z
        return xt, s_hat, p.t_of_sigma_tilde(s_hat)

    @staticmethod
    def _d(model: BoundModel, xt: Tensor, s: Tensor, t: Tensor) -> Tensor:
        a = float(model.process.alpha(t))
        return (xt - model(a * xt, t)) / float(s)


@register("euler")
class Euler(_EDMBase):
    """Euler on the EDM ODE (equal to DDIM without churn). Order 1, one evaluation per step."""

    order = 1

    def step(self, model, x, t, t_next, state):
        p = model.process
        xt, s, t_hat = self._churn(model, x, t, state)
        s1 = p.sigma_tilde(t_next)
        xt1 = xt + float(s1 - s) * self._d(model, xt, s, t_hat)
        return xt1 * float(p.alpha(t_next)), state


@register("heun")
class Heun(_EDMBase):
    """Heun's method on the EDM ODE (EDM Algorithms 1 and 2). Order 2, two evaluations per step.

    Paper defaults for stochastic sampling (ImageNet-64): ``s_churn=40, s_tmin=0.05,
    s_tmax=50, s_noise=1.003``; deterministic (``s_churn=0``) by default.
    """

    order = 2
    evals_per_step = 2

    def step(self, model, x, t, t_next, state):
        p = model.process
        xt, s, t_hat = self._churn(model, x, t, state)
        s1 = p.sigma_tilde(t_next)
        d = self._d(model, xt, s, t_hat)
        xe = xt + float(s1 - s) * d
        d1 = self._d(model, xe, s1, t_next)
        xt1 = xt + float(s1 - s) * 0.5 * (d + d1)
        return xt1 * float(p.alpha(t_next)), state
