"""DDIM (Song, Meng & Ermon 2021) and DDPM ancestral sampling (Ho, Jain & Abbeel 2020).

For ``x = alpha x0 + sigma eps`` and a step ``t -> t'`` with ``h = lambda' - lambda``:

    x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z,   s = eta sigma' sqrt(1 - exp(-2h))

``eta = 0`` is the deterministic DDIM step (the exact solution of the probability-flow ODE
when x0 is frozen over the step; first order). ``eta = 1`` draws from the forward
process's posterior ``q(x_t' | x_t, x0)``, which is DDPM's ancestral step for a VP process
(and, in ``x / alpha`` against ``sigma / alpha``, the Euler-ancestral step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BoundModel, Solver, StepContext, alias, check_positive, register

__all__ = ["DDIM"]


@register("ddim", eta=0.0)
@register(
    "ddpm",
    eta=1.0,
    citation="Ho, Jain & Abbeel, Denoising Diffusion Probabilistic Models, NeurIPS 2020",
)
@dataclass(frozen=True)
class DDIM(Solver):
    """DDIM with stochasticity ``eta`` (``eta=1``: DDPM ancestral). Order 1.

    Options:
        eta: 0 (deterministic DDIM) to 1 (DDPM ancestral); values above 1 are allowed
            (the noise level is capped at ``sigma'``).

    Paper defaults: ``eta = 0`` (DDIM), ``eta = 1`` (DDPM).

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> get_solver("ddpm").stochastic, get_solver("ddim").stochastic
        (True, False)
    """

    eta: float = 0.0
    citation = "Song, Meng & Ermon, Denoising Diffusion Implicit Models, ICLR 2021"
    SEARCH = {}

    def __post_init__(self) -> None:
        check_positive("eta", self.eta, allow_zero=True)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: None, ctx: StepContext
    ) -> tuple[Tensor, None]:
        a, s, lam = model.scalars(t)
        a1, s1, lam1 = model.scalars(t_next)
        x0 = model(x, t)
        if self.eta == 0:  # a1 x0 + s1 eps with eps = (x - a x0) / s, in two tensor ops
            return torch.add(x * (s1 / s), x0, alpha=a1 - s1 * a / s), None
        eps = (x - a * x0) / s
        std = min(self.eta * s1 * math.sqrt(-math.expm1(-2 * (lam1 - lam))), s1)
        z = ctx.noise(tuple(x.shape), dtype=x.dtype, device=x.device)
        det = math.sqrt(max(s1 * s1 - std * std, 0.0))
        return a1 * x0 + det * eps + std * z, None


alias(
    "euler_ancestral",
    "ddpm",
    "Euler-ancestral (eta = 1) is the DDPM ancestral step written in x / alpha against "
    "sigma / alpha; other eta: ddim with eta=...",
)
