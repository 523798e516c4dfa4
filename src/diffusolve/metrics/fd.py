"""Frechet distance between feature sets, and FD with a caller-given feature function.

``FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` between Gaussians fitted to two
feature sets (Heusel et al. 2017). :func:`fd` applies a feature function (an Inception
network for FID, the bundled digits classifier for FD-digits) to both sample sets first.
Like FID it is biased upward at small sample sizes: compare numbers only at equal sizes.

This module depends on torch, numpy and scipy only. FD-digits (the bundled classifier's
features against the held-out digits) is :func:`diffusolve.models.fd_digits`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["frechet_distance", "frechet_distance_from_moments", "fd", "FrechetTarget"]


def _np2d(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples per feature set to fit a covariance")
    return x


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``[N_a, D]`` and ``[N_b, D]``.

    The matrix square root is scipy's :func:`scipy.linalg.sqrtm` in float64; if the product
    of covariances is singular, ``1e-6 I`` is added to both (as FID implementations do), and
    the imaginary round-off of the root is dropped.

    Example:
        >>> import torch
        >>> from diffusolve.metrics.fd import frechet_distance
        >>> a = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_distance(a, a), 6)
        0.0
        >>> round(frechet_distance(a, a + 2.0), 6)  # equal covariances: |2 * ones(3)|^2
        12.0
    """
    a, b = _np2d(feats_a), _np2d(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    return frechet_distance_from_moments(a.mean(0), ca, b.mean(0), cb)


def frechet_distance_from_moments(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)`` (float64; the
    regularisation of :func:`frechet_distance`). Streaming and distributed statistics
    (:class:`diffusolve.distributed.GaussianMoments`) end here.

    Example:
        >>> import numpy as np
        >>> round(frechet_distance_from_moments(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)), 6)
        4.0
    """
    from scipy import linalg

    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    ca, cb = (
        np.atleast_2d(np.asarray(cov_a, np.float64)),
        np.atleast_2d(np.asarray(cov_b, np.float64)),
    )
    root = linalg.sqrtm(ca @ cb)
    if not np.all(np.isfinite(root)):
        eye = 1e-6 * np.eye(ca.shape[0])
        root = linalg.sqrtm((ca + eye) @ (cb + eye))
    root = np.real(root)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(root), 0.0))


class FrechetTarget:
    """Differentiable Frechet distance of feature batches to fixed reference features.

    The reference moments ``mu_r, C_r`` are computed once (float64), with the symmetric
    root ``S = C_r^{1/2}``. For features ``f`` ``[N, D]`` of a batch, with moments
    ``mu, C``, ``tr (C C_r)^{1/2} = tr (S C S)^{1/2}`` (the two products are similar), so

        FD(f) = |mu - mu_r|^2 + tr C + tr C_r - 2 sum_i sqrt(max(e_i, 0)),

    ``e_i`` the eigenvalues of the symmetric ``S C S``: a torch expression that autograd
    differentiates in ``f`` (the search's FD proxy fits sampler parameters with it). It
    equals :func:`frechet_distance` of the same two sets up to that function's ``1e-6 I``
    regularisation of singular products.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> ref, f = torch.randn(400, 3, generator=g), torch.randn(300, 3, generator=g) + 0.5
        >>> target = FrechetTarget(ref)
        >>> abs(float(target(f)) - frechet_distance(f, ref)) < 1e-9
        True
    """

    def __init__(self, reference: Tensor | np.ndarray) -> None:
        ref = torch.as_tensor(_np2d(reference))
        self.dim = ref.shape[1]
        self.mu = ref.mean(0)
        cov = torch.atleast_2d(torch.cov(ref.T))
        vals, vecs = torch.linalg.eigh(cov)
        self.root = (vecs * vals.clamp_min(0.0).sqrt()) @ vecs.T
        self.trace = torch.trace(cov)

    def __call__(self, feats: Tensor) -> Tensor:
        """FD of ``feats`` ``[N, D]`` (``N >= 2``) to the reference, a float64 scalar tensor
        that carries gradients."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(feats.shape)}")
        if feats.shape[0] < 2:
            raise ValueError("need at least 2 samples to fit a covariance")
        f = feats.to(torch.float64)
        mu = f.mean(0)
        cov = torch.atleast_2d(torch.cov(f.T))
        root = self.root.to(f.device)
        m = root @ cov @ root
        vals = torch.linalg.eigvalsh((m + m.T) / 2)
        # clamp_min(0) before the root: round-off can make the smallest eigenvalues slightly
        # negative; the tiny floor keeps the root's gradient finite at exact zeros
        tr_root = vals.clamp_min(1e-30).sqrt().sum()
        diff = mu - self.mu.to(f.device)
        return diff @ diff + torch.trace(cov) + self.trace.to(f.device) - 2.0 * tr_root


def fd(
    x: Tensor,
    y: Tensor,
    features: Callable[[Tensor], Tensor | np.ndarray],
    *,
    batch_size: int | None = None,
) -> float:
    """Frechet distance between ``features(x)`` and ``features(y)`` (see
    :func:`frechet_distance`). ``features`` maps a batch ``[n, ...]`` to ``[n, D]``; with
    ``batch_size`` it is applied in chunks of that size. No gradients are recorded.

    Example:
        >>> import torch
        >>> from diffusolve.metrics import fd
        >>> x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
        >>> round(fd(x, x + 1.0, lambda z: 2.0 * z), 6)  # features double the shift: |(2, 2)|^2
        8.0
    """
    return frechet_distance(_features(x, features, batch_size), _features(y, features, batch_size))


def _features(x: Tensor, features: Callable, batch_size: int | None) -> Tensor | np.ndarray:
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    with torch.no_grad():
        if batch_size is None:
            return features(x)
        parts = [features(x[i : i + batch_size]) for i in range(0, len(x), int(batch_size))]
    if parts and isinstance(parts[0], Tensor):
        return torch.cat([p.detach().to("cpu", torch.float64) for p in parts])
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


#: names that moved to :mod:`diffusolve.models` (metrics must not import models)
MOVED = {
    "fd_digits": "diffusolve.models.fd_digits",
    "fd_digits_noise_floor": "diffusolve.models.fd_digits_noise_floor",
    "digits_features": "diffusolve.models.digits_features",
}


def __getattr__(name: str):
    if name in MOVED:
        raise ImportError(
            f"diffusolve.metrics.{name} moved to {MOVED[name]} (metrics no longer depends on "
            f"the bundled model); use `from diffusolve.models import {name}`."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
