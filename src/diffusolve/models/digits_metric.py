"""FD-digits: the Frechet distance in the feature space of the bundled digits classifier.

FID's recipe (Heusel et al. 2017) with the bundled noise-aware digits classifier in place of
Inception: its penultimate features (64-d) at ``t = t_min`` on 16x16 images in [-1, 1],
compared with the held-out split of scikit-learn's digits (359 images). Like FID it is
biased upward at small sample sizes: compare numbers only at equal sizes, and next to the
noise floor :func:`fd_digits_noise_floor` (held-out vs a train subset of the same size).
The distance itself is :func:`diffusolve.metrics.frechet_distance`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..metrics.fd import frechet_distance

__all__ = ["digits_features", "fd_digits", "fd_digits_noise_floor"]


def digits_features(
    images: Tensor,
    *,
    classifier: Any = None,
    t: float | None = None,
    batch_size: int = 512,
    grad: bool = False,
) -> Tensor:
    """Penultimate features ``[N, 64]`` (float64) of the digits classifier for images
    ``[N, 1, 16, 16]`` in [-1, 1], presented at ``t`` (default 0). No gradients unless
    ``grad=True``: then the features are differentiable in ``images`` (one batch, on the
    images' device), as the search's FD proxy needs."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 16, 16):
        raise ValueError(
            f"FD-digits needs images of shape [N, 1, 16, 16] in [-1, 1], got {tuple(images.shape)}"
        )
    if classifier is None:
        from .bundled import load_classifier

        classifier = load_classifier()
    t = 0.0 if t is None else float(t)
    if grad:
        return classifier.features(images.to(torch.float32), t).to(torch.float64)
    x = images.detach().to("cpu", torch.float32)
    with torch.no_grad():
        feats = [
            classifier.features(x[i : i + batch_size], t) for i in range(0, len(x), batch_size)
        ]
    return torch.cat(feats).to(torch.float64)


@lru_cache(maxsize=4)
def _reference_features(part: str) -> Tensor:
    from .data import load_digits

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
        >>> from diffusolve.models import fd_digits
        >>> from diffusolve.models.data import load_digits
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
    from .data import load_digits

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
