"""MCGdiff: Monte Carlo guided diffusion (Cardoso, Janati, Le Corff, Moulines, ICLR 2024).

A sequential Monte Carlo sampler for linear Gaussian measurements, in the spectral basis of
``A = U diag(s) V^T`` on the rescaled state ``x / alpha`` (noise level ``st``). With
``ybar_j = (U^T y)_j / s_j`` and ``n_j = sigma_y / s_j``, the measurement of coordinate ``j``
has the law of the forward-noised coordinate at the level ``st = n_j``: conditioning on
``y`` is conditioning the diffusion's coordinate ``j`` to equal ``ybar_j`` at that level
``tau_j``. So:

* above ``tau_j`` the particles are twisted by the forward potential
  ``g_t(c) = N(c_j; ybar_j, st_t^2 - n_j^2)``; the proposal is the product of the model's
  Gaussian backward kernel ``N(mu_j, v)`` (DDIM with ``eta``) and ``g``, and the weight is
  ``N(ybar_j; mu_j, v + st_s^2 - n_j^2) / g_t(c_t)``;
* at ``tau_j`` the coordinate is set to ``ybar_j`` (weight ``N(ybar_j; mu_j, v) / g_t``);
* below ``tau_j``, and for the coordinates ``A`` does not see, the backward kernel alone.

The evaluation times are those of the sampler's grid with the levels ``n_j`` put on it
(for each, one of the two grid levels that bracket it moves onto it, down to the process's
smallest noise level), so every ``tau_j`` is a grid level while there are fewer
measurement levels than grid levels; with more (a blur, a dense matrix at few steps) a
level moves once and the others fall between grid levels, where a coordinate is set to
its measurement at the step that crosses its level; levels below the process's smallest
noise level are
handled by the last step (the observation times a Gaussian
``x0`` of variance ``r_t^2``), coordinates noisier than the start level are ignored (their
measurement carries no information at that noise). Particles are resampled when the
effective sample size falls below ``ess * particles`` (every step by default, as in the
paper). Each output row runs its own filter of ``particles`` particles and returns one
particle drawn by the final weights: the result is asymptotically exact for the model's
backward chain as ``particles`` grows, and a batch never changes a row's result (with
per-sample seeds). One network evaluation per step on ``batch * particles`` rows.

Two options beyond the paper (shared with :class:`~.tds.TDS`): ``terminal="weighted"``
importance-weights the ``N(0, v I)`` start towards the model's marginal at ``t_0``
(:func:`~.parts.terminal_log_weight`; it matters for data far from the origin in many
dimensions), and ``pool=True`` makes the rows sharing a measurement one filter of
``rows * particles`` particles whose final cloud they share, as the authors' experiment
code returns its particle cloud (rows are then dependent and depend on the batch).

Needs an SVD of ``A`` and one ``sigma_y`` for the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...process import make_grid
from .base import PosteriorSampler, Problem, register
from .parts import (
    measurement_groups,
    pick_one,
    r2_isotropic,
    spectral,
    systematic_resample,
    terminal_log_weight,
)

__all__ = ["MCGdiff"]

_LOG2PI = math.log(2 * math.pi)


def _log_normal(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + _LOG2PI)


@register
@dataclass(frozen=True)
class MCGdiff(PosteriorSampler):
    """Monte Carlo guided diffusion (sequential Monte Carlo in the spectral basis).

    Args:
        particles: particles per output sample (default 64; the paper's experiments use
            hundreds to thousands).
        eta: DDIM stochasticity of the backward kernel (default 1.0: the DDPM kernel).
        ess: resample when the effective sample size is below ``ess * particles``
            (default 1.0: every step, as in the paper).
        data_var: the variance of ``x0`` given the last state, used by the last step for
            measurement levels below the grid (default 1.0).
        terminal: ``"noise"`` (the paper's ``N(0, v I)`` start) or ``"weighted"`` (that start
            importance-weighted towards the model's marginal at ``t_0``) (default "noise").
        pool: rows sharing a measurement run one filter and share its particles (default
            False: one filter per row).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import CompressedSensing
        >>> from diffusolve.inverse.samplers import MCGdiff
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(6), torch.eye(6), process=ddpm())
        >>> op = CompressedSensing((6,), 2, seed=0)
        >>> y = op(torch.ones(3, 6, dtype=torch.float64))
        >>> MCGdiff(particles=16).run(prior, op, y, 0.1, steps=10, noise=0).shape
        torch.Size([3, 6])
    """

    particles: int = 64
    eta: float = 1.0
    ess: float = 1.0
    data_var: float = 1.0
    terminal: str = "noise"
    pool: bool = False

    name: ClassVar[str] = "mcgdiff"
    needs: ClassVar[tuple[str, ...]] = ("svd",)
    citation: ClassVar[str] = (
        "Cardoso, Janati, Le Corff, Moulines. Monte Carlo Guided Denoising Diffusion Models "
        "for Bayesian Linear Inverse Problems. ICLR 2024."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "eta": (0.5, 0.85, 1.0),
        "terminal": ("noise", "weighted"),
        "pool": (False, True),
    }

    def __post_init__(self) -> None:
        self._count(particles=self.particles)
        self._unit(eta=self.eta, ess=self.ess)
        self._positive(data_var=self.data_var)
        if self.terminal not in ("weighted", "noise"):
            raise ValueError(
                f"mcgdiff: terminal must be 'weighted' or 'noise'; got {self.terminal!r}"
            )
        if not isinstance(self.pool, bool):
            raise ValueError(f"mcgdiff: pool must be True or False; got {self.pool!r}")

    # ---------------------------------------------------------------- the grid
    def times(self, process: Any, steps: int, operator: Any, sigma_y: Tensor) -> Tensor:
        if not torch.all(sigma_y == sigma_y[0]):
            raise ValueError(
                "mcgdiff puts the measurement noise levels on its grid, so a batch needs one "
                "sigma_y; run rows with different sigma_y separately"
            )
        base = make_grid(process, steps, self.grid_kind)[:-1]
        sy = float(sigma_y[0])
        if steps < 2 or sy == 0.0:
            return base
        s = operator.svd().s
        floor_level = float(process.sigma_tilde(process.t_min))
        start = float(process.sigma_tilde(base[0]))
        targets = sorted(
            {float(v) for v in sy / s if floor_level <= float(v) < start}, reverse=True
        )
        if not targets:
            return base
        # the grid ends at the sharpest measurement level when it lies below the grid's
        # last level (so it is an evaluation time, not a long last jump) ...
        lowest = min(targets[-1], float(process.sigma_tilde(base[-1])))
        t_end = float(process.t_of_sigma_tilde(torch.tensor(lowest, dtype=torch.float64)))
        times = make_grid(process, steps - 1, self.grid_kind, t_end=t_end)
        # ... and a level next to each other measurement level (one of the two that bracket
        # it, in log noise) moves onto it; a level moves once, so with more measurement
        # levels than grid levels the rest fall between levels (the "land" case of the step)
        # and the grid keeps its spacing (moving farther levels crowds the grid where the
        # measurement levels crowd and leaves long steps elsewhere)
        log_levels = torch.log(process.sigma_tilde(times))
        used = {0, steps - 1}
        for n_j in targets:
            target = math.log(n_j)
            dist = (log_levels - target).abs()
            if any(float(dist[k]) < 1e-9 for k in used):
                continue  # already a grid level (the last one)
            below = int(torch.count_nonzero(log_levels > target))  # levels descend
            free = [k for k in (below - 1, below) if 0 <= k < len(times) and k not in used]
            if not free:
                continue
            k = min(free, key=lambda j: float(dist[j]))
            used.add(k)
            times[k] = process.t_of_sigma_tilde(torch.tensor(n_j, dtype=torch.float64))
        times = torch.sort(times, descending=True).values
        keep = torch.cat([torch.tensor([True]), times[1:] < times[:-1]])
        return times[keep]

    # ---------------------------------------------------------------- the filter
    def init(self, p: Problem, x: Tensor) -> Any:
        _, ybar, nbar = spectral(p)
        svd = p.operator.svd()
        b, n, r = p.batch, svd.dim_in, svd.rank
        st0 = p.st(0)
        eps = p.noise((b, self.particles, n), dtype=x.dtype, device=x.device)
        c = math.sqrt(1.0 + st0 * st0) * eps  # the process prior at t_0, unit data variance
        ybar, nbar = ybar[:, None, :], nbar[:, None, :]
        active = nbar < st0
        var = torch.where(active, st0 * st0 - nbar * nbar, torch.ones_like(nbar))
        logw = torch.where(active, _log_normal(c[..., :r], ybar, var), 0.0).sum(-1)
        groups = measurement_groups(p.y, p.sigma_y) if self.pool else None
        return c, logw, ybar, nbar, groups

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        c, logw, ybar, nbar, groups = state
        svd = p.operator.svd()
        b, m, n = c.shape
        r = svd.rank
        img = p.alpha[i] * svd.V(c.reshape(b * m, n))
        if i == 0 and self.terminal == "weighted":
            # x0_hat(0) rides along in the first call (one more row per sample)
            both = p.denoise(torch.cat([img, torch.zeros_like(img[:b])]), i)
            den, d0 = both[: b * m], both[b * m :]
            shp = (b, m, *img.shape[1:])
            logw = logw + terminal_log_weight(p, img.reshape(shp), den.reshape(shp), d0).to(
                logw.dtype
            )
        else:
            den = p.denoise(img, i)
        c0 = svd.Vt(den).reshape(b, m, n)
        # the network is row-wise, so resampling after the call equals resampling before it
        logw, c, c0 = systematic_resample(p, logw, c, c0, ess=self.ess, groups=groups)
        st, sn = p.st(i), p.st(i + 1)
        # the backward kernel N(mean, v) on the rescaled state (DDIM with eta)
        if sn == 0.0:
            mean, v = c0, 0.0
        else:
            ratio2 = min((sn / st) ** 2, 1.0)
            cn = self.eta * sn * math.sqrt(1.0 - ratio2)
            mean = c0 + math.sqrt(max(sn * sn - cn * cn, 0.0)) * (c - c0) / st
            v = cn * cn
        z = p.noise((b, m, n), dtype=c.dtype, device=c.device)
        nxt = mean + math.sqrt(v) * z
        # observed coordinates
        mu, cr, zr = mean[..., :r], c[..., :r], z[..., :r]
        above_t = nbar < st
        g_var_t = torch.where(above_t, st * st - nbar * nbar, torch.ones_like(nbar))
        log_g_t = torch.where(above_t, _log_normal(cr, ybar, g_var_t), 0.0)
        if sn == 0.0:
            # the last step: x0 ~ N(mean, r^2) times the observation N(ybar, n^2)
            vf = r2_isotropic(p, i, self.data_var)
            post_var = 1.0 / (1.0 / vf + 1.0 / torch.clamp(nbar * nbar, min=1e-300))
            post_mean = post_var * (mu / vf + ybar / torch.clamp(nbar * nbar, min=1e-300))
            post_mean = torch.where(nbar > 0, post_mean, ybar.expand_as(mu))
            post_var = torch.where(nbar > 0, post_var, torch.zeros_like(post_var))
            val = post_mean + post_var.sqrt() * zr
            inc = torch.where(above_t, _log_normal(ybar, mu, vf + nbar * nbar) - log_g_t, 0.0)
            obs = torch.where(above_t, val, nxt[..., :r])
        else:
            pot_s = nbar < sn
            land = above_t & ~pot_s
            w_s = torch.where(pot_s, sn * sn - nbar * nbar, torch.ones_like(nbar))
            if v > 0:
                prop_var = 1.0 / (1.0 / v + 1.0 / w_s)
                prop_mean = prop_var * (mu / v + ybar / w_s)
                prop = prop_mean + prop_var.sqrt() * zr
                log_pred_pot = _log_normal(ybar, mu, v + w_s)
                log_pred_land = _log_normal(ybar, mu, torch.full_like(mu, v))
            else:  # a deterministic kernel: the proposal is the kernel itself
                prop = mu
                log_pred_pot = _log_normal(mu, ybar, w_s)
                log_pred_land = torch.zeros_like(mu)  # a point mass cannot be conditioned
            obs = torch.where(pot_s, prop, torch.where(land, ybar.expand_as(mu), nxt[..., :r]))
            inc = torch.where(
                pot_s, log_pred_pot - log_g_t, torch.where(land, log_pred_land - log_g_t, 0.0)
            )
        logw = logw + inc.sum(-1)
        c_next = torch.cat([obs, nxt[..., r:]], -1)
        x_next = p.alpha[i + 1] * svd.V(c_next[:, 0])
        return x_next, (c_next, logw, ybar, nbar, groups)

    def finish(self, p: Problem, x: Tensor, state: Any) -> Tensor:
        c, logw, _, _, groups = state
        return p.operator.svd().V(pick_one(p, logw, c, groups))
