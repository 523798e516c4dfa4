"""DDIM (Song, Meng & Ermon 2021) and DDPM ancestral sampling (Ho, Jain & Abbeel 2020).

For ``x = alpha x0 + sigma eps`` and a step ``t -> t'`` with ``h = lambda' - lambda``:

    x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z,   s = eta sigma' sqrt(1 - exp(-2h))

``eta = 0`` is the deterministic DDIM step (the exact solution of the probability-flow ODE
when x0 is frozen over the step; first order). ``eta = 1`` draws from the forward
process's posterior ``q(x_t' | x_t, x0)``, which is DDPM's ancestral step for a VP process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import BoundModel, Solver, coef, register

__all__ = ["DDIM"]


@register("ddim", eta=0.0)
@register(
    "ddpm",
    eta=1.0,
    citation="Ho, Jain & Abbeel, Denoising Diffusion Probabilistic Models, NeurIPS 2020",
)
class DDIM(Solver):
    """DDIM with stochasticity ``eta`` (``eta=1``: DDPM ancestral). Order 1.

    Paper defaults: ``eta = 0`` (DDIM), ``eta = 1`` (DDPM).
    """

    order = 1
    citation = "Song, Meng & Ermon, Denoising Diffusion Implicit Models, ICLR 2021"

    def __init__(self, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0  # type: ignore[misc]

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        p = model.process
        x0 = model(x, t)
        a, s = p.alpha(t), p.sigma(t)
        a1, s1 = p.alpha(t_next), p.sigma(t_next)
        eps = (x - coef(a, x) * x0) / coef(s, x)
        if self.eta == 0:
            return coef(a1, x) * x0 + coef(s1, x) * eps, state
        h = p.lam(t_next) - p.lam(t)
        std = self.eta * s1 * torch.sqrt(-torch.expm1(-2 * h))
        std = torch.minimum(std, s1)
        z = state["noise"](tuple(x.shape), dtype=x.dtype, device=x.device)
        det = torch.sqrt(torch.clamp(s1 * s1 - std * std, min=0.0))
        return coef(a1, x) * x0 + coef(det, x) * eps + coef(std, x) * z, state
