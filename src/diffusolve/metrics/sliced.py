"""Sample metrics against exact references: sliced Wasserstein, its noise floor, relative error.

A sample metric is only meaningful next to its noise floor: the same metric between two
independent exact sample sets of the same size (:func:`sw_noise_floor`). A sampler whose
distance to exact samples is within that floor is indistinguishable at that sample size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "sw_noise_floor", "rel_error", "random_projections"]


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def random_projections(dim: int, n_projections: int, seed: int = 0) -> np.ndarray:
    """``[dim, n_projections]`` unit directions, uniform on the sphere, fixed by ``seed``."""
    p = np.random.default_rng(seed).standard_normal((dim, n_projections))
    return p / np.linalg.norm(p, axis=0, keepdims=True)


def sliced_wasserstein(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    n_projections: int = 256,
    seed: int = 0,
    p: int = 2,
) -> float:
    """Sliced ``p``-Wasserstein distance between two sample sets (flattened per sample).

    Uses POT's :func:`ot.sliced_wasserstein_distance` with projections fixed by ``seed``
    (the same directions for every call with the same ``seed`` and dimension), so distances
    of different samplers to one reference are comparable.

    Example:
        >>> import torch
        >>> from diffusolve.metrics import sliced_wasserstein
        >>> x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
        >>> sliced_wasserstein(x, x)
        0.0
        >>> sliced_wasserstein(x, x + 1.0) > 0.5
        True
    """
    import ot

    a, b = _np(x), _np(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    proj = random_projections(a.shape[1], n_projections, seed)
    return float(ot.sliced_wasserstein_distance(a, b, projections=proj, p=p))


def sw_noise_floor(
    sample_fn: Callable[[int, torch.Generator], Tensor],
    n: int,
    repeats: int = 5,
    seed: int = 0,
    n_projections: int = 256,
) -> dict[str, Any]:
    """Sliced Wasserstein between independent exact sample sets of size ``n``.

    ``sample_fn(n, generator)`` draws exact samples (e.g. ``prior.sample``). Each repeat
    draws two fresh sets (generators seeded from ``seed``) and uses the projections of
    :func:`sliced_wasserstein` with ``seed``.

    Returns:
        ``dict(mean, std, values, n, repeats)``.

    Example:
        >>> import torch
        >>> from diffusolve.metrics import sw_noise_floor
        >>> f = lambda n, g: torch.randn(n, 2, generator=g)
        >>> floor = sw_noise_floor(f, 2000, repeats=3)
        >>> 0 < floor["mean"] < 0.1
        True
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    vals = []
    for r in range(repeats):
        g1 = torch.Generator().manual_seed(seed * 100_003 + 2 * r)
        g2 = torch.Generator().manual_seed(seed * 100_003 + 2 * r + 1)
        vals.append(
            sliced_wasserstein(sample_fn(n, g1), sample_fn(n, g2), n_projections, seed=seed)
        )
    v = np.asarray(vals)
    return dict(
        mean=float(v.mean()),
        std=float(v.std(ddof=1)) if repeats > 1 else 0.0,
        values=vals,
        n=n,
        repeats=repeats,
    )


def rel_error(x: Tensor, ref: Tensor, reduction: str = "mean") -> float | Tensor:
    """Per-sample relative error ``||x_i - ref_i|| / ||ref_i||`` (flattened), reduced.

    ``reduction``: ``"mean"`` (default) or ``"max"`` give a float, ``"none"`` the ``[B]``
    float64 tensor.

    Example:
        >>> import torch
        >>> from diffusolve.metrics import rel_error
        >>> round(rel_error(torch.tensor([[3.0, 4.5]]), torch.tensor([[3.0, 4.0]])), 6)
        0.1
    """
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    a = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    b = ref.detach().reshape(ref.shape[0], -1).to(device=a.device, dtype=torch.float64)
    e = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    if reduction == "none":
        return e
    if reduction == "mean":
        return float(e.mean())
    if reduction == "max":
        return float(e.max())
    raise ValueError(f"reduction must be 'mean', 'max' or 'none'; got {reduction!r}")
