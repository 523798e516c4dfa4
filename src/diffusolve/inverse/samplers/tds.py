"""TDS: twisted diffusion sampler (Wu, Trippe, Naesseth, Blei, Cunningham, NeurIPS 2023),
here with the PiGDM likelihood as the twisting function.

Sequential Monte Carlo over the model's backward chain ``p(x_s | x_t) = N(m(x0_hat), c^2 I)``
(DDIM with ``eta > 0``) targeting ``p(x_0 | y)``. Every particle carries the twisting
potential

    log p~(y | x_t) = -1/2 r^T (r_t^2 A A^T + sigma_y^2 I)^-1 r,   r = y - A x0_hat(x_t)

(PiGDM's Gaussian approximation; the log-determinant is the same for all particles of a row
and cancels). The proposal is PiGDM's guided move (the kernel's mean from
``x0_y = x0_hat + sigma_t^2 / alpha_t grad log p~``, same ``c``); the weight of a move is

    p(x_s | x_t) p~(y | x_s) / (q(x_s | x_t) p~(y | x_t)),

completed at the next step, whose single network evaluation gives ``p~(y | x_s)`` and the
next proposal. The last step draws ``x_0`` from ``N(x0_hat, r^2 I)`` conditioned exactly on
``y`` (Matheron's update), whose evidence is the potential itself, so it adds no weight.
With ``kernel="2m"`` the backward chain's mean uses the second-order multistep estimate
``D = x0_hat + (x0_hat - x0_prev) / (2 r)`` (``r = h_prev / h`` in log-SNR steps) in place of
``x0_hat``: for ``eta = 1`` the kernel is SDE-DPM-Solver++(2M) (Lu et al. 2022, midpoint
form), the same Gaussian family, so the weights keep their form; each particle carries its
previous estimate through resampling. The proposal shifts ``D`` by the same guidance term
``x0_y - x0_hat``.

**The start.** The particles start from ``N(0, (alpha^2 + sigma^2) I)`` at ``t_0``, the usual
stand-in for the model's marginal ``p_t0``. That stand-in is poor when ``alpha_t0 |x0|`` is
not small (data far from the origin in many dimensions: ``alpha = 0.0064`` at the end of
DDPM's linear schedule, ``|x0| ~ 100`` gives a shift of 0.6 standard deviations), and the
chain then draws the modes of a multimodal prior with the wrong weights. With
``terminal="weighted"`` (the default) the first weights also carry the importance ratio
``p_t0(x) / N(x; 0, v I)``: since ``grad log p_t0(x) = (alpha x0_hat(x) - x) / sigma^2``, the
ratio is the line integral of that score from ``0``, taken by the trapezoid rule through
``x0_hat(0)`` and the particle's own ``x0_hat(x)``. The trapezoid is exact when the score is
linear, so the weight is exact for every Gaussian prior; ``x0_hat(0)`` is one more row in the
first network call (no extra call). ``terminal="noise"`` keeps the plain start.

**Particles.** Particles are resampled (systematic) when the effective sample size falls
below ``ess * particles``. By default (``pool=True``) the rows that share a measurement
(equal ``y`` and ``sigma_y``) run one filter of ``rows * particles`` particles, and its rows
get systematic draws from the final cloud, as the MCGdiff authors' code returns its particle
cloud: asking for ``k`` samples of one measurement (``y`` repeated ``k`` times) gives ``k``
draws from one filter of ``k * particles`` particles. A row's result never depends on rows
with other measurements; the samples of one measurement are dependent and depend on how
many there are. With ``pool=False`` each row runs its own filter of ``particles`` particles
and returns one particle drawn by its final weights, so a row never depends on its batch;
at the same network cost its finite-particle bias is far larger (on the bench's d = 80
problems, 100 steps: 1.7x the floor pooled with a quarter of the particles, 4-6x per row on
the hard problems). Either way the sampler is asymptotically exact for the model's
backward chain as the particles grow; with a Gaussian prior of variance ``data_var`` the
potentials are exact and so are the samples. One network evaluation (with a
vector-Jacobian product) per step on ``batch * particles`` rows.

Needs a linear operator (the solve uses the SVD when there is one, else conjugate
gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import PosteriorSampler, Problem, register
from .parts import (
    ddim_coefficients,
    measurement_groups,
    measurement_solve,
    pick_one,
    r2_isotropic,
    systematic_resample,
    terminal_log_weight,
    tweedie_shift,
    vjp,
)

__all__ = ["TDS"]


def _rows(t: Tensor, n: int) -> Tensor:
    """``[B, ...]`` -> ``[B * n, ...]`` (each row repeated ``n`` times, consecutively)."""
    return t.repeat_interleave(n, dim=0)


def last_step(p: Problem, i: int) -> bool:
    return i == p.n - 1


def _dot(u: Tensor, v: Tensor) -> Tensor:
    if u.is_complex():
        u, v = torch.view_as_real(u), torch.view_as_real(v)
    return (u * v).reshape(u.shape[0], -1).sum(1)


@register
@dataclass(frozen=True)
class TDS(PosteriorSampler):
    """Twisted diffusion sampler with the PiGDM potential.

    Args:
        particles: particles per output sample (default 32).
        eta: DDIM stochasticity of the backward kernel, in (0, 1] (default 1.0: DDPM).
        ess: resample when the effective sample size is below ``ess * particles``
            (default 0.5).
        data_var: the data variance ``v`` in ``r_t^2 = st^2 v / (st^2 + v)`` (default 1.0).
        covariance: the covariance of ``x0`` given ``x_t`` in the potential:
            ``"isotropic"`` (``r_t^2 I``, PiGDM's) or ``"jacobian"`` (Tweedie's second
            moment ``sigma_t^2 / alpha_t * d x0_hat / d x_t``, exact for any Gaussian prior
            and per mixture component; the solve then takes one vector-Jacobian product per
            conjugate-gradient iteration, at most ``cg_iters``) (default "jacobian").
        cg_iters: conjugate-gradient iterations of the ``"jacobian"`` solve (default 4:
            exact for up to 4 measurements, a few Krylov directions beyond).
        kernel: the backward chain: ``"ddpm"`` (DDIM with ``eta``; first order) or ``"2m"``
            (its mean from the second-order multistep estimate; SDE-DPM-Solver++(2M) at
            ``eta = 1``) (default "2m").
        terminal: ``"weighted"`` (the start is importance-weighted towards the model's
            marginal at ``t_0``; see the module docstring) or ``"noise"`` (the plain
            ``N(0, v I)`` start) (default "weighted").
        pool: rows sharing a measurement run one filter and share its particles (default
            True; False: one filter per row, independent of the batch).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import CompressedSensing
        >>> from diffusolve.inverse.samplers import TDS
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(6), torch.eye(6), process=ddpm())
        >>> op = CompressedSensing((6,), 2, seed=0)
        >>> y = op(torch.ones(3, 6, dtype=torch.float64))
        >>> TDS(particles=8).run(prior, op, y, 0.1, steps=10, noise=0).shape
        torch.Size([3, 6])
    """

    particles: int = 32
    eta: float = 1.0
    ess: float = 0.5
    data_var: float = 1.0
    covariance: str = "jacobian"
    cg_iters: int = 4
    kernel: str = "2m"
    terminal: str = "weighted"
    pool: bool = True

    name: ClassVar[str] = "tds"
    needs: ClassVar[tuple[str, ...]] = ("linear",)
    citation: ClassVar[str] = (
        "Wu, Trippe, Naesseth, Blei, Cunningham. Practical and Asymptotically Exact "
        "Conditional Sampling in Diffusion Models. NeurIPS 2023."
    )
    # pool is not searched: it trades batch independence for a smaller particle bias, which
    # a few tuning problems of a few hundred samples cannot see (see the module docstring)
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {"eta": (0.5, 1.0), "kernel": ("ddpm", "2m")}

    def __post_init__(self) -> None:
        self._count(particles=self.particles)
        if not (isinstance(self.eta, (int, float)) and 0 < self.eta <= 1):
            raise ValueError(
                f"tds: eta must lie in (0, 1] (the kernel needs noise); got {self.eta!r}"
            )
        self._unit(ess=self.ess)
        self._positive(data_var=self.data_var)
        if self.covariance not in ("isotropic", "jacobian"):
            raise ValueError(
                f"tds: covariance must be 'isotropic' or 'jacobian'; got {self.covariance!r}"
            )
        self._count(cg_iters=self.cg_iters)
        if not isinstance(self.pool, bool):
            raise ValueError(f"tds: pool must be True or False; got {self.pool!r}")
        if self.kernel not in ("ddpm", "2m"):
            raise ValueError(f"tds: kernel must be 'ddpm' or '2m'; got {self.kernel!r}")
        if self.terminal not in ("weighted", "noise"):
            raise ValueError(f"tds: terminal must be 'weighted' or 'noise'; got {self.terminal!r}")

    def _jacobian_solve(
        self, p: Problem, pp: Problem, i: int, xg: Tensor, x0: Tensor, res: Tensor
    ) -> Tensor:
        """``(A C A^T + sigma_y^2 I)^-1 res`` with ``C = sigma_t^2 / alpha_t J`` (``J`` the
        symmetric denoiser Jacobian, applied by vector-Jacobian products), by per-sample
        conjugate gradients in measurement space."""
        from ..linalg import batched_cg

        op = p.operator
        scale = p.sigma[i] ** 2 / p.alpha[i] if p.alpha[i] > 0 else 0.0
        sy2 = pp.sigma_y.to(res.dtype) ** 2

        def apply(u: Tensor) -> Tensor:
            v = op.At(u).to(x0.dtype)
            (jv,) = torch.autograd.grad(x0, xg, v, retain_graph=True)
            return scale * op.A(jv).to(u.dtype) + pp.col(sy2, u) * u

        return batched_cg(apply, res, torch.zeros_like(res), max_iter=self.cg_iters)

    # ---------------------------------------------------------------- pieces
    def _particle_problem(self, p: Problem) -> Problem:
        n = self.particles
        pp = Problem(
            p.model, p.operator, _rows(p.y, n), _rows(p.sigma_y, n), p.times, p.noise, p.cond
        )
        return pp

    def init(self, p: Problem, x: Tensor) -> Any:
        n = self.particles
        shape = (p.batch, n, *x.shape[1:])
        eps = p.noise(shape, dtype=x.dtype, device=x.device)
        a, s = p.alpha[0], p.sigma[0]
        xp = math.sqrt(a * a + s * s) * eps
        logw = torch.zeros(p.batch, n, dtype=x.dtype, device=x.device)
        groups = measurement_groups(p.y, p.sigma_y) if self.pool else None
        return xp, logw, None, self._particle_problem(p), None, groups

    def _lam(self, p: Problem, i: int) -> float:
        return -math.log(p.st(i))

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        xp, logw, pending, pp, x0_prev, groups = state
        b, n = p.batch, self.particles
        flat = xp.reshape(b * n, *xp.shape[2:])
        first = i == 0 and self.terminal == "weighted"
        if first:
            zero = torch.zeros((b, *xp.shape[2:]), dtype=xp.dtype, device=xp.device)
            xg = flat.detach().requires_grad_(True)
            with torch.enable_grad():
                both = p.denoise(torch.cat([xg, zero]), i)
                x0, d0 = both[: b * n], both[b * n :].detach()
        else:
            xg, x0 = p.denoise_with_grad(flat, i)
        r2 = r2_isotropic(p, i, self.data_var)
        with torch.no_grad():
            res = pp.residual(x0.detach())
        if self.covariance == "jacobian" and not last_step(p, i):
            h = self._jacobian_solve(p, pp, i, xg, x0, res).detach()
        else:
            with torch.no_grad():
                h = measurement_solve(pp, r2, res)
        log_pot = (-0.5 * _dot(res, h)).reshape(b, n).to(logw.dtype)
        g = vjp(xg, x0, p.operator.At(h).to(x0.dtype))
        x0 = x0.detach()
        x0_y = x0 + tweedie_shift(p, i, g)
        # complete the previous move's weight with this level's potential
        logw = logw + log_pot - (pending if pending is not None else 0.0)
        if first:
            logw = logw + terminal_log_weight(p, xp, x0.reshape(xp.shape), d0).to(logw.dtype)
        last = i == p.n - 1
        shp = (b, n, *xp.shape[2:])
        carry = (xp, x0.reshape(shp), x0_y.reshape(shp), log_pot)
        if x0_prev is not None:
            carry = (*carry, x0_prev)
        logw, xp, x0, x0_y, log_pot, *rest = systematic_resample(
            p, logw, *carry, ess=self.ess, groups=groups
        )
        x0_prev = rest[0] if rest else None
        if last:
            # x0 ~ N(x0_hat, r^2 I) conditioned on y (Matheron): x0_y + z - K (A z + noise)
            z = math.sqrt(r2) * p.noise(shp, dtype=xp.dtype, device=xp.device)
            zf = z.reshape(b * n, *xp.shape[2:])
            e = p.noise((b, n, *p.operator.out_shape), dtype=xp.dtype, device=xp.device)
            ef = e.reshape(b * n, *p.operator.out_shape)
            if res.is_complex():
                raise NotImplementedError("tds: complex measurements are not supported yet")
            pert = p.operator.A(zf) + pp.col(pp.sigma_y, ef) * ef
            corr = r2 * p.operator.At(measurement_solve(pp, r2, pert)).to(zf.dtype)
            out = x0_y.reshape(b * n, *xp.shape[2:]) + zf - corr
            return out.reshape(shp)[:, 0], (out.reshape(shp), logw, None, pp, None, groups)
        a, bc, c = ddim_coefficients(p, i, self.eta)
        a_t, s_t = p.alpha[i], p.sigma[i]
        est = x0
        if self.kernel == "2m" and x0_prev is not None and p.sigma[i + 1] > 0:
            h = self._lam(p, i + 1) - self._lam(p, i)
            h_prev = self._lam(p, i) - self._lam(p, i - 1)
            est = x0 + (x0 - x0_prev) * (h / (2.0 * h_prev))
        # the kernel's mean and the proposal's mean (same noise c); the proposal's estimate
        # is the kernel's shifted by the guidance term x0_y - x0
        est_q = est + (x0_y - x0)
        m_p = a * est + bc * (xp - a_t * est) / s_t
        m_q = a * est_q + bc * (xp - a_t * est_q) / s_t
        z = p.noise(shp, dtype=xp.dtype, device=xp.device)
        x_next = m_q + c * z
        dims = tuple(range(2, xp.ndim))
        log_ratio = (-0.5 * ((x_next - m_p) ** 2).sum(dims) + 0.5 * (c * z).pow(2).sum(dims)) / (
            c * c
        )
        logw = logw + log_ratio
        # only the multistep kernel needs this step's estimate (carried through resampling)
        keep = x0 if self.kernel == "2m" else None
        return x_next[:, 0], (x_next, logw, log_pot, pp, keep, groups)

    def finish(self, p: Problem, x: Tensor, state: Any) -> Tensor:
        xp, logw, *_, groups = state
        return pick_one(p, logw, xp, groups)
