"""PiGDM: pseudoinverse-guided diffusion models, noisy version (Song, Vahdat, Mardani,
Kautz, ICLR 2023).

The likelihood of ``y`` given ``x_t`` is approximated with ``x0 | x_t ~ N(x0_hat, r_t^2 I)``:

    p(y | x_t) ~ N(y; A x0_hat, r_t^2 A A^T + sigma_y^2 I),   r_t^2 = st^2 v / (st^2 + v)

(``st = sigma_t / alpha_t``, ``v`` the data variance, 1 in the paper), and its gradient
through the network, ``g = J^T A^T (r_t^2 A A^T + sigma_y^2 I)^-1 (y - A x0_hat)`` (one
vector-Jacobian product, the residual held fixed), shifts the clean estimate by Tweedie's
formula for the posterior: ``x0_y = x0_hat + w * sigma_t^2 / alpha_t * g``. The move from
``x0_y`` is DDIM. With ``w = 1`` and a Gaussian prior of variance ``v`` this is the exact
posterior mean ``E[x0 | x_t, y]``.

The solve uses the SVD when the operator has one, else conjugate gradients in measurement
space; it needs a linear operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import ddim_move, measurement_solve, r2_isotropic, tweedie_shift, vjp

__all__ = ["PiGDM"]


@register
@dataclass(frozen=True)
class PiGDM(PosteriorSampler):
    """Pseudoinverse-guided diffusion (noisy version).

    Args:
        eta: DDIM stochasticity of the move (default 1.0).
        weight: guidance weight ``w`` (default 1.0: the approximate posterior mean).
        data_var: the data variance ``v`` in ``r_t^2`` (default 1.0, the paper's choice).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import CompressedSensing
        >>> from diffusolve.inverse.samplers import PiGDM
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(6), torch.eye(6), process=ddpm())
        >>> op = CompressedSensing((6,), 3, seed=0)
        >>> y = op(torch.ones(2, 6, dtype=torch.float64))
        >>> PiGDM().run(prior, op, y, 0.1, steps=10, noise=0).shape
        torch.Size([2, 6])
    """

    eta: float = 1.0
    weight: float = 1.0
    data_var: float = 1.0

    name: ClassVar[str] = "pigdm"
    needs: ClassVar[tuple[str, ...]] = ("linear",)
    citation: ClassVar[str] = (
        "Song, Vahdat, Mardani, Kautz. Pseudoinverse-Guided Diffusion Models for Inverse "
        "Problems. ICLR 2023."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "eta": (0.0, 0.5, 1.0),
        "weight": (0.25, 0.5, 1.0, 2.0, 4.0),
    }

    def __post_init__(self) -> None:
        self._unit(eta=self.eta)
        self._positive(data_var=self.data_var)
        if not self.weight >= 0:
            raise ValueError(f"pigdm: weight must be >= 0; got {self.weight!r}")

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        xg, x0 = p.denoise_with_grad(x, i)
        r2 = r2_isotropic(p, i, self.data_var)
        with torch.no_grad():
            h = measurement_solve(p, r2, p.residual(x0.detach()))
            v = p.operator.At(h)
        g = vjp(xg, x0, v.to(x0.dtype))
        x0_y = x0.detach() + self.weight * tweedie_shift(p, i, g)
        return ddim_move(p, x, x0_y, i, self.eta), state
