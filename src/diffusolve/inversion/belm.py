"""O-BELM: the optimal second-order bidirectional explicit linear multistep sampler.

Wang, Yin, Dong, Zhu, Zhang, Zhao, Qian & Li, "BELM: Bidirectional Explicit Linear
Multi-step Sampler for Exact Inversion in Diffusion Models" (NeurIPS 2024). In
``x~ = x / alpha`` and ``u = sigma / alpha`` the probability-flow ODE is
``dx~/du = eps(x, t)``. A two-step BELM step ``z~_(k+1) = b z~_(k-1) + a z~_k + c eps_k``
(on the grid ``t_0 > t_1 > ... > t_n``, ``eps_k`` the model's noise estimate at
``(z_k, t_k)``) is explicit in ``z_(k+1)`` *and* in ``z_(k-1)``, so it inverts exactly.
With the step sizes ``h_p = u_(k-1) - u_k`` (the previous step) and
``h_n = u_k - u_(k+1)`` (the next), the Taylor expansion of ``x~`` about ``u_k`` fixes the
coefficients that make the local error ``O(h^3)`` (global order 2):

    ``a + b = 1`` (consistency),  ``b h_p + c = -h_n`` (first order),
    ``b h_p^2 = h_n^2`` (second order)
    ``=> b = h_n^2 / h_p^2``,  ``a = 1 - b``,  ``c = -h_n (h_n + h_p) / h_p``,

which are the paper's O-BELM coefficients (its eq. for ``x_(i-1)`` with ``h_i = h_n``,
``h_(i+1) = h_p``). In ``x`` with ``eps_k = (z_k - alpha_k D(z_k, t_k)) / sigma_k``:

    ``z_(k+1) = b (alpha_(k+1)/alpha_(k-1)) z_(k-1) + a (alpha_(k+1)/alpha_k) z_k
               + c alpha_(k+1) eps_k``

and the inverse solves the same line for ``z_(k-1)`` (dividing by ``b``). The first step is
a DDIM step (one step of local error ``O(h^2)``, so the global order stays 2); one model
evaluation per step; two states, kept like BDIA's (``aux["z1"]``; at least 2 steps).

One name is registered, ``"belm"``, with the O-BELM coefficients (the sampler the paper
recommends). The paper shows that BDIA (:mod:`.bdia`) and EDICT (:mod:`.edict`) are
members of the BELM family whose fixed coefficients meet only the first-order conditions.

The inverse divides by ``b = (h_n / h_p)^2``, small where the steps in ``sigma / alpha``
shrink fast towards the data; the forward step damps by the same factor what the inverse
amplifies, and the measured round trips stay at rounding level (float64 1e-16-2e-13 on VP,
rectified-flow, EDM and DDPM mixtures with time-uniform and logSNR grids; float32
2e-8-9e-7; digits UNet float32 at 10-50 steps 5e-7-1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..solvers.base import BoundModel
from .base import register
from .bdia import TwoStateInverter

__all__ = ["BELM"]


@register
@dataclass(frozen=True)
class BELM(TwoStateInverter):
    """O-BELM (exact, second order, one evaluation per step); see the module doc.

    Options: only ``precision`` (``"double-double"``, default, ``"float64"`` or
    ``"input"``; see :class:`~.bdia.TwoStateInverter`): the coefficients are fixed by the
    grid. Per-step use: :meth:`step` (``z_prev=None`` for the first, DDIM, step),
    :meth:`inverse_step`; :meth:`generate` samples from noise.

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import edm
        >>> gmm = GaussianMixture.random(4, 3, process=edm(), seed=0)
        >>> x = gmm.sample(5, torch.Generator().manual_seed(1))
        >>> inv = invert(gmm, x, 20, "belm", grid_kind="karras")
        >>> float((reconstruct(gmm, inv) - x).abs().max()) < 1e-10
        True
    """

    name = "belm"
    citation = (
        "Wang, Yin, Dong, Zhu, Zhang, Zhao, Qian & Li, BELM: Bidirectional Explicit "
        "Linear Multi-step Sampler for Exact Inversion in Diffusion Models, NeurIPS 2024 "
        "(O-BELM)"
    )

    def coefficients(
        self, model: BoundModel, t_prev: Tensor, t: Tensor, t_next: Tensor
    ) -> tuple[float, float, float]:
        """``(P, Q, R)`` of ``z_(k+1) = P z_(k-1) + Q z_k + R D(z_k, t_k)``."""
        a0, s0, _ = model.scalars(t_prev)
        a, s, _ = model.scalars(t)
        a1, s1, _ = model.scalars(t_next)
        hp = s0 / a0 - s / a
        hn = s / a - s1 / a1
        b = (hn / hp) ** 2
        c = -hn * (hn + hp) / hp
        P = b * a1 / a0
        Q = (1.0 - b) * a1 / a + c * a1 / s
        R = -c * a1 * a / s
        return P, Q, R
