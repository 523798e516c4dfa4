"""Loss (universal / forward) guidance (Bansal et al., "Universal Guidance for Diffusion
Models", CVPR Workshops 2023, forward guidance; reward-style guidance in general).

For a differentiable ``loss(x0_hat, cond) -> [B]`` (lower is better) the guided score is
``score - s * grad_x loss(x0_hat(x))``, i.e. the x0 shift

    through_denoiser=True:   x0 <- x0 - s * sigma^2 / alpha * grad_x loss(x0_hat(x))

with autograd through the denoiser (forward guidance as published; one extra backward pass
through the network, still one forward call shared with every other term). With
``through_denoiser=False`` the denoiser's Jacobian ``d x0_hat / d x`` is replaced by ``I / alpha``
(its limit as ``sigma -> 0`` for data with full-dimensional support):

    through_denoiser=False:  x0 <- x0 - s * (sigma / alpha)^2 * grad_{x0} loss(x0_hat)

(no backward pass through the network; what EluCD-style methods use).

Exact check (tested): for a Gaussian prior ``N(m, C)`` the Jacobian is
``alpha C_post / sigma^2`` with ``C_post = (C^-1 + alpha^2/sigma^2 I)^-1``, so forward guidance
gives ``x0_hat - s C_post grad loss(x0_hat)``; for a quadratic loss ``|x0 - c|^2 / (2 rho^2)``
the exact x0 of the tilted prior ``p(x0) exp(-s loss(x0))`` is
``x0_hat - (s / rho^2) C_post (I + s C_post / rho^2)^-1 (x0_hat - c)``: the two agree to
first order in ``s / rho^2`` (and as ``sigma -> 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Evaluation, GuidanceTerm, Guided, as_scale, per_sample

__all__ = ["LossTerm", "LossGuidance"]


class LossTerm(GuidanceTerm):
    """The x0 shift of loss guidance; see the module docstring.

    Args:
        loss: ``loss(x0_hat, cond) -> Tensor[B]`` (differentiable; lower is better).
        scale: ``s >= 0`` (float or per sample ``[B]``).
        through_denoiser: differentiate through the denoiser (forward guidance) or take the
            gradient with respect to ``x0_hat`` (identity-Jacobian approximation).
    """

    def __init__(self, loss: Any, scale: Any = 1.0, *, through_denoiser: bool = False) -> None:
        if not callable(loss):
            raise TypeError("loss must be callable: loss(x0_hat, cond) -> Tensor[B]")
        self.loss = loss
        self.scale = as_scale(scale)
        self.through_denoiser = bool(through_denoiser)
        self.needs_graph = self.through_denoiser

    def _values(self, x0: Tensor, cond: Any) -> Tensor:
        value = self.loss(x0, cond)
        if not isinstance(value, Tensor) or value.shape != (x0.shape[0],):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss must return one value per sample [B], got {shape}")
        return value

    def shift(self, ev: Evaluation) -> Tensor:
        b = ev.batch
        a, s = ev.alpha_sigma()
        if self.through_denoiser:
            if ev.x_graph is None:
                raise RuntimeError("through_denoiser needs an evaluation with a graph (use Guided)")
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(
                    self._values(ev.x0, ev.cond).sum(), ev.x_graph, retain_graph=True
                )
            coef = s * s / a
        else:
            x0r = ev.x0.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self._values(x0r, ev.cond).sum(), x0r)
            coef = (s / a) ** 2
        return ev.rows(-per_sample(self.scale, b) * coef) * grad.to(ev.x.dtype)

    def __repr__(self) -> str:
        return f"LossTerm(scale={self.scale}, through_denoiser={self.through_denoiser})"


class LossGuidance(Guided):
    """Loss guidance on ``model``: ``LossTerm(loss, scale, through_denoiser)`` on top of the
    base estimate at CFG scale ``cfg`` (1: conditional).

    Example:
        >>> import torch
        >>> from diffusolve.guidance import LossGuidance
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> prior = Gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), process=vp_linear())
        >>> g = LossGuidance(prior, lambda x0, c: (x0 ** 2).sum(1), 1.0, through_denoiser=True)
        >>> g(torch.ones(3, 2, dtype=torch.float64), 0.5).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        model: Any,
        loss: Any,
        scale: Any = 1.0,
        *,
        through_denoiser: bool = False,
        cfg: Any = 1.0,
        null_cond: Any = None,
    ) -> None:
        term = LossTerm(loss, scale, through_denoiser=through_denoiser)
        super().__init__(model, cfg, [term], null_cond=null_cond)
