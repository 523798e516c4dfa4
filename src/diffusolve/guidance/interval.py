"""Guidance in a limited interval (Kynkaanniemi, Aittala, Karras, Laine, Aila & Lehtinen,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in
Diffusion Models", NeurIPS 2024).

Classifier-free guidance at scale ``w`` only for noise levels ``sigma`` in
``(sigma_lo, sigma_hi]``, where ``sigma = sigma(t) / alpha(t)`` is the EDM noise level of the
process (``process.sigma_tilde``); the conditional model elsewhere, evaluated as one branch
(no doubled batch, no null-class call outside the interval).

Paper settings (EDM2, ImageNet-512, EDM sigma; their Table 1, as we read it): EDM2-S
``w = 2.1`` on ``(0.28, 2.9]``; EDM2-XXL ``w = 2.0`` on ``(0.19, 1.61]``. The defaults here are
EDM2-S's interval; they are stated for EDM2's latent space and have to be re-tuned for
another data scale (e.g. the digits model in ``diffusolve bench guidance``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import CFGRule, Guided, as_scale, per_sample

__all__ = ["IntervalRule", "IntervalGuidance", "EDM2_S_INTERVAL", "EDM2_XXL_INTERVAL"]

#: (sigma_lo, sigma_hi) reported for EDM2-S and EDM2-XXL on ImageNet-512
EDM2_S_INTERVAL = (0.28, 2.9)
EDM2_XXL_INTERVAL = (0.19, 1.61)


class IntervalRule(CFGRule):
    """CFG at ``scale`` where ``sigma_lo < sigma/alpha <= sigma_hi``, scale 1 elsewhere."""

    def __init__(self, scale: Any, sigma_lo: float = 0.28, sigma_hi: float = 2.9) -> None:
        self.scale = as_scale(scale)
        lo, hi = float(sigma_lo), float(sigma_hi)
        if not (0.0 <= lo < hi) or math.isnan(hi):
            raise ValueError(
                f"the interval must satisfy 0 <= sigma_lo < sigma_hi, got ({sigma_lo}, {sigma_hi}]"
            )
        self.sigma_lo, self.sigma_hi = lo, hi

    def inside(self, t: Tensor, process: Any) -> Tensor:
        """Whether the EDM noise level at ``t`` lies in ``(sigma_lo, sigma_hi]``."""
        s = process.sigma_tilde(t)
        return (s > self.sigma_lo) & (s <= self.sigma_hi)

    def weights(self, t: Tensor, b: int, process: Any) -> Any:
        inside = self.inside(t, process)
        if t.ndim == 0 and not isinstance(self.scale, Tensor):
            return self.scale if bool(inside) else 1.0
        return torch.where(
            per_sample(inside.to(torch.float64), b) > 0, per_sample(self.scale, b), 1.0
        )

    def __repr__(self) -> str:
        return f"IntervalRule(scale={self.scale}, sigma in ({self.sigma_lo:g}, {self.sigma_hi:g}])"


class IntervalGuidance(Guided):
    """CFG at ``scale`` only for EDM noise levels in ``(sigma_lo, sigma_hi]``.

    Args:
        model: the base denoiser.
        scale: the CFG scale inside the interval (float or per sample ``[B]``).
        sigma_lo, sigma_hi: the interval in EDM sigma (``sigma / alpha``); default EDM2-S's.
        null_cond: the unconditional input when the model does not know it.

    Example:
        >>> import torch
        >>> from diffusolve.guidance import IntervalGuidance
        >>> from diffusolve.models.analytic.conditional import ClassConditionalMixture
        >>> from diffusolve.process import vp_linear
        >>> m = ClassConditionalMixture.random(2, process=vp_linear(), seed=0)
        >>> g = IntervalGuidance(m, 3.0, sigma_lo=0.5, sigma_hi=2.0)
        >>> x = torch.randn(2, 2, dtype=torch.float64)
        >>> t_out = float(m.process.t_of_sigma_tilde(0.1))
        >>> torch.equal(g(x, t_out, 1), m(x, t_out, 1))
        True
    """

    def __init__(
        self,
        model: Any,
        scale: Any,
        *,
        sigma_lo: float = EDM2_S_INTERVAL[0],
        sigma_hi: float = EDM2_S_INTERVAL[1],
        null_cond: Any = None,
        terms: Any = (),
    ) -> None:
        super().__init__(model, IntervalRule(scale, sigma_lo, sigma_hi), terms, null_cond=null_cond)
