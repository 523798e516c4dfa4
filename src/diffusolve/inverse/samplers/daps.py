"""DAPS: decoupled annealing posterior sampling (Zhang, Chu, Berner, Meng, Anandkumar, Song,
CVPR 2025; "Improving Diffusion Inverse Problem Solving with Decoupled Noise Annealing").

DAPS anneals over the grid's noise levels, but consecutive states are *decoupled*: each
level draws a clean sample given ``x_t`` and ``y`` and re-noises it independently. At grid
time ``t`` (``st = sigma_t / alpha_t``, the noise level of ``x / alpha``):

1. ``x0_hat``: a short deterministic solve of the probability-flow ODE from ``x_t`` to the
   process's ``t_min`` (DDIM, ``eta = 0``, on ``ode_steps`` Karras-spaced times from ``t``,
   ending with the estimate of the denoiser there; ``ode_steps = 1`` is ``D(x_t)``);
2. ``x0_y``: ``langevin_steps`` steps of the Langevin dynamics from ``x0_hat`` targeting
   ``N(x0; x0_hat, r_t^2 I) * N(y; A(x0), tau^2 I)``, ``r_t = r_scale * st``, with the step
   ``eta_t = lr * (1 + (i / n) (lr_min_ratio - 1))`` decaying linearly over the ``n`` levels
   (the paper's schedule). The paper's step is Euler-Maruyama,

       x0 <- x0 + eta_t [ (x0_hat - x0) / r_t^2 + J_A(x0)^T (y - A(x0)) / tau^2 ] + sqrt(2 eta_t) z;

   here the same dynamics are split: a gradient step on the likelihood, then the Gaussian
   factor's Ornstein-Uhlenbeck flow over the time ``eta_t`` in closed form,

       x0 <- x0 + eta_t J_A(x0)^T (y - A(x0)) / tau^2
       x0 <- x0_hat + e^(-eta_t / r_t^2) (x0 - x0_hat) + r_t sqrt(1 - e^(-2 eta_t / r_t^2)) z.

   The two agree to first order in ``eta_t / r_t^2``; the split step stays stable at any
   noise level, where the paper's diverges once ``eta_t > 2 r_t^2`` (its annealing stops at
   noise 0.1 and avoids that; this grid goes down to the process's ``t_min``);
3. ``x_next = alpha' x0_y + sigma' z`` (fresh noise); from the last level ``x0_y`` is the
   result.

``inner="exact"`` replaces step 2 for a linear operator with an SVD
(``A = U diag(s) V_r^T``): the Langevin chain's target is Gaussian, diagonal in ``V``'s
coordinates ``c = V^T x0``, with precision ``1 / r_t^2 + s_j^2 / tau^2`` and mean
``(c_hat_j / r_t^2 + s_j (U^T y)_j / tau^2) / precision`` along the row space and
``N(c_hat_j, r_t^2)`` along the null space; it is sampled exactly (the chain's limit with
infinitely many steps). No step size, no ``langevin_steps`` gradients of ``A``, and no
stability limit: one SVD round trip per level. Where ``r_t`` is infinite (``alpha = 0``) the
prior factor is flat: the row space follows the likelihood alone and the null space keeps
``x0_hat``.

The likelihood's std ``tau`` is each sample's ``sigma_y`` by default; the paper's code uses
a fixed ``tau = 0.01`` on every task (with measurement noise 0.05), and its data gradient is
that of ``||A x - y||^2 / tau^2``, twice the Gaussian log-likelihood's used here. A noiseless
measurement needs an explicit ``tau``.

A run costs ``steps * ode_steps`` network evaluations (:meth:`DAPS.nfe`); the Langevin steps
use gradients of ``A`` only (per sample). The paper's DAPS-1K (its released configuration):
200 annealing levels (EDM noise 100 to 0.1, Karras ``rho = 7``: ``grid_kind = "karras"``
here), 5 ODE steps, 100 Langevin steps, ``lr = 1e-4``, ``lr_min_ratio = 0.01``,
``r_t = sigma_t`` (``r_scale = 1``); these are the defaults. The step size is absolute (in
data units squared) and was set for ``tau = 0.01``: tune ``lr`` to the data scale and
``tau`` (the likelihood step is stable for ``lr < 2 tau^2 / ||A||^2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...process import make_grid
from ..base import Operator
from .base import PosteriorSampler, Problem, register

__all__ = ["DAPS"]


@register
@dataclass(frozen=True)
class DAPS(PosteriorSampler):
    """Decoupled annealing posterior sampling.

    Args:
        ode_steps: network evaluations of the probability-flow solve per level (default 5).
        langevin_steps: Langevin steps per level (default 100).
        lr: Langevin step size at the first level (default 1e-4).
        lr_min_ratio: the step size at the last level, relative to ``lr`` (default 0.01).
        r_scale: ``r_t = r_scale * sigma_t / alpha_t`` (default 1.0).
        tau: the likelihood's std; ``None`` (default) uses each sample's ``sigma_y``.
        inner: ``"langevin"`` (default, the paper's) or ``"exact"`` (the Langevin target
            sampled in closed form; a linear operator with an SVD).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import CompressedSensing
        >>> from diffusolve.inverse.samplers import DAPS
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import edm
        >>> prior = Gaussian(torch.zeros(6), torch.eye(6), process=edm())
        >>> op = CompressedSensing((6,), 3, seed=0)
        >>> y = op(torch.ones(2, 6, dtype=torch.float64))
        >>> sampler = DAPS(ode_steps=2, langevin_steps=20, lr=1e-3)
        >>> stats = {}
        >>> sampler.run(prior, op, y, 0.1, steps=10, noise=0, stats=stats).shape
        torch.Size([2, 6])
        >>> stats["nfe"] == sampler.nfe(10) == 20
        True
    """

    ode_steps: int = 5
    langevin_steps: int = 100
    lr: float = 1e-4
    lr_min_ratio: float = 0.01
    r_scale: float = 1.0
    tau: float | None = None
    inner: str = "langevin"

    name: ClassVar[str] = "daps"
    needs: ClassVar[tuple[str, ...]] = ("grad",)
    requires: ClassVar[str] = "inner='exact': a linear operator with an SVD"
    INNER: ClassVar[tuple[str, ...]] = ("langevin", "exact")
    grid_kind: ClassVar[str] = "karras"
    citation: ClassVar[str] = (
        "Zhang, Chu, Berner, Meng, Anandkumar, Song. Improving Diffusion Inverse Problem "
        "Solving with Decoupled Noise Annealing. CVPR 2025."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "lr": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
        "r_scale": (0.5, 1.0, 2.0),
        "inner": INNER,
    }

    def __post_init__(self) -> None:
        for k in ("ode_steps", "langevin_steps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"daps: {k} must be a positive int; got {v!r}")
        self._positive(lr=self.lr, r_scale=self.r_scale)
        if not (isinstance(self.lr_min_ratio, (int, float)) and 0 < self.lr_min_ratio <= 1):
            raise ValueError(f"daps: lr_min_ratio must lie in (0, 1]; got {self.lr_min_ratio!r}")
        if self.tau is not None:
            self._positive(tau=self.tau)
        if self.inner not in self.INNER:
            raise ValueError(f"daps: inner must be one of {self.INNER}; got {self.inner!r}")

    def check(self, operator: Operator) -> None:
        super().check(operator)
        if self.inner == "exact":
            operator.require("linear", "svd", method="daps (inner='exact')")

    def nfe(self, steps: int) -> int:
        return int(steps) * self.ode_steps

    # ---------------------------------------------------------------- parts
    def init(self, p: Problem, x: Tensor) -> Any:
        if self.tau is not None:
            tau = torch.full_like(p.sigma_y, float(self.tau))
        else:
            if bool(torch.any(p.sigma_y <= 0)):
                raise ValueError(
                    "daps: with sigma_y = 0 the likelihood N(y; A x, sigma_y^2) is degenerate; "
                    "pass tau= (the paper's code uses tau=0.01)"
                )
            tau = p.sigma_y
        if p.operator.linear and self.inner == "langevin":
            # the likelihood's gradient step is explicit: along the top singular direction it
            # multiplies a deviation by |1 - lr ||A||^2 / tau^2| per Langevin step (the first
            # level has the largest step); where that compounds past 1e6 over a level's steps
            # the run would end in overflow, so say why instead
            norm2 = p.operator.norm() ** 2
            worst = self.lr * norm2 / float(tau.min()) ** 2
            if worst >= 2.0 and self.langevin_steps * math.log(worst - 1.0) > math.log(1e6):
                limit = 2.0 * float(tau.min()) ** 2 / norm2
                raise ValueError(
                    f"daps: the Langevin step is unstable for this problem: lr * ||A||^2 / "
                    f"tau^2 = {worst:.3g} (||A|| = {math.sqrt(norm2):.3g}, smallest tau = "
                    f"{float(tau.min()):.3g}) must stay below 2, or the "
                    f"{self.langevin_steps} Langevin steps grow a deviation by "
                    f"{worst - 1.0:.3g}^{self.langevin_steps}: use lr < {limit:.3g} or a "
                    "larger tau="
                )
        if self.inner == "exact":  # U^T y once: the measurement is fixed over the levels
            return tau, p.operator.svd().Ut(p.y)
        return tau

    def x0_hat(self, p: Problem, x: Tensor, i: int) -> Tensor:
        """The probability-flow ODE solve from ``x`` at grid time ``i`` (``ode_steps`` calls;
        one at a time already at the process's ``t_min``, which only a user grid has)."""
        t, t_end = float(p.times[i]), p.process.t_min
        if self.ode_steps == 1 or t <= t_end:  # (a user grid at t_min: no ODE left)
            return p.denoise(x, i)
        from ...solvers import sample

        grid = make_grid(p.process, self.ode_steps - 1, "karras", t_start=t, t_end=t_end)
        stats: dict[str, Any] = {}
        x0 = sample(
            p.model, x, grid, "ddim", cond=p.cond, final="denoise", stats=stats, progress=False
        )
        p.nfe += int(stats["nfe"])
        return x0

    def langevin(self, p: Problem, x0_hat: Tensor, i: int, tau: Tensor) -> Tensor:
        """Langevin steps on ``x0`` from ``x0_hat`` (per sample)."""
        r = self.r_scale * p.st(i)
        eta = self.lr * (1.0 + (i / p.n) * (self.lr_min_ratio - 1.0))
        lik_prec = p.col(1.0 / tau**2, x0_hat)
        if math.isinf(r):  # no prior factor: plain Langevin on the likelihood
            keep, spread = 1.0, math.sqrt(2.0 * eta)
        else:  # the Gaussian factor's Ornstein-Uhlenbeck flow over a time eta, exactly
            keep = math.exp(-eta / (r * r))
            spread = r * math.sqrt(-math.expm1(-2.0 * eta / (r * r)))
        x0 = x0_hat
        for _ in range(self.langevin_steps):
            x0 = x0 + eta * lik_prec * p.operator.vjp(x0, p.residual(x0)).to(x0.dtype)
            x0 = x0_hat + keep * (x0 - x0_hat) + spread * p.randn(x0)
        return x0

    def exact(
        self, p: Problem, x0_hat: Tensor, i: int, tau: Tensor, uty: Tensor | None = None
    ) -> Tensor:
        """One exact draw (per sample) from the Langevin chain's Gaussian target (``uty``:
        ``U^T y``, computed here when not given)."""
        svd = p.operator.svd()
        r = self.r_scale * p.st(i)
        dt = x0_hat.dtype
        s = svd.s.to(device=x0_hat.device, dtype=dt)
        k = s.numel()
        c = svd.Vt(x0_hat)
        z = svd.Vt(p.randn(x0_hat))  # V^T of per-sample N(0, I) noise: N(0, I) again
        yb = (svd.Ut(p.y) if uty is None else uty).to(dt)
        t2 = (tau.to(dt) ** 2)[:, None]
        if math.isinf(r):  # flat prior factor: the likelihood alone on the row space
            mean, var = yb / s, t2 / s**2
            rest = c[:, k:]
        else:
            prec = 1.0 / (r * r) + s**2 / t2
            mean, var = (c[:, :k] / (r * r) + s * yb / t2) / prec, 1.0 / prec
            rest = c[:, k:] + r * z[:, k:]
        return svd.V(torch.cat([mean + var.sqrt() * z[:, :k], rest], 1))

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        x0_hat = self.x0_hat(p, x, i)
        if self.inner == "exact":
            x0 = self.exact(p, x0_hat, i, *state)
        else:
            x0 = self.langevin(p, x0_hat, i, state)
        a_s, s_s = p.alpha[i + 1], p.sigma[i + 1]
        if s_s == 0.0:
            return a_s * x0, state
        return a_s * x0 + s_s * p.randn(x0), state
