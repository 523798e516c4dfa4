"""Exponential-integrator coefficients, shared by DPM-Solver(++), UniPC and the SDE solvers.

For ``x = alpha x0 + sigma eps`` and ``lambda = log(alpha / sigma)`` the probability-flow
ODE has the exact variation-of-constants solution over a step ``s -> t``
(``h = lambda_t - lambda_s``):

    noise prediction:  x_t = (alpha_t / alpha_s) x_s
                             - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda
    data prediction:   x_t = (sigma_t / sigma_s) x_s
                             + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0(lambda) dlambda

Expanding the model output ``m`` (``eps`` or ``x0``) in a Taylor series in ``lambda`` gives

    x_t = ratio x_s + sum_k  c h phi_k(z) D_{k-1}

with ``phi_1(z) = expm1(z) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`` and ``D_j``
finite differences approximating ``h^j d^j m / dlambda^j`` (``D_0 = m``), where

* noise prediction: ``ratio = alpha_t / alpha_s``, ``c = -sigma_t``, ``z = h``;
* data prediction:  ``ratio = sigma_t / sigma_s``, ``c = alpha_t``, ``z = -h``.

Every coefficient is a Python float computed in double precision, with a power series for
small ``|z|`` (no cancellation), so the same numbers arise whatever the dtype of ``x``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["phi", "phi_float", "ExpStep", "PREDICTIONS"]

PREDICTIONS = ("data", "noise")
_SERIES_BELOW = 0.05  # |z| below which phi_k uses its power series
_SERIES_TERMS = 14  # the next term is below 0.05^14 / 14!
_INV_FACTORIAL = [1.0 / math.factorial(j) for j in range(_SERIES_TERMS + 8)]


def phi_float(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j>=0} z^j / (j + k)!`` on a Python float (float64)."""
    if k < 1:
        raise ValueError(f"phi_k is defined for k >= 1, got k={k}")
    if abs(z) < _SERIES_BELOW:
        out = 0.0
        for j in reversed(range(_SERIES_TERMS)):  # Horner
            out = out * z + _INV_FACTORIAL[j + k]
        return out
    out = math.expm1(z) / z
    for j in range(1, k):
        out = (out - _INV_FACTORIAL[j]) / z
    return out


def phi(k: int, z: Tensor | float) -> Tensor:
    """``phi_k(z)`` in float64, element-wise for a tensor (series near 0).

    Example:
        >>> import math
        >>> abs(float(phi(1, 1.0)) - (math.e - 1)) < 1e-15
        True
    """
    if k < 1:
        raise ValueError(f"phi_k is defined for k >= 1, got k={k}")
    if not isinstance(z, Tensor) or z.ndim == 0:
        return torch.tensor(phi_float(k, float(z)), dtype=torch.float64)
    z = z.to(torch.float64)
    small = z.abs() < _SERIES_BELOW
    series = torch.zeros_like(z)
    for j in reversed(range(_SERIES_TERMS)):
        series = series * z + _INV_FACTORIAL[j + k]
    zs = torch.where(small, torch.ones_like(z), z)
    direct = torch.expm1(zs) / zs
    for j in range(1, k):
        direct = (direct - _INV_FACTORIAL[j]) / zs
    return torch.where(small, series, direct)


class ExpStep:
    """The exponential-integrator quantities of one step ``s -> t`` (Python floats).

    Built from the ``(alpha, sigma, lambda)`` triples of both ends (see
    :meth:`~diffusolve.solvers.base.BoundModel.scalars`).
    ``x_t = ratio * x_s + sum_k weight(k) * D_{k-1}`` with ``weight(k) = c h phi_k(z)``.

    Example:
        >>> f = ExpStep((0.9, 0.4, math.log(0.9 / 0.4)), (0.99, 0.1, math.log(9.9)), "data")
        >>> abs(f.weight(1) - (-0.99 * math.expm1(-f.h))) < 1e-15
        True
    """

    __slots__ = ("lam_s", "lam_t", "h", "alpha_t", "sigma_t", "ratio", "c", "z")

    def __init__(
        self,
        s: tuple[float, float, float],
        t: tuple[float, float, float],
        prediction: str,
    ) -> None:
        alpha_s, sigma_s, self.lam_s = s
        self.alpha_t, self.sigma_t, self.lam_t = t
        self.h = self.lam_t - self.lam_s
        if prediction == "data":
            self.ratio = self.sigma_t / sigma_s
            self.c, self.z = self.alpha_t, -self.h
        elif prediction == "noise":
            self.ratio = self.alpha_t / alpha_s
            self.c, self.z = -self.sigma_t, self.h
        else:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    def weight(self, k: int) -> float:
        """``c h phi_k(z)``: the coefficient of the k-th Taylor term."""
        return self.c * self.h * phi_float(k, self.z)

    def first_order(self, x: Tensor, m: Tensor) -> Tensor:
        """``ratio x + c h phi_1(z) m``: the DDIM step with ``m`` frozen over the step."""
        return torch.add(x * self.ratio, m, alpha=self.weight(1))
