"""Parameterisation conversions, in one place: x0 <-> epsilon <-> v <-> score <-> velocity.

All functions take the state ``x`` at time ``t`` of ``process`` and a prediction, and
return the other parameterisation. Coefficients are computed in float64 and cast to the
dtype of ``x``. Definitions (for ``x = alpha x0 + sigma eps``):

* ``eps``: the noise; ``x0 = (x - sigma eps) / alpha``.
* ``v = alpha eps - sigma x0`` (Salimans & Ho 2022; reduces to diffusers' v for VP).
* ``score = grad log p_t(x) = -eps / sigma``.
* ``velocity = dx/dt = alpha'(t) x0 + sigma'(t) eps`` (flow matching; for rectified flow
  this is ``eps - x0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Process, as_time

__all__ = ["PREDICTIONS", "to_x0", "from_x0", "eps_from_x0", "x0_from_eps", "convert"]

PREDICTIONS = ("x0", "epsilon", "v", "score", "velocity")


def _c(value: Tensor, like: Tensor) -> Tensor:
    """A float64 coefficient (scalar or per-sample) shaped to multiply ``like``.

    A 0-d coefficient is returned as it is: PyTorch's type promotion keeps the dtype of a
    dimensioned tensor multiplied by a 0-d tensor of the same category (and a 0-d CPU
    tensor combines with tensors on any device), so no cast is needed on the hot path."""
    if value.ndim == 0 and not value.is_complex():
        return value
    value = value.to(dtype=like.dtype, device=like.device)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def x0_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x0 = (x - sigma eps) / alpha``."""
    return (x - _c(sigma, x) * eps) / _c(alpha, x)


def eps_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``eps = (x - alpha x0) / sigma``."""
    return (x - _c(alpha, x) * x0) / _c(sigma, x)


def to_x0(process: Process, x: Tensor, t: Tensor | float, pred: Tensor, kind: str) -> Tensor:
    """Convert a ``kind`` prediction at ``(x, t)`` to the x0 (Tweedie) estimate.

    Example:
        >>> import torch
        >>> from diffusolve.process import rectified_flow, to_x0
        >>> p = rectified_flow()
        >>> x0, eps = torch.ones(3), torch.zeros(3)
        >>> x = p.marginal(x0, 0.5, eps)
        >>> torch.allclose(to_x0(p, x, 0.5, eps - x0, "velocity"), x0)
        True
    """
    t = as_time(t)
    a, s = process.alpha(t), process.sigma(t)
    if kind == "x0":
        return pred
    if kind == "epsilon":
        return x0_from_eps(x, pred, a, s)
    if kind == "v":
        n = a * a + s * s
        return (_c(a / n, x) * x) - _c(s / n, x) * pred
    if kind == "score":
        return (x + _c(s * s, x) * pred) / _c(a, x)
    if kind == "velocity":
        da, ds = process.d_alpha(t), process.d_sigma(t)
        det = ds * a - s * da
        return (_c(ds / det, x) * x) - _c(s / det, x) * pred
    raise ValueError(f"unknown prediction type {kind!r}; choose from {PREDICTIONS}")


def from_x0(process: Process, x: Tensor, t: Tensor | float, x0: Tensor, kind: str) -> Tensor:
    """Convert an x0 estimate at ``(x, t)`` to the ``kind`` parameterisation."""
    t = as_time(t)
    a, s = process.alpha(t), process.sigma(t)
    if kind == "x0":
        return x0
    eps = eps_from_x0(x, x0, a, s)
    if kind == "epsilon":
        return eps
    if kind == "v":
        return _c(a, x) * eps - _c(s, x) * x0
    if kind == "score":
        return -eps / _c(s, x)
    if kind == "velocity":
        return _c(process.d_alpha(t), x) * x0 + _c(process.d_sigma(t), x) * eps
    raise ValueError(f"unknown prediction type {kind!r}; choose from {PREDICTIONS}")


def convert(
    process: Process, x: Tensor, t: Tensor | float, pred: Tensor, src: str, dst: str
) -> Tensor:
    """Convert a prediction from parameterisation ``src`` to ``dst``."""
    return from_x0(process, x, t, to_x0(process, x, t, pred, src), dst)


def coef(value: Tensor | float, like: Tensor) -> Tensor:
    """Public alias of the coefficient helper used by solvers."""
    return _c(torch.as_tensor(value, dtype=torch.float64), like)
