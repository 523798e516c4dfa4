"""RePaint: inpainting with unconditional denoising diffusion models (Lugmayr, Danelljan,
Romero, Yu, Timofte, Van Gool, CVPR 2022).

Each step moves the known and the unknown pixels to the next noise level separately and
joins them with the binary mask ``m`` of the :class:`~diffusolve.inverse.Inpainting`
operator:

    known   = alpha' y + sqrt(sigma'^2 - alpha'^2 sigma_y^2)_+ z1        (y noised to the next level)
    unknown = DDPM ancestral step from x0_hat = D(x_t)                  (DDIM with eta = 1)
    x_next  = m * known + (1 - m) * unknown

At the end (``sigma' = 0``) the known pixels are ``y`` and the unknown ones the last
estimate ``x0_hat``.

**Noisy measurements.** The paper treats noiseless inpainting. Here ``y`` is used as it is
(it is not denoised) and counts as data at the scale of its noise: the fresh noise added to
the known pixels is only what is missing to reach the level ``sigma'`` the next denoiser
call is told, ``sqrt(sigma'^2 - alpha'^2 sigma_y^2)``, and none once ``sigma'`` falls below
``alpha' sigma_y`` (the known pixels are then ``alpha' y`` and carry a little more noise than
told). So the output keeps the noisy ``y`` in the known region; with ``sigma_y = 0`` this is
the paper's rule.

**Resampling** (the paper's harmonisation). After reaching a level ``k`` with
``k = n - 1 - j`` for ``j = 0, jump_length, 2 jump_length, ... < n - jump_length`` (``n``
steps; level ``n`` is the data), the state is noised back ``jump_length`` levels with the
forward transition ``q(x_(k - jump_length) | x_k)`` and the ``jump_length`` steps are done
again, ``jump_n_sample - 1`` times. The paper uses ``jump_length = 10, jump_n_sample = 10``
with 250 steps; the default here is ``jump_n_sample = 1`` (no resampling), so a default run
costs ``steps`` evaluations and :meth:`RePaint.nfe` gives the cost with resampling.

Needs an :class:`~diffusolve.inverse.Inpainting` operator with a binary mask (it uses the
mask, not the operator's capabilities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..base import Operator
from ..pixel import Inpainting
from .base import PosteriorSampler, Problem, register
from .parts import ddim_move

__all__ = ["RePaint"]


@register
@dataclass(frozen=True)
class RePaint(PosteriorSampler):
    """Inpainting by joining the noised known pixels with the model's ancestral step.

    Args:
        jump_length: levels jumped back per resampling (default 10, the paper's).
        jump_n_sample: passes over each resampled stretch (default 1: no resampling; the
            paper uses 10, which costs about ``jump_n_sample`` times the evaluations).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting
        >>> from diffusolve.inverse.samplers import RePaint
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(4), torch.eye(4), process=ddpm())
        >>> op = Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]), (4,))
        >>> y = torch.tensor([[1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
        >>> x = RePaint().run(prior, op, y, 0.0, steps=20, noise=0)
        >>> torch.equal(x[:, :2], y[:, :2])  # noiseless: the known pixels are y
        True
        >>> RePaint(jump_n_sample=10).nfe(250)  # the paper's setting
        2410
    """

    jump_length: int = 10
    jump_n_sample: int = 1

    name: ClassVar[str] = "repaint"
    needs: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[str] = "a binary inpainting mask"
    citation: ClassVar[str] = (
        "Lugmayr, Danelljan, Romero, Yu, Timofte, Van Gool. RePaint: Inpainting using "
        "Denoising Diffusion Probabilistic Models. CVPR 2022."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "jump_n_sample": (1, 2, 5),
        "jump_length": (5, 10),
    }

    def __post_init__(self) -> None:
        for k in ("jump_length", "jump_n_sample"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"repaint: {k} must be a positive int; got {v!r}")

    # ---------------------------------------------------------------- contract
    def check(self, operator: Operator) -> None:
        super().check(operator)
        if not isinstance(operator, Inpainting):
            raise NotImplementedError(
                f"repaint needs an inpainting mask (an Inpainting operator), and "
                f"{operator.describe()} has none; for other operators use a general sampler "
                "(dps, pigdm, ddrm, ...)"
            )
        mask = operator.mask
        if not bool(torch.all((mask == 0) | (mask == 1))):
            raise NotImplementedError(
                "repaint needs a binary inpainting mask (1 = known, 0 = unknown); this "
                "Inpainting operator has soft weights"
            )

    def jump_levels(self, steps: int) -> list[int]:
        """Levels (grid indices) after which the state is noised back and redone."""
        return [steps - 1 - j for j in range(0, steps - self.jump_length, self.jump_length)]

    def nfe(self, steps: int) -> int:
        extra = (self.jump_n_sample - 1) * self.jump_length * len(self.jump_levels(steps))
        return int(steps) + extra

    # ---------------------------------------------------------------- the step
    def init(self, p: Problem, x: Tensor) -> Any:
        mask = p.operator.mask.to(dtype=x.dtype, device=x.device)
        return mask, set(self.jump_levels(p.n)) if self.jump_n_sample > 1 else set()

    def _move(self, p: Problem, x: Tensor, i: int, mask: Tensor) -> Tensor:
        x0 = p.denoise(x, i)
        unknown = ddim_move(p, x, x0, i, 1.0)
        a_s, s_s = p.alpha[i + 1], p.sigma[i + 1]
        known = a_s * p.y
        add = torch.clamp(s_s * s_s - (a_s * p.sigma_y) ** 2, min=0.0).sqrt()
        if s_s > 0.0:
            known = known + p.col(add, x) * p.randn(x)
        return mask * known + (1 - mask) * unknown

    def _noise_back(self, p: Problem, x: Tensor, k: int, j: int) -> Tensor:
        """A draw of ``q(x_j | x_k)`` (level ``j`` noisier than ``k``)."""
        r = p.alpha[j] / p.alpha[k]
        var = p.sigma[j] ** 2 - (r * p.sigma[k]) ** 2
        return r * x + math.sqrt(max(var, 0.0)) * p.randn(x)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        mask, jumps = state
        x = self._move(p, x, i, mask)
        k = i + 1
        if k in jumps:
            for _ in range(self.jump_n_sample - 1):
                x = self._noise_back(p, x, k, k - self.jump_length)
                for j in range(k - self.jump_length, k):
                    x = self._move(p, x, j, mask)
        return x, state
