"""Local intrinsic dimension (ID) from a diffusion model's denoiser, three estimators.

All three read the model in the scaled frame of :mod:`._field`: ``y = x / alpha``,
``s = sigma / alpha``, where the noised data density is ``p_s = p_0 * N(0, s^2 I)`` for
every process. Near a point ``x0`` of a ``k``-dimensional data manifold in ``R^D``, at noise
``s`` small against the manifold's own scale (curvature, tangent variances), the denoiser
``D(y, s)`` keeps the ``k`` tangent directions and removes the ``D - k`` normal ones.
``sigma`` arguments are such noise levels ``s`` (data units); they must lie in the range the
process covers between ``t_min`` and ``t_max``.

* :func:`stanczuk_id` (Stanczuk, Batzolis, Deveney & Schoenlieb, "Diffusion models encode the
  intrinsic dimension of data manifolds", ICML 2024, arXiv 2212.12611): the scores at ``K``
  perturbations ``x0 + s z`` point along the normal space; the number of large singular
  values of the stacked ``K x D`` matrix is the normal dimension ``n``; ``ID = D - n``.
* :func:`flipd_id` (Kamkari, Ross, Hosseinzadeh, Cresswell & Loaiza-Ganem, "A geometric view
  of data complexity: efficient local intrinsic dimension estimation with diffusion models",
  NeurIPS 2024, arXiv 2406.03537): ``log p_s(x0) ~ (k - D) log s + c`` as ``s -> 0``, so
  ``ID = D + d log p_s(x0) / d log s``, given in closed form by the heat equation.
* :func:`flow_jacobian_id` (Horvat & Pfister, "On gauge freedom, conservativity and intrinsic
  dimensionality estimation in diffusion models", ICLR 2024, arXiv 2402.03845): the
  probability-flow map's Jacobian expands normal directions like ``s`` and keeps tangent
  ones; ``ID`` is the number of directions that did not expand.

:func:`low_rank_mixture` builds the test case with known answers: a mixture of Gaussians of
given ranks (exact denoiser, :class:`~diffusolve.models.GaussianMixture` with
``singular=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models import GaussianMixture
from ..process import Process
from ._field import TABLEAUX, Frame, gap_rank, jacobian, probes_like, rk_fixed, trace

__all__ = [
    "stanczuk_id",
    "flipd_id",
    "flow_jacobian_id",
    "low_rank_mixture",
    "component_samples",
]


def _flat(x0: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batch [B, ...], got shape {tuple(x0.shape)}")
    return x0.to(dtype), math.prod(x0.shape[1:])


def stanczuk_id(
    model: Any,
    x0: Tensor,
    cond: Any = None,
    *,
    sigma: float = 0.02,
    n_perturb: int | None = None,
    center: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    max_rows: int = 4096,
) -> tuple[Tensor, dict[str, Any]]:
    """Normal-space SVD estimate (Stanczuk et al. 2024, Algorithm 1).

    For each point: ``K`` perturbations ``y_i = x0 + sigma z_i`` (``z_i ~ N(0, I)``, from
    ``seed``), the vectors ``y_i - D(y_i, sigma) = -sigma^2 score(y_i)`` stacked into
    ``S [K, D]``, its singular values, and the largest gap of their logarithms
    (:func:`~._field.gap_rank`): the values above it count the normal dimension ``n``;
    ``ID = D - n``.

    Hyper-parameters:
        sigma: the perturbation and noise level ``s`` (paper: a small diffusion time). Must
            be small against the manifold's tangent scale (the tangent part of ``S`` is
            ``~ sigma^2 / l`` times the normal part, ``l`` a tangent variance) but where the
            model is still accurate.
        n_perturb: ``K`` (default ``4 D``; the paper needs ``K >= D`` and uses more for
            stability).
        center: subtract the mean of the ``K`` rows before the SVD (default ``True``; our
            addition). The score at ``x0`` has a common tangent component (towards the
            mode of the tangent distribution), of size ``|x0 - mu|_t / l``, which would add
            one singular value between the two groups; centring removes it and leaves the
            ``sigma``-sized tangent fluctuations, so the gap is ``~ l / sigma^2``.

    Returns:
        ``(id [B] float64 (integers), info)``; ``info["singular_values"] [B, min(K, D)]``.

    Example:
        >>> import torch
        >>> from diffusolve.process import edm
        >>> g, ranks = low_rank_mixture(8, [2, 5], process=edm(), seed=0)
        >>> x, comp = component_samples(g, 2, seed=1)
        >>> stanczuk_id(g, x)[0].tolist(), [ranks[k] for k in comp.tolist()]
        ([2.0, 2.0, 5.0, 5.0], [2, 2, 5, 5])
    """
    x0, d = _flat(x0, dtype)
    b = x0.shape[0]
    k = 4 * d if n_perturb is None else int(n_perturb)
    if k < 2:
        raise ValueError(f"n_perturb must be >= 2, got {k}")
    frame = Frame(model, cond, b)
    gen = torch.Generator().manual_seed(int(seed))
    rows = torch.arange(b).repeat_interleave(k)
    z = torch.randn((b * k,) + tuple(x0.shape[1:]), generator=gen, dtype=torch.float64)
    y = x0[rows] + sigma * z.to(dtype)
    out = torch.empty_like(y)
    with torch.no_grad():
        for c0 in range(0, rows.numel(), max_rows):
            r = slice(c0, c0 + max_rows)
            out[r] = y[r] - frame.denoise(y[r], sigma, rows[r])
    mat = out.reshape(b, k, d).to(torch.float64)
    if center:
        mat = mat - mat.mean(1, keepdim=True)
    sv = torch.linalg.svdvals(mat)
    n = gap_rank(sv)
    return (d - n).to(torch.float64), {"singular_values": sv, "normal_dim": n}


def flipd_id(
    model: Any,
    x0: Tensor,
    cond: Any = None,
    *,
    sigma: float = 0.05,
    trace_mode: str = "exact",
    probes: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    max_rows: int = 4096,
) -> tuple[Tensor, dict[str, Any]]:
    """FLIPD (Kamkari et al. 2024): ``ID = D + d log p_s(x0) / d log s`` at a small ``s``.

    Derivation in our frame: ``p_s = p_0 * N(0, s^2 I)`` solves the heat equation
    ``dp/ds = s Lap p``, so at fixed ``y``

        ``d log p_s / d log s = s^2 (Lap log p + |grad log p|^2)``.

    With Tweedie's ``grad log p_s(y) = (D(y, s) - y) / s^2`` (``J_D = dD/dy``) this is
    ``tr J_D - D + |y - D|^2 / s^2``, hence

        ``FLIPD(x0, s) = tr J_D(x0, s) + |x0 - D(x0, s)|^2 / s^2``,

    one trace and one denoiser evaluation at the clean point ``y = x0`` (for a VP process
    this is the paper's formula after the change of variables ``x = alpha y``). On a
    ``k``-dimensional Gaussian with tangent variances ``l_j`` it equals
    ``sum_j l_j / (l_j + s^2) + sum_j s^2 y_j^2 / (l_j + s^2)^2 = k + O(s^2 / l)`` (the two
    ``O(s^2 / l)`` terms cancel on average over the data).

    Hyper-parameters:
        sigma: the noise level ``s`` (paper: ``t_0`` small, chosen where the estimate is
            flat in ``t_0``); ``s^2`` must be small against the tangent variances.
        trace_mode: ``"exact"`` (``D`` vector-Jacobian products) or ``"hutchinson"`` with
            ``probes`` Rademacher probes (seeded).

    Returns:
        ``(id [B] float64, info)``; round the estimate to compare with an integer dimension.

    Example:
        >>> import torch
        >>> from diffusolve.process import edm
        >>> g, ranks = low_rank_mixture(8, [2, 5], process=edm(), seed=0)
        >>> x, comp = component_samples(g, 2, seed=1)
        >>> flipd_id(g, x)[0].round().tolist()
        [2.0, 2.0, 5.0, 5.0]
    """
    x0, d = _flat(x0, dtype)
    b = x0.shape[0]
    frame = Frame(model, cond, b)
    v = None
    if trace_mode == "hutchinson":
        v = probes_like(x0, probes, torch.Generator().manual_seed(int(seed)))
    den, tr = trace(
        lambda y, rows: frame.denoise(y, sigma, rows),
        x0,
        mode=trace_mode,
        probes=v,
        max_rows=max_rows,
    )
    res = ((x0 - den).reshape(b, -1).to(torch.float64) ** 2).sum(1) / sigma**2
    return (tr + res).detach(), {"trace": tr.detach(), "residual": res.detach()}


def flow_jacobian_id(
    model: Any,
    x0: Tensor,
    cond: Any = None,
    *,
    sigma_start: float = 0.02,
    sigma_end: float = 0.2,
    steps: int = 4,
    method: str = "rk4",
    start: str = "noised",
    rule: str = "threshold",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    max_rows: int = 4096,
) -> tuple[Tensor, dict[str, Any]]:
    """Flow-map Jacobian estimate (Horvat & Pfister 2024).

    The probability-flow map ``phi`` from noise level ``s0 = sigma_start`` to
    ``s1 = sigma_end`` (``dy/du = y - D(y, e^u)``, ``u = log s``, ``steps`` fixed steps of
    ``method``) started at ``y = x0 + s0 z`` (``start="noised"``, ``z`` from ``seed``: a
    typical state of the noised data at ``s0``, where a network was trained) or at
    ``y = x0`` (``start="clean"``); its Jacobian ``Y = d phi / d y``
    (reverse mode through the solve, one replicated batch of ``D`` rows per point). The
    variational equation ``dY/du = (I - J_D) Y`` expands the normal directions
    (``J_D ~ 0`` there) by ``s1 / s0`` while a tangent direction of variance ``l`` grows by
    only ``sqrt((l + s1^2) / (l + s0^2))``: the inverse map (noise to data) has vanishing
    normal singular values and saturating tangent ones, the paper's criterion.

    Rules (``rule``): ``"threshold"`` (default): a direction is normal when its singular
    value exceeds ``sqrt(s1 / s0)``, half the normal expansion in ``log``; a tangent direction
    of variance ``l`` stays below it exactly when ``l > s0 s1``
    (``(l + s1^2) s0 < (l + s0^2) s1``), so the rule is exact on Gaussian components whose
    tangent variances exceed ``s0 s1``. ``"gap"``: the values above the largest gap of
    their logarithms are normal (:func:`~._field.gap_rank`; needs both groups present).
    ``ID = D - #normal``.

    Hyper-parameters:
        sigma_start, sigma_end: the noise range; ``sigma_start^2`` small against the tangent
            variances, and ``sigma_end / sigma_start`` large (the gap is about
            ``log(sigma_end / sigma_start)``) while ``sigma_end^2`` stays below the tangent
            scale (else tangent directions expand too).
        steps, method: the fixed-step integrator (``euler``, ``heun``, ``rk4``).
        start: ``"noised"`` (default) or ``"clean"``. For an exact model both give the same
            answer (a Gaussian's flow is affine); a network evaluated at a clean point with
            a noise level ``s0 > 0`` sees an input unlike its training data (measured on the
            bundled digits model: ``tr J_D`` of -284 at a clean digit vs 49 at a noised one,
            ``s = 0.02``).

    Returns:
        ``(id [B] float64, info)``; ``info["singular_values"] [B, D]``.

    Example:
        >>> import torch
        >>> from diffusolve.process import edm
        >>> g, ranks = low_rank_mixture(8, [2, 5], process=edm(), seed=0)
        >>> x, comp = component_samples(g, 2, seed=1)
        >>> flow_jacobian_id(g, x)[0].tolist()
        [2.0, 2.0, 5.0, 5.0]
    """
    if method not in TABLEAUX:
        raise ValueError(f"method must be one of {TABLEAUX}, got {method!r}")
    if not 0 < sigma_start < sigma_end:
        raise ValueError(f"need 0 < sigma_start < sigma_end, got {sigma_start}, {sigma_end}")
    if rule not in ("threshold", "gap"):
        raise ValueError(f"rule must be 'threshold' or 'gap', got {rule!r}")
    x0, d = _flat(x0, dtype)
    b = x0.shape[0]
    frame = Frame(model, cond, b)
    frame.time(sigma_start), frame.time(sigma_end)  # range check
    u0, u1 = math.log(sigma_start), math.log(sigma_end)
    if start == "noised":
        gen = torch.Generator().manual_seed(int(seed))
        z = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(dtype)
        x0 = x0 + sigma_start * z
    elif start != "clean":
        raise ValueError(f"start must be 'noised' or 'clean', got {start!r}")

    def flow(y: Tensor, rows: Tensor) -> Tensor:
        def f(u: float, z: Tensor) -> Tensor:
            return z - frame.denoise(z, math.exp(u), rows)

        return rk_fixed(f, y, u0, u1, steps, method)[0]

    jac = jacobian(flow, x0, max_rows=max_rows).to(torch.float64)
    sv = torch.linalg.svdvals(jac)
    if rule == "threshold":
        n = (sv > math.sqrt(sigma_end / sigma_start)).sum(1)
    else:
        n = gap_rank(sv)
    return (d - n).to(torch.float64), {"singular_values": sv, "normal_dim": n}


def low_rank_mixture(
    dim: int,
    ranks: Sequence[int],
    *,
    process: Process,
    seed: int = 0,
    separation: float = 10.0,
    scale: tuple[float, float] = (0.25, 1.0),
) -> tuple[GaussianMixture, list[int]]:
    """A mixture of Gaussians on affine subspaces of dimensions ``ranks`` in ``R^dim``.

    Component ``k``: equal weight, mean ``mu_k``, covariance ``U_k diag(l) U_k^T`` with a
    Haar-random rotation ``U_k`` and ``ranks[k]`` nonzero variances ``l`` log-uniform in
    ``scale`` (the rest 0). Means: ``separation / sqrt(2)`` times orthonormal random vectors
    (pairwise distance exactly ``separation``) when ``K <= dim``, else Gaussian with that
    scale. Deterministic for ``seed``.

    Returns:
        ``(mixture, list(ranks))``; :func:`component_samples` draws labelled points.
    """
    ranks = [int(r) for r in ranks]
    kk = len(ranks)
    if kk < 1 or any(not 0 <= r <= dim for r in ranks):
        raise ValueError(f"ranks must be in 0..{dim}; got {ranks}")
    rng = np.random.default_rng(seed)
    if kk <= dim:
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        means = separation / math.sqrt(2) * q[:, :kk].T
    else:
        means = rng.normal(0.0, separation / math.sqrt(2 * dim), (kk, dim))
    lo, hi = scale
    evals = np.zeros((kk, dim))
    for k, r in enumerate(ranks):
        evals[k, :r] = np.exp(rng.uniform(math.log(lo), math.log(hi), r))
    q, rr = np.linalg.qr(rng.normal(size=(kk, dim, dim)))
    q = q * np.sign(np.diagonal(rr, axis1=1, axis2=2))[:, None, :]
    gmm = GaussianMixture.from_eigh(
        torch.ones(kk, dtype=torch.float64),
        torch.from_numpy(means),
        torch.from_numpy(evals),
        torch.from_numpy(q),
        process=process,
        singular=True,
    )
    return gmm, ranks


def component_samples(gmm: GaussianMixture, n: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` exact samples of every component in turn: ``(x [K n, d], component [K n])``."""
    gen = torch.Generator().manual_seed(int(seed))
    xs, comp = [], []
    for k in range(gmm.n_components):
        z = torch.randn(n, gmm.dim, generator=gen, dtype=torch.float64)
        x = z * gmm.evals[k].sqrt()
        if gmm.evecs is not None:
            x = x @ gmm.evecs[k].T
        xs.append(gmm.means[k] + x)
        comp.append(torch.full((n,), k, dtype=torch.long))
    return torch.cat(xs).reshape((-1,) + gmm.shape), torch.cat(comp)
