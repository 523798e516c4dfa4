"""Pseudo numerical methods: PNDM / PLMS (Liu et al. 2022) and iPNDM (Zhang & Chen 2023).

All of them split a step ``t -> t'`` into a *transfer part*, the DDIM step

    phi(x, eps, t, t') = (alpha' / alpha) x + alpha' (sigma~' - sigma~) eps,

(``sigma~ = sigma / alpha``; exact when ``eps`` is frozen over the step, i.e. Euler in
``x~ = x / alpha`` against ``sigma~``), and a *gradient part* that combines noise
predictions into the ``eps`` used by ``phi``: a pseudo Runge-Kutta or a pseudo linear
multistep formula with the fixed coefficients of classical uniform-step methods.

Order. The fixed coefficients average ``eps`` as if the step were uniform in the variable
the formula assumes, but ``phi`` integrates ``eps`` against ``dsigma~``. On a grid that is
not uniform in ``sigma~`` (none of the standard grids is), the weight mismatch leaves a
local error ``O(h^3)`` (the first moment of ``eps`` against the varying step or weight),
so these methods are globally **second order** whatever the nominal order (3 or 4) of the
formula. Only on a grid uniform in ``sigma~`` do PLMS/iPNDM reach order 4. The
variable-step iPNDM (``ipndm_v``) recomputes the weights for the actual steps and is
fourth order on any smooth grid.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import BoundModel, Solver, coef, register
from .deis import DEIS

__all__ = ["PNDM", "PLMS", "IPNDM", "IPNDMV", "ddim_transfer", "AB_COEFFICIENTS"]

#: Adams-Bashforth coefficients for uniform steps (newest first)
AB_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_RK_STEPS = 3  # F-PNDM: the first three steps are pseudo Runge-Kutta


def ddim_transfer(model: BoundModel, x: Tensor, eps: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The DDIM transfer part ``phi(x, eps, t, t')`` (coefficients in float64)."""
    p = model.process
    a, a1 = float(p.alpha(t)), float(p.alpha(t_next))
    ds = float(p.sigma_tilde(t_next)) - float(p.sigma_tilde(t))
    return coef(a1 / a, x) * x + coef(a1 * ds, x) * eps


def _combine(coefs: tuple[float, ...], hist: list[Tensor]) -> Tensor:
    out = coefs[0] * hist[0]
    for c, e in zip(coefs[1:], hist[1:], strict=False):
        out = out + c * e
    return out


def _eps(model: BoundModel, x: Tensor, t: Tensor) -> Tensor:
    return model.eps(x, t, model(x, t))


@register("pndm")
class PNDM(Solver):
    """F-PNDM: pseudo Runge-Kutta warm start, then pseudo linear multistep. Order 2.

    Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
    ICLR 2022 (arXiv 2202.09778).

    Transfer part ``phi`` = the DDIM step (module docstring). Gradient part:

    * steps 0, 1, 2 (pseudo 4-stage Runge-Kutta, 4 evaluations each), with the midpoint
      ``t_m = (t + t') / 2``::

          e1 = eps(x, t);            x1 = phi(x, e1, t, t_m)
          e2 = eps(x1, t_m);         x2 = phi(x, e2, t, t_m)
          e3 = eps(x2, t_m);         x3 = phi(x, e3, t, t')
          e4 = eps(x3, t');          e' = (e1 + 2 e2 + 2 e3 + e4) / 6

    * later steps (pseudo linear multistep, 1 evaluation each), with ``e_j`` the first-stage
      predictions of the previous steps: ``e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24``;

    then ``x' = phi(x, e', t, t')``. ``nfe(n) = 4 min(n, 3) + max(n - 3, 0)``.

    Order: the paper builds the Runge-Kutta and multistep weights for steps uniform in
    ``t``, but ``phi`` integrates ``eps`` against ``dsigma~``, which is not uniform in ``t``;
    the mismatch is a local ``O(h^3)`` error, so the honest global order is 2 (see the
    module docstring), not the nominal 4 (one pseudo RK step has local error ``O(h^3)``,
    measured in the tests). The 9 extra warm-up evaluations inflate a slope fitted
    against NFE at small step counts.

    Paper defaults: F-PNDM with linear (uniform) time steps (``natural_grid =
    "time_uniform"``); 50 steps match 1000-step DDIM.
    """

    order = 2
    multistep = True
    prediction = "noise"
    natural_grid = "time_uniform"
    citation = (
        "Liu, Ren, Lin & Zhao, Pseudo Numerical Methods for Diffusion Models on Manifolds, "
        "ICLR 2022"
    )

    def nfe(self, n_steps: int) -> int:
        n = int(n_steps)
        return 4 * min(n, _RK_STEPS) + max(n - _RK_STEPS, 0)

    def init(self, model: BoundModel, x: Tensor, grid: Tensor) -> dict[str, Any]:
        return {"grid": grid, "eps": []}

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        e1 = _eps(model, x, t)
        hist = [e1] + state["eps"][:3]
        if len(state["eps"]) < _RK_STEPS:
            tm = (t + t_next) / 2
            e2 = _eps(model, ddim_transfer(model, x, e1, t, tm), tm)
            e3 = _eps(model, ddim_transfer(model, x, e2, t, tm), tm)
            e4 = _eps(model, ddim_transfer(model, x, e3, t, t_next), t_next)
            e = (e1 + 2 * e2 + 2 * e3 + e4) / 6
        else:
            e = _combine(AB_COEFFICIENTS[4], hist)
        state["eps"] = hist
        return ddim_transfer(model, x, e, t, t_next), state


@register("plms")
class PLMS(Solver):
    """PLMS: pseudo linear multistep with a lower-order multistep warm start. Order 2.

    Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
    ICLR 2022 (arXiv 2202.09778); the cheap variant popularised by latent diffusion.

    One evaluation per step. With ``e_0, e_1, ...`` the noise predictions at the current
    and previous grid times, ``e' = e_0`` (step 0, DDIM), ``(3 e_0 - e_1) / 2``,
    ``(23 e_0 - 16 e_1 + 5 e_2) / 12``, then ``(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24``
    (up to ``lms_order``), and ``x' = phi(x, e', t, t')`` (DDIM transfer).

    Order: 2 for ``lms_order >= 2`` (fixed uniform-step coefficients against the
    ``dsigma~`` integral; module docstring), 1 for ``lms_order = 1`` (DDIM).

    Options:
        lms_order: highest Adams-Bashforth order used (1..4, default 4).

    Paper defaults: linear (uniform) time steps (``natural_grid = "time_uniform"``).
    """

    order = 2
    multistep = True
    prediction = "noise"
    natural_grid = "time_uniform"
    citation = PNDM.citation

    def __init__(self, lms_order: int = 4) -> None:
        if int(lms_order) != lms_order or lms_order not in AB_COEFFICIENTS:
            raise ValueError(f"lms_order must be 1, 2, 3 or 4, got {lms_order!r}")
        self.lms_order = int(lms_order)
        self.order = min(self.lms_order, 2)  # type: ignore[misc]

    def init(self, model: BoundModel, x: Tensor, grid: Tensor) -> dict[str, Any]:
        return {"grid": grid, "eps": []}

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        hist = [_eps(model, x, t)] + state["eps"][: self.lms_order - 1]
        e = _combine(AB_COEFFICIENTS[len(hist)], hist)
        state["eps"] = hist
        return ddim_transfer(model, x, e, t, t_next), state


@register("ipndm")
class IPNDM(PLMS):
    """iPNDM: improved PNDM with fixed Adams-Bashforth coefficients. Order 2.

    Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator",
    ICLR 2023 (arXiv 2204.13902), Sec. on PNDM.

    The linear multistep on ``eps`` of PNDM with the pseudo Runge-Kutta warm start
    replaced by lower-order multistep steps (no extra evaluations), applied in
    ``x~ = x / alpha`` against ``sigma~``: ``x~' = x~ + (sigma~' - sigma~) e'`` with
    ``e' = e_0``, ``(3 e_0 - e_1)/2``, ``(23 e_0 - 16 e_1 + 5 e_2)/12``, then
    ``(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3)/24`` (the update is identical to PLMS; only the
    grid it is meant for differs). One evaluation per step.

    Order: 4 only on grids uniform in ``sigma~``; on the EDM/Karras grid it is used with
    (uniform in ``sigma~^(1/7)``) the fixed coefficients leave a local ``O(h^3)`` error, so
    the honest global order is 2. ``ipndm_v`` is the variable-step version (order 4).

    Options:
        lms_order: highest Adams-Bashforth order used (1..4, default 4).

    Defaults: order 4 on the EDM polynomial grid with ``rho = 7`` (``natural_grid =
    "karras"``), where diff-sampler reports it as the best training-free solver at
    NFE 5-10 on CIFAR-10 (FID 13.59 at NFE 5, 2.77 at NFE 10).
    """

    natural_grid = "karras"
    citation = DEIS.citation


@register("ipndm_v")
class IPNDMV(DEIS):
    """iPNDM_v: variable-step iPNDM, i.e. variable-step Adams-Bashforth in ``sigma~``. Order 4.

    Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator",
    ICLR 2023; the variable-step form as in the diff-sampler toolbox (Zhou et al.).

    ``x~' = x~ + sum_j C_j e_j`` with ``C_j = int_{sigma~}^{sigma~'} L_j(s) ds`` and ``L_j``
    the Lagrange basis in ``sigma~`` through the last ``q = min(order, i + 1)`` grid points:
    the weights are recomputed for the actual steps, so it equals DEIS rhoAB-``order``
    and has global order ``order`` (default 4) on any smooth grid.

    Options: ``order`` (1..4), ``lower_order_final`` (as :class:`DEIS`).

    Defaults: order 4 on the EDM grid with ``rho = 7`` (``natural_grid = "karras"``).
    """

    order = 4
    natural_grid = "karras"

    def __init__(self, order: int = 4, lower_order_final: bool | str = False) -> None:
        super().__init__(order=order, variant="rho", lower_order_final=lower_order_final)
