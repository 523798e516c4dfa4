"""DPM-Solver++(2S) ancestral: the singlestep second-order data-prediction step to a lower
noise level, followed by fresh noise back up to the next grid time (Lu et al. 2022).

In ``x~ = x / alpha`` against ``s = sigma / alpha`` every process is a variance-exploding
one. A step ``s -> s'`` splits ``s'`` into a deterministic target ``s_down`` and a noise
part ``s_up`` (the DDPM posterior split, as in :class:`~diffusolve.solvers.ddim.DDIM`):

    s_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)),   s_down = sqrt(s'^2 - s_up^2),

takes DPM-Solver++(2S) from ``s`` to ``s_down`` (stage at ``lambda + r1 h``,
``h = log(s / s_down)``):

    u      = (s_mid / s) x~ - expm1(-r1 h) x0(x~, s)
    x~_dn  = (s_down / s) x~ - expm1(-h) ((1 - 1/(2 r1)) x0(x~, s) + 1/(2 r1) x0(u, s_mid))

and adds ``s_noise * s_up * z``. With ``eta = 0`` it is ``dpmpp_2s``; with ``eta = 1`` its
samples follow the model's reverse diffusion (weak order 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .base import BoundModel, Solver, StepContext, check_positive, register
from .dpm_solver import LU_2022_PP
from .expint import ExpStep

__all__ = ["DPMSolverPP2SAncestral"]


@register("dpmpp_2s_ancestral")
@dataclass(frozen=True)
class DPMSolverPP2SAncestral(Solver):
    """DPM-Solver++(2S) with ancestral noise. Two evaluations per step; stochastic.

    Options:
        eta: noise fraction (0: deterministic ``dpmpp_2s``; 1: ancestral, default).
        s_noise: scale of the added noise (1.0: exact ancestral variance).
        r1: stage ratio in ``(0, 1]`` (default 1/2).

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> s = get_solver("dpmpp_2s_ancestral")
        >>> s.stochastic, s.evals_per_step, s.replace(eta=0.0).stochastic
        (True, 2, False)
    """

    eta: float = 1.0
    s_noise: float = 1.0
    r1: float = 0.5

    order = 2  # of the deterministic part (eta = 0)
    evals_per_step = 2
    citation = LU_2022_PP + " (ancestral variant)"

    def __post_init__(self) -> None:
        check_positive("eta", self.eta, allow_zero=True)
        check_positive("s_noise", self.s_noise, allow_zero=True)
        if not 0.0 < self.r1 <= 1.0:
            raise ValueError(f"r1 must lie in (0, 1], got {self.r1}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: None, ctx: StepContext
    ) -> tuple[Tensor, None]:
        a, _, lam = model.scalars(t)
        a1, _, lam1 = model.scalars(t_next)
        s, s1 = math.exp(-lam), math.exp(-lam1)
        if self.stochastic and s1 >= s:
            raise ValueError(
                "dpmpp_2s_ancestral integrates towards lower noise only; "
                "for inversion use a deterministic solver (or eta=0)."
            )
        up = min(s1, self.eta * math.sqrt(max(s1 * s1 * (s * s - s1 * s1) / (s * s), 0.0)))
        down = math.sqrt(s1 * s1 - up * up)
        xt = x / a
        x0 = model(x, t)
        if down == 0.0:
            xt_down = x0
        else:
            lam_down = -math.log(down)
            f = ExpStep((1.0, s, lam), (1.0, down, lam_down), "data")
            lam_mid = lam + self.r1 * f.h
            t_mid = model.process.t_of_lambda(lam_mid)
            stage = ExpStep((1.0, s, lam), (1.0, math.exp(-lam_mid), lam_mid), "data")
            u = stage.first_order(xt, x0)
            x0_mid = model(model.scalars(t_mid)[0] * u, t_mid)
            xt_down = f.first_order(xt, x0) + (f.weight(1) / (2 * self.r1)) * (x0_mid - x0)
        if up > 0.0:
            z = ctx.noise(tuple(x.shape), dtype=x.dtype, device=x.device)
            xt_down = xt_down + (self.s_noise * up) * z
        return a1 * xt_down, None
