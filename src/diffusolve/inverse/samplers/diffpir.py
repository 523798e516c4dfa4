"""DiffPIR: denoising diffusion models for plug-and-play image restoration (Zhu, Zhang,
Liang, Cao, Wen, Timofte, Van Gool, CVPR Workshops 2023).

Each step solves the data subproblem around the clean estimate in closed form (the
operator's prox: SVD, FFT or conjugate gradients),

    x0_y = argmin_x ||y - A x||^2 + rho_t ||x - x0_hat||^2,   rho_t = lambda sigma_y^2 / st^2

(``st = sigma_t / alpha_t``; ``gamma = 1 / rho_t`` in :meth:`Operator.prox`; with
``sigma_y = 0`` the solution is the least-squares projection), then re-noises:

    x_next = alpha' x0_y + sigma' (sqrt(1 - zeta) eps_hat + sqrt(zeta) z),
    eps_hat = (x_t - alpha_t x0_y) / sigma_t.

Needs a linear operator (for the prox).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import eps_of, project

__all__ = ["DiffPIR"]


@register
@dataclass(frozen=True)
class DiffPIR(PosteriorSampler):
    """Plug-and-play restoration with a diffusion denoiser.

    Args:
        lambda_: weight of the prior term in ``rho_t`` (default 7.0).
        zeta: share of fresh noise in the re-noising (default 0.1).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Blur, gaussian_kernel
        >>> from diffusolve.inverse.samplers import DiffPIR
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(16), torch.eye(16), process=ddpm(), shape=(1, 4, 4))
        >>> op = Blur(gaussian_kernel(1.0, size=3), (1, 4, 4))
        >>> y = op(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
        >>> DiffPIR().run(prior, op, y, 0.05, steps=10, noise=0).shape
        torch.Size([1, 1, 4, 4])
    """

    lambda_: float = 7.0
    zeta: float = 0.1

    name: ClassVar[str] = "diffpir"
    needs: ClassVar[tuple[str, ...]] = ("prox",)
    citation: ClassVar[str] = (
        "Zhu, Zhang, Liang, Cao, Wen, Timofte, Van Gool. Denoising Diffusion Models for "
        "Plug-and-Play Image Restoration. CVPR Workshops 2023."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "lambda_": (0.3, 1.0, 3.0, 7.0, 20.0),
        "zeta": (0.0, 0.1, 0.3, 0.6, 1.0),
    }

    def __post_init__(self) -> None:
        self._positive(lambda_=self.lambda_)
        self._unit(zeta=self.zeta)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        x0 = p.denoise(x, i)
        st = p.st(i)
        sy2 = p.sigma_y.to(torch.float64) ** 2
        if math.isinf(st):
            x0_y = x0  # rho = 0 at infinite noise: the prior term vanishes... keep x0
            gamma = None
        else:
            gamma = (st * st) / (self.lambda_ * sy2)  # inf where sigma_y = 0
        if gamma is not None:
            noisy = torch.isfinite(gamma)
            x0_y = project(p, x0) if not bool(noisy.all()) else None
            if bool(noisy.any()):
                g = torch.where(noisy, gamma, torch.ones_like(gamma))
                prox = p.operator.prox(x0, p.y, g.to(x0.dtype))
                x0_y = prox if x0_y is None else torch.where(p.col(noisy, x0).bool(), prox, x0_y)
        a_s, s_s = p.alpha[i + 1], p.sigma[i + 1]
        if s_s == 0.0:
            return a_s * x0_y, state
        eps = eps_of(p, x, x0_y, i)
        z = p.randn(x)
        return a_s * x0_y + s_s * (math.sqrt(1 - self.zeta) * eps + math.sqrt(self.zeta) * z), state
