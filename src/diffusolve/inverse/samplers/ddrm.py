"""DDRM: denoising diffusion restoration models (Kawar, Elad, Ermon, Song, NeurIPS 2022).

DDRM works in the spectral basis of ``A = U diag(s) V^T``, on the rescaled state
``x / alpha`` (noise level ``st = sigma / alpha``), with ``ybar = U^T y / s`` (noise std
``sigma_y / s`` per coordinate) and ``c0 = V^T x0_hat``. The next noise level is
``st' = st_(i+1)``; a coordinate's next value is

* not observed (``s_j = 0``): ``c0 + sqrt(1 - eta^2) st' (c_t - c0) / st + eta st' z``;
* observed with ``st' < sigma_y / s_j``: ``c0 + sqrt(1 - eta^2) st' (ybar - c0) / (sigma_y / s_j)
  + eta st' z``;
* observed with ``st' >= sigma_y / s_j``: ``(1 - eta_b) c0 + eta_b ybar
  + sqrt(st'^2 - eta_b^2 (sigma_y / s_j)^2) z``.

**The noise level told is the noise level added.** In the last case the state is
``x0 + st' * noise`` exactly when ``eta_b = 1`` (``ybar`` carries ``sigma_y / s_j`` of noise
and the rest is added), which is the level the next denoiser call is told; with
``eta_b < 1`` the carried estimate error adds to it. The default ``eta_b = 1`` is the paper's,
and ``tests/test_posterior_samplers.py`` checks the added noise against ``st'``.

Needs an SVD of ``A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import from_spectral, spectral

__all__ = ["DDRM"]


@register
@dataclass(frozen=True)
class DDRM(PosteriorSampler):
    """Denoising diffusion restoration models.

    Args:
        eta: stochasticity of the unobserved and of the noise-dominated observed
            coordinates (default 0.85, the paper's).
        eta_b: weight of the measurement in the observed coordinates while the diffusion
            noise exceeds the measurement noise (default 1.0, the paper's).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting
        >>> from diffusolve.inverse.samplers import DDRM
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(4), torch.eye(4), process=ddpm())
        >>> op = Inpainting(torch.tensor([1.0, 1.0, 0.0, 0.0]), (4,))
        >>> y = torch.tensor([[1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
        >>> x = DDRM().run(prior, op, y, 0.0, steps=20, noise=0)
        >>> torch.allclose(x[:, :2], y[:, :2])  # noiseless: the observed pixels are kept
        True
    """

    eta: float = 0.85
    eta_b: float = 1.0

    name: ClassVar[str] = "ddrm"
    needs: ClassVar[tuple[str, ...]] = ("svd",)
    citation: ClassVar[str] = (
        "Kawar, Elad, Ermon, Song. Denoising Diffusion Restoration Models. NeurIPS 2022."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "eta": (0.0, 0.5, 0.85, 1.0),
        "eta_b": (0.5, 1.0),
    }

    def __post_init__(self) -> None:
        self._unit(eta=self.eta, eta_b=self.eta_b)

    def init(self, p: Problem, x: Tensor) -> Any:
        return spectral(p)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        s, ybar, nbar = state
        x0 = p.denoise(x, i)
        svd = p.operator.svd()
        r = svd.rank
        a_t, a_s = p.alpha[i], p.alpha[i + 1]
        st, sn = p.st(i), p.st(i + 1)
        c0 = svd.Vt(x0)
        z = p.randn(c0)
        eta, keep = self.eta, math.sqrt(1.0 - self.eta**2)
        # unobserved coordinates: DDIM in the spectral basis
        if math.isinf(st):
            free = c0 + eta * sn * z
        else:
            ct = svd.Vt(x / a_t)
            free = c0 + keep * sn * (ct - c0) / st + eta * sn * z
        # observed coordinates
        c0r, zr = c0[:, :r], z[:, :r]
        safe = torch.where(nbar > 0, nbar, torch.ones_like(nbar))
        below = c0r + keep * sn * (ybar - c0r) / safe + eta * sn * zr
        add = torch.clamp(sn * sn - (self.eta_b * nbar) ** 2, min=0.0).sqrt()
        above = (1 - self.eta_b) * c0r + self.eta_b * ybar + add * zr
        obs = torch.where(sn < nbar, below, above)
        c_next = torch.cat([obs, free[:, r:]], 1)
        return a_s * from_spectral(p, c_next), state
