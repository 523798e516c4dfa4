"""Operators diagonal in the 2-D Fourier basis: their exact real SVD.

For ``A^T A = F^H diag(d_sym) F`` with ``d_sym(k) = (d(k) + d(-k)) / 2`` (``d = |h|^2`` for a
multiplier ``h``: a circular blur's transfer function or an MRI sampling mask), the
orthonormal real Fourier basis (:class:`~diffusolve.inverse.linalg.RealFourier2d`) on every
channel diagonalises ``A^T A`` with singular values ``sqrt(d_sym)``; ``U`` follows from
``A`` (see :func:`~diffusolve.inverse.base._svd_from_spectrum`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import Operator
from .linalg import RealFourier2d

__all__ = ["FourierDiagonal"]


class FourierDiagonal(Operator):
    """Base of operators ``x -> h * F x`` (per channel of ``[C, H, W]`` images).

    Subclasses call :meth:`_init_fourier` and give ``_power()``: ``|h|^2`` as ``[H, W]``.
    """

    has_svd = True
    has_pinv = True

    def _init_fourier(self, in_shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"{type(self).__name__} needs in_shape (C, H, W); got {shape}")
        self.in_shape = shape
        self.basis = RealFourier2d(shape[1], shape[2])

    def _power(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _spectrum(self):
        s = self.basis.symmetrised(self._power()).clamp_min(0).sqrt()
        c = self.in_shape[0]

        def to_coef(x: Tensor) -> Tensor:
            return self.basis.forward(x).reshape(x.shape[0], -1)

        def from_coef(coef: Tensor) -> Tensor:
            return self.basis.inverse(coef.reshape(coef.shape[0], c, -1))

        return s.repeat(c), to_coef, from_coef
