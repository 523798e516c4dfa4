"""High-accuracy probability-flow ODE references by an adaptive float64 solve (scipy).

With ``x~ = x / alpha`` and ``u = log(sigma / alpha) = -lambda``, the probability-flow ODE
of any process ``x_t = alpha x0 + sigma eps`` is the same for every process:

    ``dx~/du = x~ - D(alpha x~, t(u))``,

where ``D`` is the denoiser (Tweedie estimate). :func:`pf_ode_solve` integrates it with
:func:`scipy.integrate.solve_ivp` in float64. Each sample ``i`` runs from ``u0_i`` to
``u1_i``; the whole batch is one flattened system in a normalised time ``tau in [0, 1]``,
``u_i = u0_i + tau (u1_i - u0_i)``, so per-sample start and end times and both directions
(generation ``t_end < t``, inversion ``t_end > t``) are handled alike.

**The endpoint at sigma -> 0.** With ``s = sigma / alpha`` the same ODE reads
``dx~/ds = (x~ - D(x~, s)) / s``, whose right-hand side is ``0/0`` at ``s = 0``. For a
prior with non-degenerate covariances, ``x~ - D(x~, s) = s^2 G(x~, v)`` with ``v = s^2`` and
``G = -grad log p_v(x~)`` smooth down to ``v = 0`` (the score of the data density blurred by
``N(0, v I)``), so in ``v`` the ODE is regular: ``dx~/dv = G(x~, v) / 2``.
:func:`pf_ode_solve_to_zero` integrates it in ``z = log(v + c)`` (``c`` about the smallest
data variance: ``dz ~ d log s`` where ``v >> c``, ``dz ~ dv / c`` near ``v = 0``) with
DOP853 in float64 down to ``v = 0`` exactly. The result is process independent: the exact
probability-flow endpoint at zero noise, which a final denoise at ``t_min`` approximates to
``O(s(t_min)^2)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...process import Process, as_time

__all__ = [
    "pf_ode_solve",
    "pf_ode_solve_to_zero",
    "gaussian_endpoint_zero",
    "reference_accuracy",
    "ODEReference",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
#: ``drift_fn(x~, v) -> G``: flat float64 ``x~`` ``[B, d]``, ``v = s^2`` ``[B]`` (``>= 0``),
#: ``G = (x~ - D(x~, s)) / s^2 = -grad log p_v(x~)`` ``[B, d]``
DriftFn = Callable[[Tensor, Tensor], Tensor]


def _per_sample(t: Tensor | float, n: int) -> Tensor:
    t = as_time(t).detach().cpu()
    if t.ndim == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"time must be 0-d or of shape [{n}]; got {tuple(t.shape)}")
    return t


def _solve_chunk(
    denoise_fn: DenoiseFn,
    process: Process,
    x: Tensor,
    t: Tensor,
    t_end: Tensor,
    rtol: float,
    atol: float,
    method: str,
) -> tuple[Tensor, int]:
    from scipy.integrate import solve_ivp

    n = x.shape[0]
    shape = x.shape
    u0, u1 = -process.lam(t), -process.lam(t_end)
    du = (u1 - u0).reshape((n,) + (1,) * (x.ndim - 1))
    y0 = (x / process.alpha(t).reshape(du.shape)).reshape(-1).numpy()

    def rhs(tau: float, y: np.ndarray) -> np.ndarray:
        tt = process.t_of_lambda(-(u0 + tau * (u1 - u0)))
        xt = torch.from_numpy(y).reshape(shape)
        a = process.alpha(tt).reshape(du.shape)
        d = denoise_fn(a * xt, tt).to(torch.float64)
        return (du * (xt - d)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (0.0, 1.0), y0, method=method, rtol=rtol, atol=atol, t_eval=[1.0])
    if not sol.success:
        raise RuntimeError(f"pf_ode_solve: scipy {method} failed: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)
    return y1 * process.alpha(t_end).reshape(du.shape), int(sol.nfev)


def pf_ode_solve(
    denoise_fn: DenoiseFn,
    process: Process,
    x: Tensor,
    t: Tensor | float,
    t_end: Tensor | float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "DOP853",
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Solve the probability-flow ODE from ``(x, t)`` to ``t_end`` to tight tolerance.

    Args:
        denoise_fn: ``denoise_fn(x, t) -> x0_hat`` called with float64 ``x`` ``[B, ...]``
            and float64 ``t`` of shape ``[B]`` (any :class:`~diffusolve.models.Denoiser`).
        process: the noise process.
        x: ``[B, ...]`` start states (any dtype; solved in float64, returned in ``x.dtype``).
        t, t_end: 0-d or ``[B]`` times; ``t_end > t`` inverts (runs towards noise).
        rtol, atol: scipy tolerances on ``x~ = x / alpha``.
        method: a :func:`scipy.integrate.solve_ivp` method (``"DOP853"``, ``"RK45"``,
            ``"Radau"``, ``"LSODA"``, ...).
        chunk_size: solve the batch in chunks of this many samples (default: all at once;
            one system is faster, chunks bound memory and the step count per chunk).

    Returns:
        ``(x_end, info)`` with ``info = dict(nfev, rtol, atol, method, seconds, chunks)``;
        ``nfev`` counts batched denoiser calls summed over chunks.

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.models.analytic.reference import pf_ode_solve
        >>> from diffusolve.process import vp_linear
        >>> g = Gaussian(torch.zeros(2), torch.tensor([0.5, 2.0]), process=vp_linear())
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> x1, info = pf_ode_solve(g, g.process, x, 0.9, 0.1)
        >>> bool(torch.allclose(x1, g.ode_solution(x, 0.9, 0.1), rtol=1e-8, atol=1e-9))
        True
    """
    n = x.shape[0]
    tt, te = _per_sample(t, n), _per_sample(t_end, n)
    xf = x.detach().to(device="cpu", dtype=torch.float64)
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    start = time.perf_counter()
    outs, nfev = [], 0
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        out, k = _solve_chunk(denoise_fn, process, xf[sl], tt[sl], te[sl], rtol, atol, method)
        outs.append(out)
        nfev += k
    x_end = torch.cat(outs).to(device=x.device, dtype=x.dtype)
    info = dict(
        nfev=nfev,
        rtol=rtol,
        atol=atol,
        method=method,
        seconds=time.perf_counter() - start,
        chunks=len(outs),
    )
    return x_end, info


def _solve_zero_chunk(
    drift_fn: DriftFn, y0: Tensor, v0: Tensor, c: float, rtol: float, atol: float, method: str
) -> tuple[Tensor, int]:
    from scipy.integrate import solve_ivp

    shape = y0.shape
    z0 = torch.log(v0 + c)[:, None]  # [b, 1]
    z1 = torch.log(torch.tensor(c, dtype=torch.float64))
    dz = z1 - z0

    def rhs(tau: float, y: np.ndarray) -> np.ndarray:
        ez = torch.exp(z0 + tau * dz)  # v + c
        v = (ez - c).clamp_min(0.0)[:, 0]
        g = drift_fn(torch.from_numpy(y).reshape(shape), v).to(torch.float64)
        return (0.5 * dz * ez * g).reshape(-1).numpy()

    sol = solve_ivp(
        rhs, (0.0, 1.0), y0.reshape(-1).numpy(), method=method, rtol=rtol, atol=atol, t_eval=[1.0]
    )
    if not sol.success:
        raise RuntimeError(f"pf_ode_solve_to_zero: scipy {method} failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape), int(sol.nfev)


def pf_ode_solve_to_zero(
    drift_fn: DriftFn,
    x_tilde: Tensor,
    s: Tensor | float,
    *,
    scale: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "DOP853",
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """The probability-flow endpoint at zero noise, from ``x~ = x / alpha`` at ``s = sigma / alpha``.

    Integrates ``dx~/dv = G(x~, v) / 2`` (``v = s^2``; see the module docstring) from
    ``v = s^2`` to ``v = 0`` in ``z = log(v + scale)`` with scipy in float64. Process
    independent: the caller converts ``x`` at process time ``t`` to ``x / alpha(t)`` and
    ``s = sigma_tilde(t)``.

    Args:
        drift_fn: ``drift_fn(x~, v) -> G`` on flat float64 ``[B, d]`` states and ``[B]``
            noise variances ``v >= 0`` (``G = (x~ - D(x~, sqrt(v))) / v``, finite at ``v = 0``).
        x_tilde: ``[B, ...]`` start states ``x / alpha``.
        s: 0-d or ``[B]`` start noise levels ``sigma / alpha``.
        scale: ``c > 0`` of the variable ``log(v + c)``: about the smallest data variance.
        rtol, atol: scipy tolerances on ``x~``.
        method, chunk_size: as in :func:`pf_ode_solve`.

    Returns:
        ``(x0, info)``: ``[B, ...]`` endpoints in ``x_tilde.dtype`` and
        ``info = dict(nfev, rtol, atol, method, seconds, chunks)``.

    Example:
        >>> import torch
        >>> from diffusolve.models.analytic.reference import pf_ode_solve_to_zero
        >>> lam = torch.tensor([0.01, 1.0], dtype=torch.float64)  # N(0, diag(lam)) data
        >>> drift = lambda x, v: x / (lam + v[:, None])           # -grad log N(0, lam + v)
        >>> x = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
        >>> x0, _ = pf_ode_solve_to_zero(drift, x, 4.0, scale=0.01)
        >>> exact = x * torch.sqrt(lam / (lam + 16.0))            # the closed form
        >>> bool(torch.allclose(x0, exact, rtol=1e-8, atol=1e-12))
        True
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (about the smallest data variance); got {scale}")
    n = x_tilde.shape[0]
    s_all = _per_sample(s, n).to(torch.float64)
    if torch.any(s_all < 0):
        raise ValueError("noise levels s = sigma / alpha must be >= 0")
    xf = x_tilde.detach().to(device="cpu", dtype=torch.float64).reshape(n, -1)
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    start = time.perf_counter()
    outs, nfev = [], 0
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        out, k = _solve_zero_chunk(
            drift_fn, xf[sl], s_all[sl] ** 2, float(scale), rtol, atol, method
        )
        outs.append(out)
        nfev += k
    x0 = torch.cat(outs).reshape(x_tilde.shape).to(device=x_tilde.device, dtype=x_tilde.dtype)
    info = dict(
        nfev=nfev,
        rtol=rtol,
        atol=atol,
        method=method,
        seconds=time.perf_counter() - start,
        chunks=len(outs),
    )
    return x0, info


def gaussian_endpoint_zero(prior: Any, x: Tensor, t: Tensor | float) -> Tensor:
    """Closed-form probability-flow endpoint at zero noise for a Gaussian prior ``N(mu, C)``.

    In the eigenbasis ``C = U diag(l) U^T`` the ODE ``dy_i/ds = s y_i / (l_i + s^2)`` gives
    ``y_i(0) = y_i(s) sqrt(l_i / (l_i + s^2))``, i.e. the linear map
    ``x0 = mu + C^{1/2} (C + s^2 I)^{-1/2} (x / alpha - mu)``.

    Args:
        prior: a :class:`~diffusolve.models.Gaussian` (``mean``, ``evals``, ``evecs``,
            ``process``).
        x: ``[B, ...]`` states at process time ``t``.
        t: 0-d or ``[B]`` times.

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.models.analytic.reference import gaussian_endpoint_zero
        >>> from diffusolve.process import edm
        >>> g = Gaussian(torch.zeros(1), torch.tensor([1.0]), process=edm())
        >>> gaussian_endpoint_zero(g, torch.tensor([[2.0]]), 1.0)  # 2 * sqrt(1 / 2)
        tensor([[1.4142]])
    """
    n = x.shape[0]
    t = _per_sample(t, n).to(torch.float64)
    p = prior.process
    a = p.alpha(t).to(torch.float64)[:, None]
    s2 = (p.sigma_tilde(t).to(torch.float64) ** 2)[:, None]
    xf = x.detach().reshape(n, -1).to(torch.float64)
    y = (xf / a - prior.mean) @ prior.evecs
    x0 = prior.mean + (y * torch.sqrt(prior.evals / (prior.evals + s2))) @ prior.evecs.T
    return x0.reshape(x.shape).to(x.dtype)


def _rel_diff(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)


def reference_accuracy(
    denoise_fn: DenoiseFn,
    process: Process,
    x: Tensor,
    t: Tensor | float,
    t_end: Tensor | float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "DOP853",
    check_method: str | None = None,
    factor: float = 100.0,
    n_check: int = 64,
) -> float:
    """The reference's own accuracy: max per-sample relative difference to a tighter solve.

    Solves the first ``n_check`` samples once with ``(rtol, atol, method)`` and once with
    tolerances ``factor`` times tighter (floored at ``1e-13``) and ``check_method``
    (default: the same method), and returns ``max_i ||a_i - b_i|| / ||b_i||``.

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.models.analytic.reference import reference_accuracy
        >>> from diffusolve.process import edm
        >>> g = Gaussian(torch.zeros(2), torch.tensor([0.5, 2.0]), process=edm())
        >>> reference_accuracy(g, g.process, torch.randn(8, 2) * 80, 80.0, 0.002, rtol=1e-6, atol=1e-6) < 1e-4
        True
    """
    xs = x[:n_check]
    tt = _per_sample(t, x.shape[0])[:n_check]
    te = _per_sample(t_end, x.shape[0])[:n_check]
    a, _ = pf_ode_solve(denoise_fn, process, xs, tt, te, rtol=rtol, atol=atol, method=method)
    b, _ = pf_ode_solve(
        denoise_fn,
        process,
        xs,
        tt,
        te,
        rtol=max(rtol / factor, 1e-13),
        atol=max(atol / factor, 1e-13),
        method=check_method or method,
    )
    return float(_rel_diff(a.to(torch.float64), b.to(torch.float64)).max())


class ODEReference:
    """Mixin for analytic priors: ODE references through :func:`pf_ode_solve`.

    The class needs ``self.process`` and ``self.__call__(x, t) -> x0_hat``; the zero-noise
    endpoint (:meth:`reference_zero`) also needs ``self.pf_drift_v(x~, v)`` (the
    :data:`DriftFn` of the prior) and ``self.pf_v_scale`` (its smallest data variance).
    """

    process: Process

    def ode_solve(
        self,
        x: Tensor,
        t: Tensor | float,
        t_end: Tensor | float,
        *,
        return_info: bool = False,
        **tol: Any,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """The probability-flow ODE map from ``(x, t)`` to ``t_end`` (either direction).

        ``tol`` goes to :func:`pf_ode_solve` (``rtol``, ``atol``, ``method``, ``chunk_size``);
        with ``return_info=True`` returns ``(x_end, info)``.
        """
        x_end, info = pf_ode_solve(self, self.process, x, t, t_end, **tol)  # type: ignore[arg-type]
        return (x_end, info) if return_info else x_end

    def ode_solution(self, x: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
        """Same as :meth:`ode_solve` with default tolerances (the name :class:`Gaussian` uses)."""
        return self.ode_solve(x, t, t_next)  # type: ignore[return-value]

    def reference(
        self,
        x: Tensor,
        t: Tensor | float,
        t_end: Tensor | float,
        final: str = "denoise",
        **tol: Any,
    ) -> Tensor:
        """Reference result of :func:`diffusolve.sample` from ``(x, t)`` to ``t_end``.

        ``final="denoise"`` applies the exact denoiser at ``t_end`` to the ODE solution;
        ``final="none"`` returns the ODE solution.
        """
        if final not in ("denoise", "none"):
            raise ValueError(f"final must be 'denoise' or 'none', got {final!r}")
        xe = self.ode_solve(x, t, t_end, **tol)
        return self(xe, t_end) if final == "denoise" else xe  # type: ignore[operator]

    def reference_accuracy(
        self, x: Tensor, t: Tensor | float, t_end: Tensor | float, **kw: Any
    ) -> float:
        """:func:`reference_accuracy` for this prior."""
        return reference_accuracy(self, self.process, x, t, t_end, **kw)  # type: ignore[arg-type]

    def reference_zero(
        self, x: Tensor, t: Tensor | float, *, return_info: bool = False, **tol: Any
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """The exact probability-flow endpoint at ``sigma -> 0`` from ``(x, t)``.

        Solves :func:`pf_ode_solve_to_zero` from ``x / alpha(t)`` at ``s = sigma(t) / alpha(t)``
        (process independent below ``t``; no final denoise: at ``s = 0`` the denoiser is the
        identity). ``tol`` goes to :func:`pf_ode_solve_to_zero` (``rtol``, ``atol``,
        ``method``, ``chunk_size``); with ``return_info=True`` returns ``(x0, info)``.
        """
        drift = getattr(self, "pf_drift_v", None)
        if drift is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no pf_drift_v(x~, v); the zero-noise endpoint "
                "needs (x~ - D(x~, s)) / s^2 in closed form"
            )
        n = x.shape[0]
        tt = _per_sample(t, n).to(torch.float64)
        a = self.process.alpha(tt).to(torch.float64).reshape((n,) + (1,) * (x.ndim - 1))
        xt = x.detach().to(device="cpu", dtype=torch.float64) / a
        x0, info = pf_ode_solve_to_zero(
            drift, xt, self.process.sigma_tilde(tt), scale=float(self.pf_v_scale), **tol
        )
        x0 = x0.to(device=x.device, dtype=x.dtype)
        return (x0, info) if return_info else x0

    def reference_zero_accuracy(
        self,
        x: Tensor,
        t: Tensor | float,
        *,
        rtol: float = 1e-10,
        atol: float = 1e-10,
        factor: float = 100.0,
        n_check: int = 64,
    ) -> float:
        """Max per-sample relative difference of :meth:`reference_zero` to a ``factor``
        times tighter solve (floored at ``1e-13``) on the first ``n_check`` samples."""
        xs = x[:n_check]
        tt = _per_sample(t, x.shape[0])[:n_check]
        a = self.reference_zero(xs, tt, rtol=rtol, atol=atol)
        b = self.reference_zero(
            xs, tt, rtol=max(rtol / factor, 1e-13), atol=max(atol / factor, 1e-13)
        )
        return float(_rel_diff(a.to(torch.float64), b.to(torch.float64)).max())  # type: ignore[union-attr]
