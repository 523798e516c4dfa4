"""Frechet distance and FD-digits (FID's recipe with the bundled digits classifier).

``FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` between Gaussians fitted to two
feature sets (Heusel et al. 2017). FD-digits uses the penultimate features (64-d) of the
bundled noise-aware digits classifier at ``t = t_min`` on 16x16 images in [-1, 1] and
compares them with the held-out split of scikit-learn's digits (359 images). Like FID it is
biased upward at small sample sizes: compare numbers only at equal sizes, and next to the
noise floor :func:`fd_digits_noise_floor` (held-out vs a train subset of the same size).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["frechet_distance", "digits_features", "fd_digits", "fd_digits_noise_floor"]


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
    from scipy import linalg

    a, b = _np2d(feats_a), _np2d(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(ca @ cb)
    if not np.all(np.isfinite(root)):
        eye = 1e-6 * np.eye(ca.shape[0])
        root = linalg.sqrtm((ca + eye) @ (cb + eye))
    root = np.real(root)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(root), 0.0))


def digits_features(
    images: Tensor, *, classifier: Any = None, t: float | None = None, batch_size: int = 512
) -> Tensor:
    """Penultimate features ``[N, 64]`` of the digits classifier for images ``[N, 1, 16, 16]``
    in [-1, 1], presented at ``t`` (default: the process's ``t_min``). No gradients."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 16, 16):
        raise ValueError(
            f"FD-digits needs images of shape [N, 1, 16, 16] in [-1, 1], got {tuple(images.shape)}"
        )
    if classifier is None:
        from ..models.bundled import load_classifier

        classifier = load_classifier()
    t = 0.0 if t is None else float(t)
    x = images.detach().to("cpu", torch.float32)
    with torch.no_grad():
        feats = [
            classifier.features(x[i : i + batch_size], t) for i in range(0, len(x), batch_size)
        ]
    return torch.cat(feats).to(torch.float64)


@lru_cache(maxsize=4)
def _reference_features(part: str) -> Tensor:
    from ..train.data import load_digits

    x, _ = load_digits(part)
    return digits_features(x)


def fd_digits(samples: Tensor, reference: str | Tensor = "heldout") -> float:
    """FD-digits of ``samples`` ``[N, 1, 16, 16]`` (in [-1, 1]) against ``reference``.

    Args:
        samples: generated digits.
        reference: ``"heldout"`` (the 359 held-out digits, default), ``"train"`` (1,438), or
            a tensor of reference images.

    The figure depends on ``N`` (small-sample bias); the model card states it for 1,000
    samples together with the noise floor.

    Example:
        >>> from diffusolve.metrics.fd import fd_digits
        >>> from diffusolve.train.data import load_digits
        >>> fd_digits(load_digits("heldout")[0]) < 1e-6
        True
    """
    if isinstance(reference, str):
        if reference not in ("heldout", "train"):
            raise ValueError(f"reference must be 'heldout', 'train' or images, got {reference!r}")
        ref = _reference_features(reference)
    else:
        ref = digits_features(reference)
    return frechet_distance(digits_features(samples), ref)


def fd_digits_noise_floor(n: int | None = None, seed: int = 0) -> float:
    """FD-digits between the held-out split and ``n`` train images (default: as many as the
    held-out split, 359), drawn without replacement with ``seed`` and class-balanced like the
    model card's samples (label ``i % 10`` for the ``i``-th image): the distance between two
    sets of real digits, i.e. the scale of a perfect model's FD at that size."""
    from ..train.data import load_digits

    x, y = load_digits("train")
    n = len(_reference_features("heldout")) if n is None else int(n)
    per_class = torch.bincount(torch.arange(n) % 10, minlength=10)
    if n < 2 or bool((per_class > torch.bincount(y, minlength=10)).any()):
        raise ValueError(f"n must be in [2, {10 * int(torch.bincount(y).min())}], got {n}")
    gen = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(10):
        pool = torch.nonzero(y == c).flatten()
        idx.append(pool[torch.randperm(len(pool), generator=gen)[: int(per_class[c])]])
    return fd_digits(x[torch.cat(idx)], "heldout")
