r"""SuperDiff: OR / AND superposition of diffusion models with the Ito density estimator.

Skreta, Atanackovic, Bose, Tong, Neklyudov, "The superposition of diffusion models using
the Ito density estimator", ICLR 2025 (arXiv 2412.17762). Paper defaults: temperature
``T = 1``, equal log-weights, the reverse SDE discretised by Euler-Maruyama, ``log q_i``
of every model started equal at ``t_max`` (all models share the prior there).

**The process.** ``x_t = alpha(t) x0 + sigma(t) eps`` is the marginal of the forward SDE
``dx = f x dt + g dW`` with ``f = d log alpha / dt`` and ``g^2 = d sigma^2 / dt -
2 f sigma^2`` (:func:`~diffusolve.compose._fields.sde_coefficients`). Its marginal ``q_t``
(one per model: ``q_i,t``, score ``s_i = grad log q_i,t``) solves the Fokker-Planck equation

    ``d_t q = -div(f x q) + (g^2 / 2) lap q``, so
    ``d_t log q = -f d - f x . s + (g^2 / 2) (lap log q + |s|^2)``   (``d``: dimension).

**The Ito update of log q_i along a reverse-time SDE.** Let ``x`` move backwards in time
(``dt < 0``) by any SDE ``dx = u(x, t) dt + g dW`` whose diffusion coefficient is the
process's ``g`` (the drift ``u`` may be anything: here ``f x - g^2 s`` for a combined
score ``s``). The quadratic variation of each coordinate is ``g^2 |dt|``, and Ito's lemma
for ``log q_i,t(x_t)`` gives

    ``d log q_i = d_t log q_i dt + s_i . dx + (g^2 / 2) lap log q_i |dt|``.

With ``|dt| = -dt`` the two Laplacian terms cancel, and what remains needs only the score:

    ``d log q_i = -f d dt + s_i . (dx - f x dt) + (g^2 / 2) |s_i|^2 dt``     (Ito estimator)

No divergence is needed: this is why the sampler's diffusion must equal ``g`` (another
noise level leaves a ``lap log q`` term). One step of it, with ``s_i`` at the left point
``(x_n, t_n)`` and the actual increment ``dx = x_{n+1} - x_n``, is
:func:`ito_log_density_step`. In the EDM parameterisation (``f = 0``, ``g^2 dt =
2 sigma d sigma``, ``s = -v / sigma`` with ``v`` the noise prediction) the quadratic term
is ``-(|d sigma| / sigma) |v|^2``: the sign of the reference code's AND branch. Its OR
branch has the opposite sign (``form="or_code"``, kept only to settle that discrepancy);
the exact check against Gaussian-mixture log-densities (tests and ``bench guidance
--phase density``) shows the Ito sign is right: the flipped sign gives errors of order
the whole change.

**Accuracy, and a free second-order correction.** Per trajectory the estimate differs
from the exact change by ``sum_n (g^2 |dt| / 2) (z^T H z - tr H)`` (``H`` the Hessian of
``log q_i``: the Laplacian was replaced by its expectation) plus an ``O(dt^2)`` bias per
step. The random part is mean zero with standard deviation of order
``Lambda sqrt(d / N)`` (``g^2 |dt| = 2 sigma^2 |d lambda|``, ``Lambda`` the log-SNR range,
``N`` steps), so the per-trajectory error falls only like ``N^(-1/2)``; the mean (bias)
falls like ``1 / N``. ``estimator="trapezoid"`` (ours) removes the largest part of the
bias at no extra network call: with ``phi = -f d - f x . s + (g^2 / 2) |s|^2`` and the
step's drift ``u dt``, it adds ``(phi_{n+1} - phi_n) dt / 2 + (s_{n+1} - s_n) . (u dt) / 2``
(the trapezoid rule on the ``dt`` terms and the drift's own second-order term
``(u dt)^T H (u dt) / 2``), using the scores the next step evaluates anyway.

**Euler-Maruyama step** from ``t`` to ``t' = t + dt`` with the combined score
``s = sum_i kappa_i s_i`` (``sum_i kappa_i = 1``):
``x' = x + (f x - g^2 s) dt + g sqrt(|dt|) z``, the same ``z`` for the update of every
``log q_i``.

**OR** (the mixture ``sum_i w_i q_i``): ``kappa = softmax_i(T (log q_i + log w_i))``; at
``T = 1`` ``sum_i kappa_i s_i`` is the exact score of the mixture of the noised marginals,
so the sampler draws the mixture of the models.

**AND** (equal densities): ``kappa`` so that every ``log q_i`` changes by the same amount
in the step. With ``A_ij = s_i . s_j`` and ``b_i = g sqrt(|dt|) s_i . z + (g^2/2) dt |s_i|^2``
the change is ``d log q_i = -f d dt - g^2 dt (A kappa)_i + b_i``: linear in ``kappa``. For
two models (``delta = s_1 - s_2``)

    ``kappa_1 = [(b_1 - b_2) / (g^2 dt) - delta . s_2] / |delta|^2``,  ``kappa_2 = 1 - kappa_1``,

and for ``M`` models the ``M x M`` system ``(A_i - A_1) kappa = (b_i - b_1) / (g^2 dt)``
(``i = 2..M``), ``sum kappa = 1`` is solved per sample. Where the scores coincide
(``|delta|^2`` at round-off) every ``kappa`` is ``1 / M``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..process import Process, make_grid
from ..process.grids import check_grid
from ..solvers.noise import as_noise_source
from ._fields import Experts, score_from_x0, sde_coefficients

__all__ = [
    "MODES",
    "FORMS",
    "ESTIMATORS",
    "SuperDiffInfo",
    "ito_log_density_step",
    "and_kappa",
    "or_kappa",
    "superdiff_sample",
]

#: ``"average"``: fixed ``kappa_i = 1 / M`` (the plain average of the outputs; with one
#: model, plain reverse-SDE sampling): the baseline of the same sampler
MODES = ("or", "and", "average")
#: ``"ito"``: the derived estimator; ``"or_code"``: the reference OR branch's flipped
#: quadratic term (only for the exact check that rejects it)
FORMS = ("ito", "or_code")
#: ``"ito"``: the paper's left-point estimator; ``"trapezoid"``: with the second-order
#: correction from the next step's scores (module docstring)
ESTIMATORS = ("ito", "trapezoid")


def _dot(a: Tensor, b: Tensor, sample_dims: int) -> Tensor:
    """Per-sample inner products over the last ``sample_dims`` dims, in float64."""
    dims = tuple(range(-sample_dims, 0))
    return (a.to(torch.float64) * b.to(torch.float64)).sum(dims)


def ito_log_density_step(
    process: Process,
    t: float,
    t_next: float,
    x: Tensor,
    x_next: Tensor,
    scores: Tensor,
    *,
    form: str = "ito",
) -> Tensor:
    """The Ito estimate of ``log q_i,t'(x') - log q_i,t(x)`` for one reverse-SDE step.

    Args:
        process: the shared process.
        t, t_next: the step's times (``t_next < t``).
        x, x_next: the states ``[B, ...]`` before and after the step (any drift; the
            diffusion must be the process's ``g``).
        scores: ``[M, B, ...]`` (or ``[B, ...]``) scores ``grad log q_i,t(x)`` at ``(x, t)``.
        form: ``"ito"`` (default) or ``"or_code"`` (the flipped quadratic term of the
            reference OR branch; for the sign check only).

    Returns:
        ``[M, B]`` (or ``[B]``) float64 increments.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear
        >>> p = vp_linear()  # unit data variance: q_t = N(0, I) at every t
        >>> g = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.ones(1), process=p)
        >>> x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> f, g2 = sde_coefficients(p, 0.5)
        >>> z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        >>> x2 = x + (f * -0.01) * x - (g2 * -0.01) * g.score(x, 0.5) + (g2 * 0.01) ** 0.5 * z
        >>> d = ito_log_density_step(p, 0.5, 0.49, x, x2, g.score(x, 0.5))
        >>> exact = g.log_prob(x2, 0.49) - g.log_prob(x, 0.5)
        >>> bool(abs(float((d - exact).mean())) < 0.01)  # unbiased to first order
        True
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    dt = float(t_next) - float(t)
    f, g2 = sde_coefficients(process, t)
    nd = x.ndim - 1
    d = x[0].numel()
    y = (x_next - x).to(torch.float64) - (f * dt) * x.to(torch.float64)  # dx - f x dt
    sq = 0.5 * g2 * dt * _dot(scores, scores, nd)
    if form == "or_code":
        sq = -sq
    return -f * d * dt + _dot(scores, y, nd) + sq


def or_kappa(log_q: Tensor, temperature: float = 1.0, log_weights: Tensor | None = None) -> Tensor:
    """OR weights ``softmax_i(T (log q_i + log w_i))`` over the first dim of ``[M, B]``.

    Example:
        >>> import torch
        >>> or_kappa(torch.tensor([[0.0], [0.0]])).flatten().tolist()
        [0.5, 0.5]
    """
    z = log_q if log_weights is None else log_q + log_weights.reshape(-1, 1).to(log_q)
    return torch.softmax(temperature * z, dim=0)


def and_kappa(scores: Tensor, z: Tensor, g2: float, dt: float) -> Tensor:
    """AND weights ``[M, B]``: the ``kappa`` (summing to 1) that makes every ``log q_i``
    change equally in the Euler-Maruyama step with noise ``z`` (module docstring).

    Args:
        scores: ``[M, B, ...]`` scores at the step's start.
        z: ``[B, ...]`` the step's standard normal noise.
        g2, dt: ``g(t)^2`` and the (negative) time step.

    Example:
        >>> import torch
        >>> s = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
        >>> and_kappa(s, torch.zeros(1, 2, dtype=torch.float64), 1.0, -0.01).flatten().tolist()
        [0.5, 0.5]
    """
    m = scores.shape[0]
    nd = scores.ndim - 2
    s = scores.to(torch.float64)
    b = (g2 * abs(dt)) ** 0.5 * _dot(s, z.to(torch.float64), nd) + 0.5 * g2 * dt * _dot(s, s, nd)
    c = g2 * dt
    eps = torch.finfo(torch.float64).eps
    if m == 2:
        delta = s[0] - s[1]
        den = _dot(delta, delta, nd)
        num = (b[0] - b[1]) / c - _dot(delta, s[1], nd)
        scale = _dot(s[0], s[0], nd) + _dot(s[1], s[1], nd)
        ok = den > 1e3 * eps * scale.clamp_min(eps)
        k1 = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), 0.5)
        return torch.stack([k1, 1.0 - k1])
    flat = s.reshape(m, s.shape[1], -1).transpose(0, 1)  # [B, M, D]
    a = flat @ flat.transpose(1, 2)  # [B, M, M]
    bt = b.transpose(0, 1)  # [B, M]
    mat = torch.cat([a[:, 1:] - a[:, :1], torch.ones_like(a[:, :1])], dim=1)
    rhs = torch.cat([(bt[:, 1:] - bt[:, :1]) / c, torch.ones_like(bt[:, :1])], dim=1)
    sol = torch.linalg.lstsq(mat, rhs[..., None], driver="gelsd").solution[..., 0]
    bad = ~torch.isfinite(sol).all(1)
    sol[bad] = 1.0 / m
    return sol.transpose(0, 1)


def _phi(x: Tensor, scores: Tensor, f: float, g2: float) -> Tensor:
    """``-f d - f x . s_i + (g^2 / 2) |s_i|^2`` per expert and sample ``[M, B]``: the
    ``dt`` coefficient of the Ito update."""
    nd = x.ndim - 1
    return -f * x[0].numel() - f * _dot(scores, x, nd) + 0.5 * g2 * _dot(scores, scores, nd)


def _final_coefficients(process: Process, t: float) -> tuple[float, float]:
    """``(f, g^2)`` at the grid's last time (``g^2`` may vanish exactly at ``t = 0``; the
    trapezoid only needs the values, not a positive ``g``)."""
    try:
        return sde_coefficients(process, t)
    except ValueError:
        return 0.0, 0.0


@dataclass(frozen=True)
class SuperDiffInfo:
    """What :func:`superdiff_sample` measured along the way.

    Attributes:
        grid: ``[N + 1]`` times.
        log_q: ``[N + 1, M, B]`` running Ito estimates of ``log q_i,t(x_t)`` (started at
            ``log_q_init``).
        kappa: ``[N, M, B]`` the weights used in each step.
        nfe: network calls (one per step, plus one for ``final="denoise"``; an unstacked
            set of ``M`` experts counts ``M`` per step).
    """

    grid: Tensor
    log_q: Tensor
    kappa: Tensor
    nfe: int


def superdiff_sample(
    models: Any,
    x: Tensor,
    grid: Tensor | int,
    mode: str = "or",
    *,
    cond: Sequence[Any] | None = None,
    temperature: float = 1.0,
    log_weights: Sequence[float] | Tensor | None = None,
    noise: Any = None,
    log_q_init: Tensor | None = None,
    grid_kind: str = "logsnr",
    final: str = "denoise",
    estimator: str = "ito",
) -> tuple[Tensor, SuperDiffInfo]:
    """Sample the OR or AND superposition of ``M >= 2`` models by the reverse SDE.

    Args:
        models: a list of denoisers sharing one process, or one conditional denoiser with
            ``cond`` (then the network is called once per step on the stacked batch).
        x: ``[B, ...]`` start at ``grid[0]`` (e.g. ``process.prior_sample``).
        grid: decreasing times or a number of steps (``grid_kind`` grid, ``t_max -> t_min``).
        mode: ``"or"`` (mixture), ``"and"`` (equal densities) or ``"average"`` (fixed
            equal ``kappa``: the averaged outputs, the baseline on the same sampler).
        cond: one condition per expert.
        temperature: OR's ``T`` (paper default 1).
        log_weights: OR's ``log w_i`` (default equal).
        noise: an int seed (per-sample seeds), a list of seeds, a ``torch.Generator`` or a
            noise source (as :func:`diffusolve.sample`).
        log_q_init: ``[M, B]`` values of ``log q_i`` at ``grid[0]`` (default 0 for all:
            the models share the prior there).
        estimator: ``"ito"`` (the paper's) or ``"trapezoid"`` (second-order bias
            correction from the next step's scores, no extra call except one at the end
            with ``final="none"``).
        final: ``"denoise"``: the combined x0 ``sum_i kappa_i D_i`` at ``grid[-1]`` (OR: the
            weights at the end; AND: the last step's); ``"none"``: the state.

    Returns:
        ``(samples, SuperDiffInfo)``.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import vp_linear
        >>> p = vp_linear()
        >>> a = GaussianMixture(torch.ones(1), torch.tensor([[-2.0]]), torch.tensor([0.01]), process=p)
        >>> b = GaussianMixture(torch.ones(1), torch.tensor([[2.0]]), torch.tensor([0.01]), process=p)
        >>> x = p.prior_sample((400, 1), noise=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> out, info = superdiff_sample([a, b], x, 100, "or", noise=torch.Generator().manual_seed(1))
        >>> 0.4 < float((out > 0).double().mean()) < 0.6, tuple(info.log_q.shape)
        (True, (101, 2, 400))
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if final not in ("denoise", "none"):
        raise ValueError(f"final must be 'denoise' or 'none', got {final!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    experts = Experts(models, cond)
    process, m, b = experts.process, experts.size, x.shape[0]
    if m < 2 and mode != "average":
        raise ValueError(f"mode {mode!r} composes at least two models; got {m}")
    grid = (
        make_grid(process, grid, grid_kind) if isinstance(grid, int) else check_grid(process, grid)
    )
    lw = None
    if log_weights is not None:
        lw = torch.as_tensor(log_weights, dtype=torch.float64).flatten()
        if lw.numel() != m:
            raise ValueError(f"log_weights needs {m} entries (one per model), got {lw.numel()}")
    src = as_noise_source(noise, b)
    log_q = torch.zeros(m, b, dtype=torch.float64)
    if log_q_init is not None:
        log_q = log_q + torch.as_tensor(log_q_init, dtype=torch.float64).reshape(m, b)
    logs, kappas = [log_q], []
    nfe_per = 1 if experts.stacked else m
    nfe = 0
    shape = (m, b) + (1,) * (x.ndim - 1)
    prev = None  # (phi_n, s_n, u_n dt, dt) of the previous step, for the trapezoid
    n_steps = grid.numel() - 1
    x0s = None
    for i in range(n_steps + 1):
        t = float(grid[i])
        if i == n_steps and final == "none" and estimator == "ito":
            break
        a_t, s_t = float(process.alpha(t)), float(process.sigma(t))
        f, g2 = sde_coefficients(process, t) if i < n_steps else _final_coefficients(process, t)
        x0s = experts.denoise(x, t)
        nfe += nfe_per
        scores = score_from_x0(x, x0s, a_t, s_t)
        if estimator == "trapezoid":
            phi = _phi(x, scores, f, g2)
            if prev is not None:
                phi0, s0, udt, dt0 = prev
                corr = 0.5 * (phi - phi0) * dt0 + 0.5 * _dot(scores - s0, udt, x.ndim - 1)
                log_q = log_q + corr
                logs[-1] = log_q
        if i == n_steps:
            break
        tn = float(grid[i + 1])
        dt = tn - t
        z = src(tuple(x.shape), dtype=x.dtype, device=x.device)
        if mode == "or":
            kappa = or_kappa(log_q, temperature, lw)
        elif mode == "and":
            kappa = and_kappa(scores, z, g2, dt)
        else:
            kappa = torch.full((m, b), 1.0 / m, dtype=torch.float64)
        s = (kappa.to(x.dtype).reshape(shape) * scores).sum(0)
        udt = (f * dt) * x - (g2 * dt) * s
        x_next = x + udt + (g2 * abs(dt)) ** 0.5 * z
        log_q = log_q + ito_log_density_step(process, t, tn, x, x_next, scores)
        if estimator == "trapezoid":
            prev = (phi, scores, udt, dt)
        logs.append(log_q)
        kappas.append(kappa)
        x = x_next
    if final == "denoise":
        kappa = or_kappa(log_q, temperature, lw) if mode == "or" else kappas[-1]
        x = (kappa.to(x.dtype).reshape(shape) * x0s).sum(0)
    info = SuperDiffInfo(grid, torch.stack(logs), torch.stack(kappas), nfe)
    return x, info
