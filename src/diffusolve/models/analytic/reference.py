"""High-accuracy probability-flow ODE references by an adaptive float64 solve (scipy).

With ``x~ = x / alpha`` and ``u = log(sigma / alpha) = -lambda``, the probability-flow ODE
of any process ``x_t = alpha x0 + sigma eps`` is the same for every process:

    ``dx~/du = x~ - D(alpha x~, t(u))``,

where ``D`` is the denoiser (Tweedie estimate). :func:`pf_ode_solve` integrates it with
:func:`scipy.integrate.solve_ivp` in float64. Each sample ``i`` runs from ``u0_i`` to
``u1_i``; the whole batch is one flattened system in a normalised time ``tau in [0, 1]``,
``u_i = u0_i + tau (u1_i - u0_i)``, so per-sample start and end times and both directions
(generation ``t_end < t``, inversion ``t_end > t``) are handled alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...process import Process, as_time

__all__ = ["pf_ode_solve", "reference_accuracy", "ODEReference"]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


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

    The class needs ``self.process`` and ``self.__call__(x, t) -> x0_hat``.
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
