"""Rescaled classifier-free guidance (Lin, Liu, Li & Yang, "Common Diffusion Noise Schedules
and Sample Steps are Flawed", WACV 2024, Sec. 3.4 and Alg. 2).

With ``pos`` the conditional and ``cfg = neg + w (pos - neg)`` the guided prediction, per
sample (standard deviation over all non-batch dimensions)

    rescaled = cfg * std(pos) / std(cfg),     out = phi * rescaled + (1 - phi) * cfg,

``phi = 0.7`` (the paper's default). The paper's model is a v-prediction network and the
rescale acts on its output, so ``space="v"`` (the default) is the paper's choice; ``"eps"``
and ``"x0"`` rescale those parameterisations instead (converted through
:mod:`diffusolve.process.param` at the evaluation's ``(x, t)``). CFG is affine with the same
``x`` coefficient in every space, but the rescale is not: the three spaces give different
samples. ``phi = 0`` is plain CFG.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..process.param import from_x0, to_x0
from .base import CFGRule, Guided, _rows, as_scale, per_sample

__all__ = ["RescaledRule", "RescaledCFG", "rescale_std"]

SPACES = {"eps": "epsilon", "v": "v", "x0": "x0"}


def rescale_std(pos: Tensor, cfg: Tensor, phi: Any) -> Tensor:
    """``phi * cfg * std(pos) / std(cfg) + (1 - phi) * cfg``, std per sample over all
    non-batch dimensions (``phi`` float or ``[B]``). A row where ``cfg`` is constant keeps
    ``cfg``."""
    dims = tuple(range(1, cfg.ndim))
    sp = pos.std(dim=dims, keepdim=True)
    sc = cfg.std(dim=dims, keepdim=True)
    ratio = sp / sc.where(sc > 0, sc.new_ones(()))
    ratio = ratio.where(sc > 0, ratio.new_ones(()))
    phi_r = _rows(per_sample(phi, cfg.shape[0]), cfg)
    return cfg * (phi_r * ratio + (1 - phi_r))


class RescaledRule(CFGRule):
    """CFG at ``scale`` followed by the std rescale with ``phi`` in ``space``."""

    def __init__(self, scale: Any, phi: Any = 0.7, space: str = "v") -> None:
        self.scale = as_scale(scale)
        self.phi = as_scale(phi, name="phi", high=1.0)
        if space not in SPACES:
            raise ValueError(f"space must be one of {tuple(SPACES)}, got {space!r}")
        self.space = space

    def combine(
        self,
        x: Tensor,
        t: Tensor,
        x0_c: Tensor,
        x0_u: Tensor,
        w: Any,
        process: Any,
        rows: Any = None,
    ) -> Tensor:
        cfg = super().combine(x, t, x0_c, x0_u, w, process, rows)
        kind = SPACES[self.space]
        phi = self.phi
        if isinstance(phi, Tensor) and phi.numel() > 1 and rows is not None:
            phi = phi[rows.to(phi.device)]
        pos = from_x0(process, x, t, x0_c, kind)
        out = rescale_std(pos, from_x0(process, x, t, cfg, kind), phi)
        return to_x0(process, x, t, out, kind)

    def __repr__(self) -> str:
        return f"RescaledRule(scale={self.scale}, phi={self.phi}, space={self.space!r})"


class RescaledCFG(Guided):
    """Rescaled CFG (Lin et al. 2024): CFG at ``scale``, then the std rescale with ``phi``
    (default 0.7) in ``space`` (``"v"`` default, the paper's; ``"eps"``, ``"x0"``).

    Example:
        >>> import torch
        >>> from diffusolve.guidance import RescaledCFG, Guided
        >>> from diffusolve.models.analytic.conditional import ClassConditionalMixture
        >>> from diffusolve.process import vp_linear
        >>> m = ClassConditionalMixture.random(3, process=vp_linear(), seed=0)
        >>> x = torch.randn(2, 3, dtype=torch.float64)
        >>> torch.allclose(RescaledCFG(m, 4.0, phi=0.0)(x, 0.5, 1), Guided(m, 4.0)(x, 0.5, 1))
        True
    """

    def __init__(
        self,
        model: Any,
        scale: Any,
        *,
        phi: Any = 0.7,
        space: str = "v",
        null_cond: Any = None,
        terms: Any = (),
    ) -> None:
        super().__init__(model, RescaledRule(scale, phi, space), terms, null_cond=null_cond)
