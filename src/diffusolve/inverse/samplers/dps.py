"""DPS: diffusion posterior sampling (Chung, Kim, McCann, Klasky, Ye, ICLR 2023).

Each step evaluates the denoiser once, keeping its graph, moves with DDIM/DDPM from the
estimate, then follows the gradient of the residual norm through the network:

    x0_hat = D(x_t),   x' = move(x_t, x0_hat),   x_next = x' - zeta * grad_(x_t) ||y - A(x0_hat)||

The norm is **not squared** (the paper's step ``zeta / ||y - A x0_hat||`` on the gradient of
the squared norm, up to its factor 2) and is taken **per sample**, so a sample's step never
depends on the batch (the official code takes it over the whole batch). ``zeta`` is the same
at every step, as in the paper: it is a per-step size, so a run with fewer steps pulls less
in total and needs a larger ``zeta`` (the bench tunes it per step count).

Needs gradients through ``A`` only (any differentiable operator, linear or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import ddim_move

__all__ = ["DPS"]


@register
@dataclass(frozen=True)
class DPS(PosteriorSampler):
    """Diffusion posterior sampling.

    Args:
        zeta: step size of the residual-norm gradient (default 1.0, the paper's value for
            most FFHQ tasks at 1000 steps).
        eta: DDIM stochasticity of the move (default 1.0: the DDPM ancestral step of the
            paper).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting, random_pixel_mask
        >>> from diffusolve.inverse.samplers import DPS
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(4), torch.eye(4), process=ddpm())
        >>> op = Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]), (4,))
        >>> y = torch.tensor([[1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
        >>> DPS().run(prior, op, y, 0.05, steps=20, noise=0).shape
        torch.Size([1, 4])
    """

    zeta: float = 1.0
    eta: float = 1.0

    name: ClassVar[str] = "dps"
    needs: ClassVar[tuple[str, ...]] = ("grad",)
    citation: ClassVar[str] = (
        "Chung, Kim, McCann, Klasky, Ye. Diffusion Posterior Sampling for General Noisy "
        "Inverse Problems. ICLR 2023."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "zeta": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    }

    def __post_init__(self) -> None:
        self._positive(zeta=self.zeta)
        self._unit(eta=self.eta)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        xg, x0 = p.denoise_with_grad(x, i)
        with torch.enable_grad():
            norm = p.sq_norm(p.residual(x0)).sqrt()
            (grad,) = torch.autograd.grad(norm.sum(), xg)
        x0 = x0.detach()
        moved = ddim_move(p, x, x0, i, self.eta)
        return moved - self.zeta * grad, state
