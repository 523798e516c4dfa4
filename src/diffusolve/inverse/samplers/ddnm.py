"""DDNM and DDNM+: zero-shot restoration by range-null space decomposition (Wang, Yu,
Zhang, ICLR 2023).

DDNM replaces the range-space part of the clean estimate by the measurement,
``x0_y = x0_hat - A^+ (A x0_hat - y)`` (the null-space part is the model's), then moves with
the DDPM posterior ``q(x_next | x_t, x0_y)`` (DDIM with ``eta``; the paper's step is
``eta = 1``). It is exact for noiseless measurements.

DDNM+ handles noise in the spectral basis of ``A`` (needs an SVD): with the DDPM posterior
``x_next = a x0 + b x_t + sigma_p z`` (``a`` the weight of the clean estimate, ``sigma_p``
its noise std, both on the rescaled state ``x / alpha``) and per-coordinate measurement
noise ``n_j = sigma_y / s_j``, the correction of coordinate ``j`` is scaled by
``lambda_j = min(1, sigma_p / (a n_j))`` and the added noise variance lowered to
``sigma_p^2 - (a lambda_j n_j)^2``, so the noise carried by ``ybar`` plus the noise added is
the posterior's. (The paper's "time-travel" resampling is not included.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import ddim_move, from_spectral, project, spectral

__all__ = ["DDNM", "DDNMPlus"]


@register
@dataclass(frozen=True)
class DDNM(PosteriorSampler):
    """Range-null space decomposition (noiseless measurements).

    Args:
        eta: DDIM stochasticity of the move (default 1.0: the DDPM posterior, as in the
            paper).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting
        >>> from diffusolve.inverse.samplers import DDNM
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(4), torch.eye(4), process=ddpm())
        >>> op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0]), (4,))
        >>> y = torch.tensor([[0.5, 0.0, -0.5, 0.0]], dtype=torch.float64)
        >>> x = DDNM().run(prior, op, y, steps=10, noise=0)
        >>> torch.allclose(op(x), y)
        True
    """

    eta: float = 1.0

    name: ClassVar[str] = "ddnm"
    needs: ClassVar[tuple[str, ...]] = ("linear",)
    citation: ClassVar[str] = (
        "Wang, Yu, Zhang. Zero-Shot Image Restoration Using Denoising Diffusion Null-Space "
        "Model. ICLR 2023."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {"eta": (0.0, 0.5, 0.85, 1.0)}

    def __post_init__(self) -> None:
        self._unit(eta=self.eta)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        x0 = p.denoise(x, i)
        return ddim_move(p, x, project(p, x0), i, self.eta), state


@register
@dataclass(frozen=True)
class DDNMPlus(PosteriorSampler):
    """DDNM+ (noisy measurements; the DDPM posterior move of the paper).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting
        >>> from diffusolve.inverse.samplers import DDNMPlus
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(4), torch.eye(4), process=ddpm())
        >>> op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0]), (4,))
        >>> y = torch.tensor([[0.5, 0.0, -0.5, 0.0]], dtype=torch.float64)
        >>> DDNMPlus().run(prior, op, y, 0.1, steps=10, noise=0).shape
        torch.Size([1, 4])
    """

    name: ClassVar[str] = "ddnm_plus"
    needs: ClassVar[tuple[str, ...]] = ("svd",)
    citation: ClassVar[str] = DDNM.citation

    def init(self, p: Problem, x: Tensor) -> Any:
        return spectral(p)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        s, ybar, nbar = state
        x0 = p.denoise(x, i)
        svd = p.operator.svd()
        r = svd.rank
        a_t, a_s = p.alpha[i], p.alpha[i + 1]
        st, sn = p.st(i), p.st(i + 1)
        # the DDPM posterior on the rescaled state: x' = a x0 + b x_t/alpha_t + sigma_p z
        ratio2 = 0.0 if math.isinf(st) else (sn / st) ** 2
        a, b = 1.0 - ratio2, ratio2
        sig_p = sn * math.sqrt(1.0 - ratio2)
        c0 = svd.Vt(x0)
        c0r = c0[:, :r]
        if a > 0:
            lam = torch.clamp(
                sig_p / (a * torch.where(nbar > 0, nbar, torch.ones_like(nbar))), max=1.0
            )
            lam = torch.where(nbar > 0, lam, torch.ones_like(lam))
        else:
            lam = torch.zeros_like(nbar)
        c0r = c0r - lam * (c0r - ybar)
        var = torch.clamp(sig_p**2 - (a * lam * nbar) ** 2, min=0.0)
        z = p.randn(c0)
        noise = torch.cat([var.sqrt() * z[:, :r], sig_p * z[:, r:]], 1)
        c_mean = a * torch.cat([c0r, c0[:, r:]], 1)
        if b > 0:
            c_mean = c_mean + b * svd.Vt(x / a_t)
        return a_s * from_spectral(p, c_mean + noise), state
