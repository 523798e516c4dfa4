"""Stochastic-interpolant SDE sampling with a tunable diffusion coefficient (Albergo, Boffi &
Vanden-Eijnden, Stochastic Interpolants, 2023), for any process and any denoiser.

**The SDE.** For ``x_t = alpha(t) x0 + sigma(t) eps`` the denoiser ``D(x, t)`` (the x0
estimate) gives the score and the probability-flow velocity:

    s(x, t) = grad log p_t(x) = (alpha D - x) / sigma^2
    v(x, t) = dx/dt along the flow = alpha' D + sigma' (x - alpha D) / sigma
            = (alpha'/alpha) x - sigma^2 (sigma'/sigma - alpha'/alpha) s

In the paper's convention time runs from noise to data (``tau``, here ``d tau = -dt``), the
drift is ``b = -v`` and, for every ``eps(t) >= 0``,

    dX = [b(X) + eps s(X)] d tau + sqrt(2 eps) dW_tau

has the marginals ``p_t`` (the added ``eps s`` term and the diffusion cancel in the
Fokker-Planck equation). Written in this library's time ``t``, run from ``t_max`` down to
``t_min`` (``dt < 0``):

    X(t + dt) = X(t) + [v(X, t) - eps(t) s(X, t)] dt + sqrt(2 eps(t) |dt|) z.

``eps = 0`` is the probability-flow ODE.

**The diffusion coefficient** ``eps(t) = c w(t)`` (option ``eps`` is ``c``; ``schedule``
names ``w``, always in the process's own time):

* ``"sbdm"``: ``w = sigma sigma' - (alpha'/alpha) sigma^2 = -sigma^2 lambda'(t)``: at
  ``c = 1`` the SDE is the process's own reverse-time diffusion SDE (the score-based
  diffusion model's; the Euler variant is then exactly DDPM's ancestral step).
* ``"sigma2"``: the same times ``sigma_vp^2 = sigma^2 / (alpha^2 + sigma^2)`` (the noise
  fraction; ``sigma^2`` itself for a VP process): equal to ``"sbdm"`` at the noise end,
  vanishing like ``(sigma / alpha)^2`` at the data end.
* ``"constant"``: ``w = 1 / (t_max - t_min)``, constant in the process's time normalised to
  unit length (the paper's constant ``eps`` on ``[0, 1]`` for processes whose time runs on
  ``[0, 1]``, such as rectified flow and the trigonometric interpolant).

**The step** (time-step ``t -> t'``, ``s = sigma / alpha``, ``x~ = x / alpha``). The score
term is linear in ``x`` for a frozen ``D``: ``-eps s dt`` pulls ``x~`` towards ``D`` at rate
``eps / sigma^2`` per unit ``|dt|``. So the drift ``v`` is integrated as EDM's Euler or Heun
step on ``dx~/ds = (x~ - D) / s`` (``method``; Euler on this ODE is DDIM), and the score part
with its noise exactly for a frozen ``D`` (an Ornstein-Uhlenbeck step around ``D`` with
variance ``s'^2``):

    x~' = D + exp(-k) (x~_ode - D) + s' sqrt(1 - exp(-2 k)) z,
    k = int_{t'}^{t} eps(u) / sigma(u)^2 du

(``k = c (lambda' - lambda)`` for ``"sbdm"``, ``(c / 2) log((1 + s^2) / (1 + s'^2))`` for
``"sigma2"``, composite Simpson on 8 intervals for ``"constant"``). For small ``k`` this is the
Euler-Maruyama step of the equation above; for large ``k`` (a constant ``eps`` where
``sigma`` vanishes) it stays stable, where Euler-Maruyama would not. ``D`` is the
evaluation at the start (Euler) or at the Heun predictor (Heun). ``eps = 0`` gives
``k = 0``: the Euler / Heun ODE step, bit for bit ``euler`` / ``heun``. Weak order 1 for
``eps > 0`` (the declared ``order`` is that of the drift's ODE step).

Measured (exact output law on a 3-d Gaussian, W2 to the marginal at 128 / 256 / 512
steps): ``"sbdm"`` 0.5, ``"sigma2"`` 2, ``"constant"`` 0.1 and Heun with ``"sbdm"`` 1 all
fall as ``1 / NFE`` (slopes 0.96-1.00). A constant ``eps = 1`` on rectified flow converges
slowly (0.142 / 0.096 / 0.065 / 0.043 / 0.028 up to 2048 steps): ``k`` per step is large
near the data end until the steps are much smaller than ``t``. On the bench task
gmm-d64-vp (2000 samples, sliced W2 to exact samples, floor 0.068-0.077) more noise costs
accuracy at few steps (NFE 10: ``eps`` 0 / 0.5 / 1 / 2: 0.113 / 0.113 / 0.125 / 0.137) and
helps at many (NFE 100: 0.074 / 0.068 / 0.065 / 0.060).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BoundModel, Solver, StepContext, check_choice, check_positive, register

__all__ = ["InterpolantSDE", "SCHEDULES"]

ALBERGO_2023 = (
    "Albergo, Boffi & Vanden-Eijnden, Stochastic Interpolants: A Unifying Framework for "
    "Flows and Diffusions, arXiv 2303.08797 (2023)"
)
SCHEDULES = ("sbdm", "sigma2", "constant")
METHODS = ("euler", "heun")


@register("si_sde")
@dataclass(frozen=True)
class InterpolantSDE(Solver):
    """The stochastic-interpolant SDE ``dX = [b + eps s] d tau + sqrt(2 eps) dW`` from noise
    to data with ``eps(t) = eps * w(t)`` (see the module doc for the math).

    Options:
        eps: scale ``c >= 0`` of the diffusion coefficient (0: the probability-flow ODE,
            ``euler`` / ``heun`` bit for bit). Default 1.0.
        schedule: ``"sbdm"`` (default; ``eps=1`` is the process's reverse diffusion SDE),
            ``"sigma2"`` (vanishes at the data end) or ``"constant"`` (constant in the
            process's time normalised to unit length).
        method: the drift's ODE step, ``"euler"`` (default, one evaluation per step) or
            ``"heun"`` (two).

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> s = get_solver("si_sde", schedule="sigma2", method="heun")
        >>> s.stochastic, s.evals_per_step, s.replace(eps=0.0).stochastic
        (True, 2, False)
    """

    eps: float = 1.0
    schedule: str = "sbdm"
    method: str = "euler"

    citation = ALBERGO_2023
    SEARCH = {"eps": (0.25, 0.5, 1.0, 2.0)}

    def __post_init__(self) -> None:
        check_positive("eps", self.eps, allow_zero=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("method", self.method, METHODS)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eps > 0

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2 if self.method == "heun" else 1

    @property
    def evals_per_step(self) -> int:  # type: ignore[override]
        return 2 if self.method == "heun" else 1

    def rate(self, model: BoundModel, t: Tensor, t_next: Tensor) -> float:
        """``k = int_{t'}^{t} eps(u) / sigma(u)^2 du`` over the step (0 when ``eps = 0``)."""
        if self.eps == 0:
            return 0.0
        lam = model.scalars(t)[2]
        lam1 = model.scalars(t_next)[2]
        if self.schedule == "sbdm":
            return self.eps * (lam1 - lam)
        if self.schedule == "sigma2":
            s2, s12 = math.exp(-2 * lam), math.exp(-2 * lam1)
            return 0.5 * self.eps * (math.log1p(s2) - math.log1p(s12))
        # composite Simpson on 8 intervals (one vectorised evaluation of sigma)
        p = model.process
        u = torch.linspace(float(t_next), float(t), 9, dtype=torch.float64)
        f = p.sigma(u) ** -2
        simpson = float(f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
        return self.eps / (p.t_max - p.t_min) * simpson * (float(t) - float(t_next)) / 24

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: None, ctx: StepContext
    ) -> tuple[Tensor, None]:
        a, _, lam = model.scalars(t)
        a1, _, lam1 = model.scalars(t_next)
        s, s1 = math.exp(-lam), math.exp(-lam1)
        if self.eps > 0 and s1 >= s:
            raise ValueError(
                "si_sde integrates towards lower noise only; for inversion use a "
                "deterministic solver (or eps=0)."
            )
        # the drift: EDM's Euler / Heun step, with the same operations as ``euler`` / ``heun``
        xt = x / a
        x0 = model(a * xt, t)
        d = (xt - x0) / s
        xt1 = xt + (s1 - s) * d
        if self.method == "heun":
            x0 = model(a1 * xt1, t_next)
            d1 = (xt1 - x0) / s1
            xt1 = xt + (s1 - s) * 0.5 * (d + d1)
        # the score term and its noise: exact Ornstein-Uhlenbeck step around x0
        k = self.rate(model, t, t_next)
        if k > 0:
            z = ctx.noise(tuple(x.shape), dtype=x.dtype, device=x.device)
            decay = math.exp(-k)
            std = s1 * math.sqrt(-math.expm1(-2 * k))
            xt1 = x0 + decay * (xt1 - x0) + std * z
        return xt1 * a1, None
