"""Shared parts of the analysis tools: the denoiser in the scaled frame, Jacobians, traces,
fixed-step and adaptive Runge-Kutta solvers and the singular-value gap rule.

**The frame.** Every tool works on ``y = x / alpha(t)`` at the noise level
``s = sigma(t) / alpha(t)`` (:meth:`~diffusolve.process.Process.sigma_tilde`), with the
independent variable ``u = log s``. There the probability-flow ODE of any process is

    ``dy/du = y - D(y, s)``,   ``D(y, s) = model(alpha(t) y, t)``,   ``t = t(s)``,

so processes differ only by the range of ``s`` they cover and the Jacobian factor
``alpha(t)^d`` between densities of ``x`` and of ``y``. Its divergence is ``d - tr J_D``
(``J_D = dD/dy``): in the directions where the data have no variance the flow expands at rate
one, so ``log s`` is the natural clock for likelihoods and intrinsic dimension alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..process import Process

__all__ = [
    "Frame",
    "jacobian",
    "trace",
    "rk_fixed",
    "dopri5",
    "gap_rank",
]

RowFn = Callable[[Tensor, Tensor], Tensor]
TABLEAUX = ("euler", "heun", "rk4")


def _rep_cond(cond: Any, batch: int, rows: Tensor) -> Any:
    """``cond`` for the rows ``rows`` of a batch of ``batch`` samples (per-sample tensors are
    indexed, anything else is passed through)."""
    if isinstance(cond, Tensor) and cond.ndim >= 1 and cond.shape[0] == batch and batch > 1:
        return cond[rows.to(cond.device)]
    return cond


class Frame:
    """A denoiser seen in the scaled frame ``y = x / alpha``, ``s = sigma / alpha``.

    Args:
        model: a denoiser ``model(x, t, cond) -> x0`` carrying its ``process``.
        cond: its condition; a tensor whose first dimension is the batch is split per sample.
        batch: the number of samples (to recognise per-sample conditions).
    """

    def __init__(self, model: Any, cond: Any = None, batch: int = 1) -> None:
        self.model, self.cond, self.batch = model, cond, int(batch)
        self.process: Process = model.process
        self.s_min = float(self.process.sigma_tilde(self.process.t_min))
        self.s_max = float(self.process.sigma_tilde(self.process.t_max))

    def time(self, s: float) -> Tensor:
        """The process time of noise level ``s`` (checked to lie in ``[t_min, t_max]``)."""
        lo, hi = self.s_min, self.s_max
        if not lo * (1 - 1e-9) <= s <= hi * (1 + 1e-9):
            raise ValueError(
                f"noise level sigma/alpha = {s:.4g} is outside what {self.process.name} covers "
                f"([{lo:.4g}, {hi:.4g}] between t_min and t_max); choose a level inside it"
            )
        if abs(s - lo) <= 1e-9 * lo:
            return torch.tensor(self.process.t_min, dtype=torch.float64)
        if abs(s - hi) <= 1e-9 * hi:
            return torch.tensor(self.process.t_max, dtype=torch.float64)
        return self.process.t_of_sigma_tilde(torch.tensor(s, dtype=torch.float64))

    def denoise(self, y: Tensor, s: float, rows: Tensor | None = None) -> Tensor:
        """``D(y, s) = model(alpha(t) y, t, cond)`` in ``y``'s dtype; ``rows`` maps each row of
        ``y`` to its sample (for per-sample conditions)."""
        t = self.time(s)
        a = float(self.process.alpha(t))
        cond = self.cond if rows is None else _rep_cond(self.cond, self.batch, rows)
        return self.model(y * a, t, cond).to(y.dtype)


def jacobian(fn: RowFn, x: Tensor, *, max_rows: int = 4096) -> Tensor:
    """Per-sample Jacobians ``J[b] = d fn(x)[b] / d x[b]``, ``[B, d, d]`` (``d`` = elements
    of a sample), of a row-independent ``fn(x_rows, rows) -> out`` (same shape as
    ``x_rows``; ``rows[i]`` is the sample index of row ``i``).

    Reverse mode on a replicated batch: each sample is repeated ``d`` times and one backward
    pass with one-hot cotangents returns every row of its Jacobian (at most ``max_rows`` rows
    at a time).

    Example:
        >>> import torch
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> jacobian(lambda x, rows: x @ a.T, torch.zeros(3, 2, dtype=torch.float64))[2]
        tensor([[1., 2.],
                [3., 4.]], dtype=torch.float64)
    """
    b, d = x.shape[0], x[0].numel()
    out = torch.empty(b, d, d, dtype=x.dtype, device=x.device)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    for lo in range(0, b, max(1, max_rows // d)):
        hi = min(b, lo + max(1, max_rows // d))
        rows = torch.arange(lo, hi).repeat_interleave(d)
        for c0 in range(0, rows.numel(), max_rows):
            r = rows[c0 : c0 + max_rows]
            xr = x.detach()[r].clone().requires_grad_(True)
            cot = eye.repeat(hi - lo, 1)[c0 : c0 + max_rows].reshape(xr.shape)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(fn(xr, r), xr, grad_outputs=cot)
            flat = g.reshape(r.numel(), d)
            idx = torch.arange(c0, c0 + r.numel())
            out[r, idx % d] = flat
    return out


def probes_like(x: Tensor, n: int, generator: torch.Generator, kind: str = "rademacher") -> Tensor:
    """``n`` probe vectors per sample, ``[n * B, ...]`` (probe-major), with ``E[v v^T] = I``:
    Rademacher (+-1, the smallest variance among such probes for a fixed matrix) or Gaussian."""
    shape = (n * x.shape[0],) + tuple(x.shape[1:])
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
        return (2 * v - 1).to(dtype=x.dtype, device=x.device)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(x.dtype)
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")


def trace(
    fn: RowFn,
    x: Tensor,
    *,
    mode: str = "exact",
    probes: Tensor | None = None,
    max_rows: int = 4096,
) -> tuple[Tensor, Tensor]:
    """``(fn(x), tr J)`` per sample, from one forward pass with a graph.

    ``mode="exact"``: the diagonal from ``d`` one-hot vector-Jacobian products (a replicated
    batch). ``mode="hutchinson"``: ``mean_p v_p^T J v_p`` over the given ``probes``
    (``[P * B, ...]``, probe-major, from :func:`probes_like`; Hutchinson 1989), unbiased for
    ``E[v v^T] = I``.
    """
    b, d = x.shape[0], x[0].numel()
    if mode == "exact":
        rows = torch.arange(b).repeat_interleave(d)
        fx = torch.empty_like(x)
        tr = torch.zeros(b, dtype=torch.float64, device=x.device)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        for c0 in range(0, rows.numel(), max_rows):
            r = rows[c0 : c0 + max_rows]
            xr = x.detach()[r].clone().requires_grad_(True)
            cot = eye.repeat(b, 1)[c0 : c0 + max_rows].reshape(xr.shape)
            with torch.enable_grad():
                y = fn(xr, r)
                (g,) = torch.autograd.grad(y, xr, grad_outputs=cot)
            diag = (g * cot).reshape(r.numel(), -1).sum(1).to(torch.float64)
            tr.index_add_(0, r, diag)
            first = (torch.arange(c0, c0 + r.numel()) % d) == 0
            fx[r[first]] = y.detach()[first]
        return fx, tr
    if mode == "hutchinson":
        if probes is None or probes.shape[0] % b:
            raise ValueError("Hutchinson traces need probes of shape [P * B, ...]")
        p = probes.shape[0] // b
        rows = torch.arange(b).repeat(p)
        xr = x.detach()[rows].clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(xr, rows)
            (g,) = torch.autograd.grad(y, xr, grad_outputs=probes)
        est = (g * probes).reshape(p, b, -1).sum(-1).to(torch.float64).mean(0)
        return y.detach()[:b], est
    raise ValueError(f"trace must be 'exact' or 'hutchinson', got {mode!r}")


# ---------------------------------------------------------------------------- integrators
_TAB = {
    "euler": ([], [1.0], [0.0]),
    "heun": ([[1.0]], [0.5, 0.5], [0.0, 1.0]),
    "rk4": ([[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0, 0.5, 0.5, 1]),
}


def rk_fixed(
    f: Callable[[float, Tensor], Tensor], z: Tensor, u0: float, u1: float, steps: int, method: str
) -> tuple[Tensor, int]:
    """Explicit Runge-Kutta (``euler``, ``heun`` or classical ``rk4``) with ``steps`` equal
    steps from ``u0`` to ``u1``; returns ``(z(u1), evaluations)``."""
    if method not in _TAB:
        raise ValueError(f"method must be one of {TABLEAUX} or 'dopri5', got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a, bw, c = _TAB[method]
    h = (u1 - u0) / steps
    nfe = 0
    for i in range(steps):
        u = u0 + i * h
        ks = [f(u, z)]
        for j, row in enumerate(a):
            zi = z + h * sum(aij * k for aij, k in zip(row, ks, strict=True) if aij)
            ks.append(f(u + c[j + 1] * h, zi))
        nfe += len(ks)
        z = z + h * sum(w * k for w, k in zip(bw, ks, strict=True))
    return z, nfe


# Dormand & Prince (1980) 5(4) with the FSAL property
_DP_A = [
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
_DP_B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]
_DP_E = [  # fifth minus fourth order weights
    35 / 384 - 5179 / 57600,
    0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
]


def dopri5(
    f: Callable[[float, Tensor], Tensor],
    z: Tensor,
    u0: float,
    u1: float,
    *,
    rtol: float,
    atol: float,
    max_steps: int = 100_000,
) -> tuple[Tensor, dict[str, int]]:
    """Adaptive Dormand-Prince 5(4) from ``u0`` to ``u1`` (one step size for the batch: the
    error norm is the largest per-row RMS of ``err / (atol + rtol max(|z|, |z_new|))``);
    standard controller (safety 0.9, factor in [0.2, 10], exponent 1/5). Returns
    ``(z(u1), {"nfe", "steps", "rejected"})``."""
    if not (rtol > 0 and atol > 0):
        raise ValueError("rtol and atol must be positive")
    span = u1 - u0
    direction = 1.0 if span >= 0 else -1.0
    u = u0
    k1 = f(u, z)
    nfe = 1
    scale = atol + rtol * z.abs()
    d0 = float((z / scale).pow(2).mean().sqrt())
    d1 = float((k1 / scale).pow(2).mean().sqrt())
    h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    h = min(abs(h), abs(span)) * direction
    steps = rejected = 0
    while direction * (u1 - u) > 1e-14 * max(1.0, abs(u1)):
        if steps + rejected >= max_steps:
            raise RuntimeError(f"dopri5 took more than {max_steps} steps; loosen rtol/atol")
        if direction * (u + h - u1) > 0:
            h = u1 - u
        ks = [k1]
        for i, row in enumerate(_DP_A):
            zi = z + h * sum(aij * k for aij, k in zip(row, ks, strict=True) if aij)
            ks.append(f(u + _DP_C[i + 1] * h, zi))
        nfe += 6
        z_new = z + h * sum(w * k for w, k in zip(_DP_B, ks, strict=True) if w)
        err = h * sum(w * k for w, k in zip(_DP_E, ks, strict=True) if w)
        sc = atol + rtol * torch.maximum(z.abs(), z_new.abs())
        en = float((err / sc).pow(2).reshape(z.shape[0], -1).mean(1).sqrt().max())
        if en <= 1.0 or not math.isfinite(en):
            if not math.isfinite(en):
                raise FloatingPointError("dopri5: non-finite state; check the model")
            u, z, k1 = u + h, z_new, ks[-1]  # FSAL: the last stage is f at the new point
            steps += 1
            fac = 10.0 if en == 0 else min(10.0, max(0.2, 0.9 * en**-0.2))
        else:
            rejected += 1
            fac = max(0.2, 0.9 * en**-0.2)
        h = h * fac
    return z, {"nfe": nfe, "steps": steps, "rejected": rejected}


def gap_rank(sv: Tensor) -> Tensor:
    """The number of singular values above the largest gap of ``log`` singular values.

    ``sv``: ``[B, m]`` non-negative, sorted in decreasing order (as ``torch.linalg.svdvals``
    returns). The gap is the largest ``log sv[i] - log sv[i + 1]`` (``i = 0 .. m - 2``, values
    floored at ``1e-300``); the count is ``i + 1``. It assumes both groups are present
    (at least one value on each side of the gap).

    Example:
        >>> import torch
        >>> gap_rank(torch.tensor([[9.0, 8.0, 7.5, 1e-3, 5e-4]]))
        tensor([3])
    """
    if sv.ndim != 2 or sv.shape[1] < 2:
        raise ValueError(f"need [B, m >= 2] singular values, got {tuple(sv.shape)}")
    ls = torch.log(sv.to(torch.float64).clamp_min(1e-300))
    return (ls[:, :-1] - ls[:, 1:]).argmax(1) + 1
