"""Log-likelihoods by the probability-flow ODE (Song et al. 2021, "Score-based generative
modeling through stochastic differential equations", ICLR, appendix D.2; Hutchinson
traces as in Grathwohl et al. 2019, FFJORD).

For the ODE ``dy/du = f(y, u)`` the log-density along a trajectory obeys
``d log p(y(u)) / du = -div f``. In the scaled frame of :mod:`._field` (``y = x / alpha``,
``u = log(sigma / alpha)``, ``f = y - D(y, s)``, ``div f = d - tr J_D``):

    ``log p_{t0}(x) = log p_{t1}(x_1) + int_{u0}^{u1} (d - tr J_D(y(u), e^u)) du``
    ``             + d (log alpha(t1) - log alpha(t0))``

with ``x_1 = alpha(t1) y(u1)`` the probability-flow image of ``x`` at ``t1`` (``t_end``,
default ``t_max``) and the last term the change of variables between ``x`` and ``y`` at both
ends. ``log p_{t1}`` is the **prior term**: ``prior="gaussian"`` takes
``N(0, sigma(t1)^2 I)``, what a sampler starts from. That is the true marginal only when
the data term ``alpha(t1) x0`` vanishes; otherwise the result carries the **prior mismatch**
``log p_{t1}(x_1) - log N(x_1; 0, sigma(t1)^2 I)``, small when ``sigma / alpha`` at ``t1`` is
large against the data scale (VP: ``alpha(t_max)`` is not 0; for the bundled digits'
``alpha(999) = 0.0064`` with data in [-1, 1] it is of order ``d alpha^2 / 2`` nats). A
callable ``prior(x_1, t1) -> [B]`` (e.g. an exact ``GaussianMixture.log_prob``) removes it.

Integrators (``method``): ``"dopri5"`` (adaptive Dormand-Prince 5(4) in torch on the
augmented state ``[y, integral]``, ``rtol``/``atol``; the default, for exact checks) and the
fixed-step ``"rk4"``, ``"heun"``, ``"euler"`` with ``steps`` equal steps in ``log s`` (for
networks, where the cost must be known in advance). Traces: ``"exact"`` (``d``
vector-Jacobian products per evaluation, on a replicated batch) or ``"hutchinson"``
(``probes`` Rademacher or Gaussian vectors per sample, drawn once from ``seed`` and kept for
the whole solve, so the result is an unbiased estimate of the log-likelihood up to the ODE
error, FFJORD section 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._field import TABLEAUX, Frame, dopri5, probes_like, rk_fixed, trace

__all__ = ["log_likelihood", "bits_per_dim", "gaussian_prior"]

Prior = Callable[[Tensor, Tensor], Tensor]


def gaussian_prior(x: Tensor, sigma: float) -> Tensor:
    """``log N(x; 0, sigma^2 I)`` per sample (float64)."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    d = flat.shape[1]
    return (
        -0.5 * (flat * flat).sum(1) / sigma**2
        - d * math.log(sigma)
        - 0.5 * d * math.log(2 * math.pi)
    )


def log_likelihood(
    model: Any,
    x: Tensor,
    cond: Any = None,
    *,
    trace: str = "exact",
    probes: int = 1,
    probe: str = "rademacher",
    method: str = "dopri5",
    steps: int = 32,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    t_start: float | None = None,
    t_end: float | None = None,
    prior: str | Prior = "gaussian",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    max_rows: int = 4096,
) -> tuple[Tensor, dict[str, Any]]:
    """``log p_{t_start}(x)`` per sample by the probability-flow ODE (module docstring).

    Args:
        model: a denoiser ``model(x, t, cond) -> x0`` with its ``process``.
        x: ``[B, ...]`` points, read as states ``x_{t_start}`` of the process (the model's
            own units; for a VP process at ``t_min`` these are slightly noised data).
        cond: the model's condition (a per-sample tensor is split with the batch).
        trace: ``"exact"`` or ``"hutchinson"``.
        probes, probe: Hutchinson probes per sample and their law (``"rademacher"`` or
            ``"gaussian"``).
        method: ``"dopri5"`` (adaptive, ``rtol``/``atol``) or ``"rk4"``/``"heun"``/``"euler"``
            (``steps`` equal steps in ``log(sigma / alpha)``).
        t_start, t_end: the data time (default ``process.t_min``) and the time of the prior
            term (default ``process.t_max``).
        prior: ``"gaussian"`` (``N(0, sigma(t_end)^2 I)``) or ``prior(x_end, t_end) -> [B]``,
            the log-density of ``x_{t_end}``.
        seed: seeds the Hutchinson probes.
        dtype: the dtype of the ODE state (float64 by default; a float32 network sees its
            own dtype through its adapter).

    Returns:
        ``(logp, info)``: ``logp`` ``[B]`` float64 in nats; ``info`` has ``delta`` (the
        divergence integral), ``prior_logp``, ``log_alpha_term``, ``x_end``, ``nfe``
        (batched model evaluations), ``steps``, ``t_start``, ``t_end`` and the ``sigma/alpha``
        range.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import edm
        >>> gmm = GaussianMixture(torch.ones(2), torch.tensor([[-1.0], [1.0]]),
        ...                       torch.tensor([0.1, 0.2]), process=edm())
        >>> x = torch.tensor([[0.5], [-1.2]], dtype=torch.float64)
        >>> lp, info = log_likelihood(gmm, x, prior=gmm.log_prob)
        >>> bool((lp - gmm.log_prob(x, 0.002)).abs().max() < 1e-5)
        True
    """
    proc = model.process
    t0 = proc.t_min if t_start is None else float(t_start)
    t1 = proc.t_max if t_end is None else float(t_end)
    if not proc.t_min <= t0 < t1 <= proc.t_max:
        raise ValueError(
            f"need t_min <= t_start < t_end <= t_max ({proc.t_min}, {proc.t_max}); "
            f"got t_start={t0}, t_end={t1}"
        )
    if method != "dopri5" and method not in TABLEAUX:
        raise ValueError(f"method must be 'dopri5' or one of {TABLEAUX}, got {method!r}")
    if trace == "hutchinson" and probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    b = x.shape[0]
    shape = tuple(x.shape[1:])
    d = math.prod(shape)
    frame = Frame(model, cond, b)
    a0, a1 = float(proc.alpha(t0)), float(proc.alpha(t1))
    s0, s1 = float(proc.sigma_tilde(t0)), float(proc.sigma_tilde(t1))
    u0, u1 = math.log(s0), math.log(s1)
    frame.s_min, frame.s_max = min(frame.s_min, s0), max(frame.s_max, s1)
    v = None
    if trace == "hutchinson":
        gen = torch.Generator().manual_seed(int(seed))
        v = probes_like(torch.zeros((b,) + shape, dtype=dtype), probes, gen, probe)
    elif trace != "exact":
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    nfe = 0

    def rhs(u: float, z: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        s = math.exp(u)
        y = z[:, :d].reshape((b,) + shape)
        den, tr = _trace_at(frame, y, s, trace, v, max_rows)
        dy = (y - den).reshape(b, d)
        return torch.cat([dy, (d - tr).to(z.dtype)[:, None]], 1)

    z0 = torch.cat([(x.to(dtype) / a0).reshape(b, d), torch.zeros(b, 1, dtype=dtype)], 1)
    if method == "dopri5":
        z1, stats = dopri5(rhs, z0.detach(), u0, u1, rtol=rtol, atol=atol)
    else:
        z1, _ = rk_fixed(rhs, z0.detach(), u0, u1, steps, method)
        stats = {"steps": steps, "rejected": 0}
    x_end = (a1 * z1[:, :d]).reshape((b,) + shape)
    delta = z1[:, d].to(torch.float64)
    if prior == "gaussian":
        prior_lp = gaussian_prior(x_end, float(proc.sigma(t1)))
    elif callable(prior):
        prior_lp = torch.as_tensor(prior(x_end, torch.tensor(t1, dtype=torch.float64)))
        prior_lp = prior_lp.to(torch.float64).reshape(b)
    else:
        raise ValueError("prior must be 'gaussian' or a callable prior(x_end, t_end) -> [B]")
    log_alpha = d * (math.log(a1) - math.log(a0))
    logp = prior_lp + delta + log_alpha
    info = {
        "delta": delta,
        "prior_logp": prior_lp,
        "log_alpha_term": log_alpha,
        "x_end": x_end,
        "nfe": nfe,
        "steps": stats["steps"],
        "rejected": stats["rejected"],
        "t_start": t0,
        "t_end": t1,
        "sigma_tilde": (s0, s1),
    }
    return logp.detach(), info


def _trace_at(
    frame: Frame, y: Tensor, s: float, mode: str, v: Tensor | None, max_rows: int
) -> tuple[Tensor, Tensor]:
    return trace(
        lambda yr, rows: frame.denoise(yr, s, rows), y, mode=mode, probes=v, max_rows=max_rows
    )


def bits_per_dim(logp: Tensor, dim: int, *, scale: float = 1.0) -> Tensor:
    """``-log2 p / d`` per sample for a density in nats; ``scale`` expresses it in other
    units ``x' = scale * x`` (density ``p / scale^d``): ``bpd' = bpd + log2(scale)``.

    For data in [-1, 1] shown as 8-bit pixel values in [0, 255], ``scale = 127.5``: the
    usual convention of image-likelihood tables. It is a density of continuous values, not a
    probability of 8-bit codes (no dequantisation).

    Example:
        >>> import math, torch
        >>> round(float(bits_per_dim(torch.tensor([-2 * math.log(2)], dtype=torch.float64), 2)), 12)
        1.0
    """
    return -logp.to(torch.float64) / (dim * math.log(2)) + math.log2(scale)
