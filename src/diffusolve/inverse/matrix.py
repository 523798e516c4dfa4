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

    #: inputs of at least this many elements, with at most a quarter of them reached by
    #: ``M``'s row space, get an implicit null-space basis (see :meth:`_spectrum`)
    implicit_basis_min_dim = 256

    def _spectrum(self):
        """The right singular vectors of ``M`` completed to an orthogonal basis of the input.

        A small input gets the dense ``[n, n]`` basis of the full SVD. A wide matrix on a
        large input (``n >= implicit_basis_min_dim`` and ``4 k <= n`` for ``k = min(m, n)``
        singular vectors) gets the same first ``k`` vectors completed by an implicit basis:
        ``Q = I - W T W^T``, the product of ``k`` Householder reflections whose first ``k``
        columns are those vectors (up to sign, which is undone). Applying it costs
        ``O(n k)`` per sample instead of ``O(n^2)`` (d = 800 with one measurement: two
        ``[n, 1]`` products instead of an ``[800, 800]`` one). The null-space part of the
        basis differs from the dense one, which is immaterial to every user of the SVD (its
        singular values are all zero).
        """
        n = self.dim_in
        k = min(self.weight.shape)
        implicit = n >= self.implicit_basis_min_dim and 4 * k <= n
        _, s, vh = torch.linalg.svd(self.weight, full_matrices=not implicit)
        full = torch.zeros(n, dtype=torch.float64)
        full[: s.numel()] = s
        if implicit:
            return (full, *_householder_basis(vh[:k].T, self._buf, self.in_shape))

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

    @classmethod
    def examples(cls) -> list[Operator]:
        """The tall rank-deficient example, and a wide one whose SVD takes the implicit
        null-space basis (its threshold lowered so that the example stays small)."""
        g = torch.Generator().manual_seed(5)
        wide = cls(torch.randn(2, 9, generator=g, dtype=torch.float64), (3, 3))
        wide.implicit_basis_min_dim = 8
        return [cls.example(), wide]


def _householder_basis(vk: Tensor, buf, in_shape: tuple[int, ...]):
    """``(to_coef, from_coef)`` for the orthogonal ``Q = I - W T W^T`` (compact WY form of
    ``k`` Householder reflections) whose first ``k`` columns are the orthonormal columns of
    ``vk`` ``[n, k]``: ``to_coef(x) = x Q`` and ``from_coef(c) = c Q^T`` on rows, with the
    signs of the first ``k`` coefficients fixed so that coefficient ``i`` is ``vk[:, i] . x``.
    """
    n, k = vk.shape
    refl, tau = torch.geqrf(vk)
    # vk = Q R with R upper triangular and orthogonal, so diagonal with entries +-1
    sign = torch.sign(torch.diagonal(refl)).clone()
    sign[sign == 0] = 1.0
    w = torch.tril(refl, -1)
    w[torch.arange(k), torch.arange(k)] = 1.0
    t = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):  # the forward recurrence of the compact WY form
        t[i, i] = tau[i]
        if i:
            t[:i, i] = -tau[i] * (t[:i, :i] @ (w[:, :i].T @ w[:, i]))
    wt = w.contiguous()
    wtt = (w @ t.T).contiguous()  # [n, k]: W T^T
    swtt = wtt.clone()
    swtt[:k] *= sign[:, None]  # S W T^T, S = diag(sign, 1, ..., 1)
    sign_m1 = sign - 1.0

    def to_coef(x: Tensor) -> Tensor:  # x Q S = (x - (x W) T W^T) S
        x2 = x.reshape(x.shape[0], -1)
        c = x2 - (x2 @ buf(wt, x)) @ buf(wtt, x).T
        c[:, :k] *= buf(sign, x)  # a fresh tensor: in place is safe under autograd
        return c

    def from_coef(c: Tensor) -> Tensor:  # c S Q^T = c S - (c S W T^T) W^T
        x = c - (c @ buf(swtt, c)) @ buf(wt, c).T
        x[:, :k] += c[:, :k] * buf(sign_m1, c)
        return x.reshape(c.shape[0], *in_shape)

    return to_coef, from_coef


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

    @classmethod
    def examples(cls) -> list[Operator]:
        return [cls.example()]
