"""Dense matrix operators: any ``[m, n]`` matrix on flattened inputs, and compressed sensing
with a random Gaussian matrix. The SVD is ``torch.linalg.svd`` of the matrix (dense: for
small inputs)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Operator, register

__all__ = ["MatrixOperator", "CompressedSensing"]


@register("matrix")
class MatrixOperator(Operator):
    """``y = M x.flatten()`` for a dense ``[m, n]`` matrix ``M`` (``n = prod(in_shape)``).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import MatrixOperator
        >>> op = MatrixOperator(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), (2, 2))
        >>> op(torch.ones(3, 2, 2)).tolist(), op.svd().rank
        ([[2.0], [2.0], [2.0]], 1)
    """

    has_svd = True
    has_pinv = True

    def __init__(self, matrix: Tensor, in_shape: Sequence[int] | None = None) -> None:
        m = torch.as_tensor(matrix, dtype=torch.float64)
        if m.ndim != 2:
            raise ValueError(f"matrix must be 2-D; got shape {tuple(m.shape)}")
        shape = tuple(int(s) for s in in_shape) if in_shape is not None else (m.shape[1],)
        if math.prod(shape) != m.shape[1]:
            raise ValueError(f"in_shape {shape} does not have {m.shape[1]} elements")
        self.weight = m.contiguous()
        self.in_shape, self.out_shape = shape, (m.shape[0],)

    def _A(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ self._buf(self.weight, x).T

    def _At(self, y: Tensor) -> Tensor:
        return (y @ self._buf(self.weight, y)).reshape(y.shape[0], *self.in_shape)

    def matrix(self, *, max_dim: int = 1 << 14) -> Tensor:
        return self.weight.clone()

    def _spectrum(self):
        _, s, vh = torch.linalg.svd(self.weight, full_matrices=True)
        full = torch.zeros(self.dim_in, dtype=torch.float64)
        full[: s.numel()] = s

        def to_coef(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1) @ self._buf(vh, x).T

        def from_coef(c: Tensor) -> Tensor:
            return (c @ self._buf(vh, c)).reshape(c.shape[0], *self.in_shape)

        return full, to_coef, from_coef

    @classmethod
    def example(cls) -> MatrixOperator:
        g = torch.Generator().manual_seed(4)
        m = torch.randn(7, 3, generator=g, dtype=torch.float64)
        m[:, 2] = m[:, 0] - m[:, 1]  # rank deficient, tall
        return cls(m, (3,))


@register("compressed_sensing")
class CompressedSensing(MatrixOperator):
    """Compressed sensing: ``m`` random Gaussian measurements ``y = M x``, entries of ``M``
    i.i.d. ``N(0, 1/m)`` (so ``E ||M x||^2 = ||x||^2``), reproducible from ``seed``.

    Args:
        in_shape: per-sample input shape.
        m: number of measurements, or ``ratio`` (a fraction of ``prod(in_shape)``).

    Example:
        >>> from diffusolve.inverse import CompressedSensing
        >>> CompressedSensing((1, 8, 8), ratio=0.25).out_shape
        (16,)
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        m: int | None = None,
        *,
        ratio: float | None = None,
        seed: int = 0,
    ) -> None:
        shape = tuple(int(s) for s in in_shape)
        n = math.prod(shape)
        if (m is None) == (ratio is None):
            raise ValueError("give exactly one of m and ratio")
        m = int(m) if m is not None else max(1, round(float(ratio) * n))
        if m < 1:
            raise ValueError(f"need at least one measurement; got m={m}")
        g = torch.Generator().manual_seed(int(seed))
        weight = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(m)
        super().__init__(weight, shape)
        self.seed = int(seed)

    @classmethod
    def example(cls) -> CompressedSensing:
        return cls((2, 3, 3), ratio=0.5, seed=1)
