"""Shared parts of the posterior samplers: the DDIM move, guided Tweedie estimates,
spectral coordinates, measurement-space solves.

All moves are written for a general process ``x_t = alpha_t x0 + sigma_t eps`` with the
grid's Python-float scalars (:class:`~.base.Problem`), so every sampler works on VP, VE,
EDM and rectified-flow models alike. ``st = sigma / alpha`` is the noise level of the
rescaled state ``x / alpha`` (the variance-exploding view, where DDRM and DDNM+ are stated).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import batched_cg
from .base import Problem

__all__ = [
    "ddim_move",
    "ddim_coefficients",
    "eps_of",
    "tweedie_shift",
    "vjp",
    "spectral",
    "from_spectral",
    "measurement_solve",
    "project",
    "r2_isotropic",
    "systematic_resample",
    "pick_one",
    "measurement_groups",
    "terminal_log_weight",
    "normal_cdf",
]


def ddim_coefficients(p: Problem, i: int, eta: float) -> tuple[float, float, float]:
    """``(a, b, c)`` of the move ``x_next = a x0 + b eps_hat + c z`` from time ``i`` to ``i+1``.

    DDIM (Song et al. 2021) for any process: ``c = eta * sigma_s * sqrt(1 - (st_s/st_t)^2)``
    and ``b = sqrt(sigma_s^2 - c^2)``; ``eta = 1`` is the DDPM ancestral step (the posterior
    ``q(x_s | x_t, x0)`` with ``x0`` the estimate), ``eta = 0`` the deterministic step. At the
    end (``sigma_s = 0``) the move returns ``x0``.
    """
    a_s, s_s = p.alpha[i + 1], p.sigma[i + 1]
    if s_s == 0.0:
        return a_s, 0.0, 0.0
    st_t, st_s = p.st(i), p.st(i + 1)
    ratio2 = 0.0 if math.isinf(st_t) else min((st_s / st_t) ** 2, 1.0)
    c = eta * s_s * math.sqrt(1.0 - ratio2)
    return a_s, math.sqrt(max(s_s * s_s - c * c, 0.0)), c


def eps_of(p: Problem, x: Tensor, x0: Tensor, i: int) -> Tensor:
    """The noise estimate ``(x - alpha_t x0) / sigma_t`` consistent with ``x0``."""
    return (x - p.alpha[i] * x0) / p.sigma[i]


def ddim_move(
    p: Problem, x: Tensor, x0: Tensor, i: int, eta: float, z: Tensor | None = None
) -> Tensor:
    """Move from grid time ``i`` to ``i + 1`` given the clean estimate ``x0`` (see
    :func:`ddim_coefficients`); ``z`` is drawn from the problem's noise source if needed."""
    a, b, c = ddim_coefficients(p, i, eta)
    if b == 0.0 and c == 0.0:
        return a * x0
    out = a * x0 + b * eps_of(p, x, x0, i)
    if c > 0.0:
        out = out + c * (p.randn(x) if z is None else z)
    return out


def vjp(x_leaf: Tensor, out: Tensor, v: Tensor) -> Tensor:
    """``J^T v`` for ``out = f(x_leaf)`` (per sample: samples do not mix in the network)."""
    (g,) = torch.autograd.grad(out, x_leaf, v)
    return g


def tweedie_shift(p: Problem, i: int, grad_log_lik: Tensor) -> Tensor:
    """The change of the clean estimate by a likelihood gradient (Tweedie for the posterior):
    ``E[x0 | x_t, y] = E[x0 | x_t] + sigma_t^2 / alpha_t * grad_(x_t) log p(y | x_t)``."""
    a, s = p.alpha[i], p.sigma[i]
    if a == 0.0:
        return torch.zeros_like(grad_log_lik)
    return (s * s / a) * grad_log_lik


def r2_isotropic(p: Problem, i: int, data_var: float = 1.0) -> float:
    """The variance of ``x0`` given ``x_t`` for data ``N(m, data_var I)``:
    ``st^2 v / (st^2 + v)`` with ``st = sigma_t / alpha_t`` (the heuristic of PiGDM)."""
    st = p.st(i)
    if math.isinf(st):
        return data_var
    return st * st * data_var / (st * st + data_var)


# ---------------------------------------------------------------- spectral coordinates
def spectral(p: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, ybar, noise_bar)`` for an operator with an SVD: the ``[r]`` singular values,
    ``ybar = U^T y / s`` (``[B, r]``) and the per-coordinate noise std ``sigma_y / s``."""
    svd = p.operator.svd()
    y = p.y
    s = svd.s_like(y)
    ybar = svd.Ut(y) / s
    noise_bar = p.sigma_y.reshape(-1, 1) / s
    return s, ybar, noise_bar


def from_spectral(p: Problem, c: Tensor) -> Tensor:
    """Image from spectral coefficients ``[B, n]``."""
    return p.operator.svd().V(c)


# ---------------------------------------------------------------- data consistency
def project(p: Problem, x0: Tensor) -> Tensor:
    """``x0 + A^+ (y - A x0)``: the closest point to ``x0`` that fits ``y`` (least squares),
    with the cheap pseudo-inverse when the operator has one, else conjugate gradients."""
    op = p.operator
    r = p.residual(x0)
    return x0 + (op.pinv(r) if op.has_pinv else op.lstsq(r))


def measurement_solve(
    p: Problem, r2: float | Tensor, v: Tensor, tol: float | None = None
) -> Tensor:
    """``(r2 A A^T + sigma_y^2 I)^(-1) v`` per sample (``v`` in measurement space).

    In closed form with an SVD (``U diag(1 / (r2 s^2 + sigma_y^2)) U^T`` on the range of
    ``A`` and ``1 / sigma_y^2`` on its orthogonal complement), else by conjugate gradients in
    measurement space. With ``sigma_y = 0`` the complement is ignored (``A A^T`` is then
    inverted on the range of ``A``: the pseudo-inverse).
    """
    op = p.operator
    sy2 = (
        p.sigma_y.to(
            torch.float64 if v.dtype in (torch.float64, torch.complex128) else torch.float32
        )
        ** 2
    )
    r2t = torch.as_tensor(r2, dtype=sy2.dtype, device=sy2.device)
    r2t = r2t.expand(p.batch) if r2t.ndim == 0 else r2t
    if op.has_svd:
        svd = op.svd()
        s = svd.s_like(sy2)
        c = svd.Ut(v)
        coef = c / (r2t[:, None] * s * s + sy2[:, None])
        out = svd.U(coef)
        if svd.rank < svd.dim_out:
            # the part of v outside the range of A: only the noise sees it
            rest = v - svd.U(c)
            inv = torch.where(sy2 > 0, 1.0 / torch.where(sy2 > 0, sy2, 1.0), 0.0)
            out = out + inv.reshape((-1,) + (1,) * (rest.ndim - 1)) * rest
        return out
    flat = op.flatten_y(v)

    def apply(u: Tensor) -> Tensor:
        w = op.flatten_y(op.A(op.At(op.unflatten_y(u))))
        return r2t.to(u.dtype)[:, None] * w + sy2.to(u.dtype)[:, None] * u

    sol = batched_cg(apply, flat, torch.zeros_like(flat), tol=tol, max_iter=200)
    return op.unflatten_y(sol)


# ---------------------------------------------------------------- particles
def normal_cdf(z: Tensor) -> Tensor:
    """``Phi(z)``: turns the noise source's normals into uniforms (per-sample seeds kept)."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


def terminal_log_weight(p: Problem, x: Tensor, x0: Tensor, d0: Tensor) -> Tensor:
    """``log p_t0(x) - log N(x; 0, (alpha^2 + sigma^2) I)`` at the grid's first time, up to a
    constant per row: ``[B, N]`` for particles ``x`` ``[B, N, ...]`` with their estimates
    ``x0 = x0_hat(x)`` and ``d0 = x0_hat(0)`` ``[B, ...]``.

    The importance weight that turns the usual ``N(0, v I)`` start into the model's marginal
    at ``t_0``: ``grad log p_t(x) = (alpha x0_hat(x) - x) / sigma^2``, so the log ratio is
    that score's line integral from ``0`` (plus the Gaussian's), here by the trapezoid
    rule through ``x0_hat(0)`` and ``x0_hat(x)``: exact when the score is linear in ``x``,
    that is for every Gaussian prior."""
    a, s = p.alpha[0], p.sigma[0]
    v = a * a + s * s
    dims = tuple(range(2, x.ndim))
    mid = 0.5 * (x0 + d0[:, None])
    lin = (a / (s * s)) * (mid * x).sum(dims)
    quad = (x * x).sum(dims) * (0.5 / v - 0.5 / (s * s))
    return lin + quad


def measurement_groups(y: Tensor, sigma_y: Tensor) -> list[Tensor]:
    """The rows of a batch grouped by equal measurement and noise level: a list of ``[k]``
    row-index tensors (each in increasing order; groups ordered by their first row)."""
    rows = _real_rows(y)
    key = torch.cat([rows, sigma_y.reshape(-1, 1).to(rows.dtype)], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(inverse.tolist()):
        groups.setdefault(g, []).append(row)
    return [torch.tensor(r, device=y.device) for r in groups.values()]


def _real_rows(y: Tensor) -> Tensor:
    v = torch.view_as_real(y) if y.is_complex() else y
    return v.reshape(v.shape[0], -1)


def _systematic(w: Tensor, u: Tensor, m: int) -> Tensor:
    """``m`` systematic draws (indices) from the normalised weights ``w`` ``[N]`` with the
    uniform ``u``."""
    pos = (u + torch.arange(m, dtype=w.dtype, device=w.device)) / m
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, pos.contiguous()).clamp(max=w.numel() - 1)


def systematic_resample(
    p: Problem,
    logw: Tensor,
    *tensors: Tensor,
    ess: float = 1.0,
    groups: list[Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """Systematic resampling of ``[B, N, ...]`` particle tensors by ``[B, N]`` log weights,
    for the rows whose effective sample size is below ``ess * N`` (all rows when
    ``ess >= 1``); resampled rows get equal weights. One uniform per row from the problem's
    noise source, so a row's result does not depend on its batch.

    With ``groups`` (row-index tensors, see :func:`measurement_groups`) the rows of a group
    are one population of ``k * N`` particles, resampled together (its ESS against
    ``ess * k * N``; the uniform of its first row)."""
    if groups is not None:
        return _pooled_resample(p, logw, tensors, ess, groups)
    n = logw.shape[1]
    w = torch.softmax(logw, dim=1)
    need = (1.0 / (w * w).sum(1)) < ess * n - 1e-9
    if ess >= 1.0:
        need = torch.ones_like(need)
    if not bool(need.any()):
        return (logw, *tensors)
    u = normal_cdf(p.noise((logw.shape[0], 1), dtype=w.dtype, device=w.device))
    pos = (u + torch.arange(n, dtype=w.dtype, device=w.device)) / n
    cdf = torch.cumsum(w, 1)
    cdf[:, -1] = 1.0
    idx = torch.searchsorted(cdf, pos.contiguous()).clamp(max=n - 1)
    out = []
    for t in tensors:
        flat = t.reshape(t.shape[0], n, -1)
        picked = torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[-1]))
        picked = picked.reshape(t.shape)
        out.append(torch.where(need.reshape((-1,) + (1,) * (t.ndim - 1)), picked, t))
    logw = torch.where(need[:, None], torch.zeros_like(logw), logw)
    return (logw, *out)


def _pooled_resample(
    p: Problem, logw: Tensor, tensors: tuple[Tensor, ...], ess: float, groups: list[Tensor]
) -> tuple[Tensor, ...]:
    n = logw.shape[1]
    weights, todo = [], []
    for rows in groups:
        w = torch.softmax(logw[rows].reshape(-1), 0)
        if ess >= 1.0 or float(1.0 / (w * w).sum()) < ess * w.numel() - 1e-9:
            weights.append(w)
            todo.append(rows)
    if not todo:
        return (logw, *tensors)
    u = normal_cdf(p.noise((logw.shape[0], 1), dtype=logw.dtype, device=logw.device))[:, 0]
    logw = logw.clone()
    out = [t.clone() for t in tensors]
    for rows, w in zip(todo, weights, strict=True):
        idx = _systematic(w, u[rows[0]], w.numel())
        for t, o in zip(tensors, out, strict=True):
            block = t[rows]
            o[rows] = block.reshape(rows.numel() * n, *t.shape[2:])[idx].reshape(block.shape)
        logw[rows] = 0.0
    return (logw, *out)


def pick_one(
    p: Problem, logw: Tensor, particles: Tensor, groups: list[Tensor] | None = None
) -> Tensor:
    """One particle per row ``[B, ...]`` drawn by the weights (one uniform per row).

    With ``groups`` the ``k`` rows of a group get ``k`` systematic draws from the group's
    ``k * N`` particles, handed to its rows in an order drawn from the noise source."""
    n = logw.shape[1]
    if groups is not None:
        u = normal_cdf(p.noise((logw.shape[0], 1), dtype=logw.dtype, device=logw.device))
        keys = p.noise((logw.shape[0], 1), dtype=logw.dtype, device=logw.device)[:, 0]
        out = particles[:, 0].clone()
        for rows in groups:
            k = rows.numel()
            w = torch.softmax(logw[rows].reshape(-1), 0)
            idx = _systematic(w, u[rows[0], 0], k)[torch.argsort(keys[rows])]
            out[rows] = particles[rows].reshape(k * n, *particles.shape[2:])[idx]
        return out
    w = torch.softmax(logw, dim=1)
    u = normal_cdf(p.noise((logw.shape[0], 1), dtype=w.dtype, device=w.device))
    cdf = torch.cumsum(w, 1)
    cdf[:, -1] = 1.0
    idx = torch.searchsorted(cdf, u.contiguous()).clamp(max=n - 1)[:, 0]
    return particles[torch.arange(particles.shape[0], device=idx.device), idx]
