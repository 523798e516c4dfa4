"""Parallel-beam computed tomography of small images: a Radon transform stored as a sparse
matrix of line integrals, with its exact transpose as the adjoint.

Pixel-driven interpolation (the discretisation of e.g. Kak & Slaney, *Principles of
Computerized Tomographic Imaging*, 1988, ch. 3 and 7): for each angle ``theta`` the centre
``(u, v)`` of every pixel (unit pixels, origin at the image centre, ``v`` upwards) projects
to the detector coordinate ``t = u cos(theta) + v sin(theta)``, and the pixel's value is
split linearly between the two nearest unit-width detector bins. Each pixel thus spreads a
total weight of 1 per angle (its area over the bin width), and ``A^T`` is the transposed
sparse matrix, so adjointness holds to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Operator, register

__all__ = ["CT", "radon_matrix"]


def radon_matrix(size: int, angles: Tensor, n_det: int) -> Tensor:
    """Sparse COO float64 matrix ``[len(angles) * n_det, size * size]`` of the pixel-driven
    parallel-beam projector (rows: angle-major, then detector bin; columns: C-order pixels).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import radon_matrix
        >>> r = radon_matrix(4, torch.tensor([0.0, 1.0]), 7)
        >>> r.to_dense().sum(0).tolist() == [2.0] * 16  # a weight of 1 per pixel per angle
        True
    """
    n = int(size)
    th = np.asarray(torch.as_tensor(angles, dtype=torch.float64).reshape(-1))
    c = (n - 1) / 2.0
    col, row = np.meshgrid(np.arange(n), np.arange(n))
    u, v = (col - c).ravel(), (c - row).ravel()
    pix = np.arange(n * n)
    rows, cols, vals = [], [], []
    for a, theta in enumerate(th):
        pos = u * math.cos(theta) + v * math.sin(theta) + (n_det - 1) / 2.0
        i0 = np.floor(pos).astype(np.int64)
        w1 = pos - i0
        for idx, w in ((i0, 1.0 - w1), (i0 + 1, w1)):
            ok = (idx >= 0) & (idx < n_det) & (w > 0)
            rows.append(a * n_det + idx[ok])
            cols.append(pix[ok])
            vals.append(w[ok])
    ind = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    return torch.sparse_coo_tensor(
        ind,
        torch.from_numpy(np.concatenate(vals)),
        (len(th) * n_det, n * n),
        check_invariants=True,
    ).coalesce()


@register("ct")
class CT(Operator):
    """Parallel-beam CT of square images ``[C, N, N]``: sinograms ``[C, n_angles, n_det]``.

    Args:
        in_shape: ``(C, N, N)``.
        n_angles: equispaced angles in ``[0, pi)`` (or give ``angles`` in radians).
        n_det: detector bins (default ``ceil(sqrt(2) N) + 1``: every pixel is seen).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import CT
        >>> op = CT((1, 8, 8), n_angles=10)
        >>> op.out_shape, op.has_svd
        ((1, 10, 13), False)
        >>> x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
        >>> float(op(x)[0, 0, 0].sum())  # each projection carries the total mass
        64.0
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        n_angles: int = 30,
        *,
        angles: Tensor | None = None,
        n_det: int | None = None,
    ) -> None:
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"CT needs square images (C, N, N); got in_shape {shape}")
        n = shape[1]
        if angles is None:
            angles = torch.arange(int(n_angles), dtype=torch.float64) * (math.pi / int(n_angles))
        self.angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
        self.n_det = int(n_det) if n_det is not None else math.ceil(math.sqrt(2) * n) + 1
        self.in_shape = shape
        self.out_shape = (shape[0], self.angles.numel(), self.n_det)
        self.weight = radon_matrix(n, self.angles, self.n_det)
        self.weight_t = self.weight.t().coalesce()

    def _apply(self, m: Tensor, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        b = x.shape[0]
        flat = x.reshape(b * shape[0], -1).T
        out = torch.sparse.mm(self._buf(m, x), flat.contiguous())
        return out.T.reshape(b, *shape)

    def _A(self, x: Tensor) -> Tensor:
        return self._apply(self.weight, x, self.out_shape)

    def _At(self, y: Tensor) -> Tensor:
        return self._apply(self.weight_t, y, self.in_shape)

    def matrix(self, *, max_dim: int = 1 << 14) -> Tensor:
        if self.dim_in > max_dim:
            return super().matrix(max_dim=max_dim)  # raises with the message
        return torch.block_diag(*[self.weight.to_dense()] * self.in_shape[0])

    @classmethod
    def example(cls) -> CT:
        return cls((1, 5, 5), n_angles=4)
