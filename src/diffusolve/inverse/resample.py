"""Separable linear maps of images, ``Y_c = D_h X_c D_w^T``, and super-resolution.

A separable map is the Kronecker product ``D_h (x) D_w``, so its SVD is the Kronecker
product of the two small 1-D SVDs: ``V^T x = V_h^T X V_w`` with singular values
``s_h[i] s_w[j]``. Both down-sampling kernels of super-resolution are separable: block
averaging (average pooling) and bicubic (Keys 1981, ``a = -0.5``, widened by the factor
for anti-aliasing as in MATLAB's ``imresize``, reflected at the borders, rows summing to 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Operator, register

__all__ = ["Separable", "SuperResolution", "avgpool_matrix", "bicubic_matrix"]


def avgpool_matrix(n: int, factor: int) -> Tensor:
    """``[n // factor, n]`` 1-D block-averaging matrix.

    Example:
        >>> from diffusolve.inverse import avgpool_matrix
        >>> avgpool_matrix(4, 2)
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.5000, 0.5000]], dtype=torch.float64)
    """
    if factor < 1 or n % factor:
        raise ValueError(f"size {n} is not a multiple of the factor {factor}")
    m = n // factor
    d = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        d[i, i * factor : (i + 1) * factor] = 1.0 / factor
    return d


def _cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (Keys 1981, IEEE TASSP 29(6))."""
    t = np.abs(t)
    return np.where(
        t <= 1,
        (a + 2) * t**3 - (a + 3) * t**2 + 1,
        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0),
    )


def _reflect(j: int, n: int) -> int:
    """Symmetric (half-sample) reflection of index ``j`` into ``[0, n)``."""
    period = 2 * n
    j %= period
    return j if j < n else period - 1 - j


def bicubic_matrix(n: int, factor: int) -> Tensor:
    """``[n // factor, n]`` 1-D anti-aliased bicubic down-sampling matrix.

    Output sample ``i`` sits at input coordinate ``c = (i + 0.5) f - 0.5``; the weight of
    input ``j`` is ``cubic((j - c) / f)`` (support ``|j - c| < 2 f``), indices reflected at
    the borders, each row normalised to sum to 1.

    Example:
        >>> from diffusolve.inverse import bicubic_matrix
        >>> d = bicubic_matrix(8, 2)
        >>> tuple(d.shape), bool(torch.allclose(d.sum(1), torch.ones(4, dtype=d.dtype)))
        ((4, 8), True)
    """
    if factor < 1 or n % factor:
        raise ValueError(f"size {n} is not a multiple of the factor {factor}")
    m = n // factor
    d = np.zeros((m, n))
    for i in range(m):
        c = (i + 0.5) * factor - 0.5
        js = np.arange(math.floor(c - 2 * factor), math.ceil(c + 2 * factor) + 1)
        w = _cubic((js - c) / factor)
        for j, wj in zip(js, w, strict=True):
            d[i, _reflect(int(j), n)] += wj
        d[i] /= d[i].sum()
    return torch.from_numpy(d)


@register("separable")
class Separable(Operator):
    """``Y_c = D_h X_c D_w^T`` on every channel of ``[C, H, W]`` images, with an exact
    Kronecker SVD.

    Args:
        dh: ``[m_h, H]``; dw: ``[m_w, W]``; in_shape: ``(C, H, W)``.

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Separable
        >>> op = Separable(torch.eye(3)[:2], torch.eye(4), (1, 3, 4))  # drop the last row
        >>> op.out_shape
        (1, 2, 4)
    """

    has_svd = True
    has_pinv = True

    def __init__(self, dh: Tensor, dw: Tensor, in_shape: Sequence[int]) -> None:
        dh = torch.as_tensor(dh, dtype=torch.float64)
        dw = torch.as_tensor(dw, dtype=torch.float64)
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3 or dh.ndim != 2 or dw.ndim != 2:
            raise ValueError("Separable needs in_shape (C, H, W) and 2-D matrices dh, dw")
        if dh.shape[1] != shape[1] or dw.shape[1] != shape[2]:
            raise ValueError(
                f"dh must have {shape[1]} columns and dw {shape[2]}; got {tuple(dh.shape)}, "
                f"{tuple(dw.shape)}"
            )
        self.dh, self.dw = dh, dw
        self.in_shape = shape
        self.out_shape = (shape[0], dh.shape[0], dw.shape[0])

    def _A(self, x: Tensor) -> Tensor:
        return self._buf(self.dh, x) @ x @ self._buf(self.dw, x).T

    def _At(self, y: Tensor) -> Tensor:
        return self._buf(self.dh, y).T @ y @ self._buf(self.dw, y)

    def _spectrum(self):
        def right(d: Tensor) -> tuple[Tensor, Tensor]:
            _, s, vh = torch.linalg.svd(d, full_matrices=True)
            full = torch.zeros(d.shape[1], dtype=torch.float64)
            full[: s.numel()] = s
            return full, vh.T.contiguous()

        sh, vh = right(self.dh)
        sw, vw = right(self.dw)
        s = (sh[:, None] * sw[None, :]).flatten().repeat(self.in_shape[0])

        def to_coef(x: Tensor) -> Tensor:
            return (self._buf(vh, x).T @ x @ self._buf(vw, x)).reshape(x.shape[0], -1)

        def from_coef(c: Tensor) -> Tensor:
            c = c.reshape(c.shape[0], *self.in_shape)
            return self._buf(vh, c) @ c @ self._buf(vw, c).T

        return s, to_coef, from_coef

    @classmethod
    def example(cls) -> Separable:
        g = torch.Generator().manual_seed(3)
        dh = torch.randn(3, 5, generator=g, dtype=torch.float64)
        dw = torch.randn(4, 4, generator=g, dtype=torch.float64)
        return cls(dh, dw, (2, 5, 4))


@register("super_resolution")
class SuperResolution(Separable):
    """Super-resolution: down-sampling by an integer ``factor`` with ``kernel="avg"``
    (block averaging) or ``"bicubic"`` (see the module docstring); exact SVD either way.

    Example:
        >>> import torch
        >>> from diffusolve.inverse import SuperResolution
        >>> op = SuperResolution((1, 4, 4), 2)
        >>> op(torch.arange(16.0).reshape(1, 1, 4, 4)).squeeze()
        tensor([[ 2.5000,  4.5000],
                [10.5000, 12.5000]])
        >>> sorted({round(v, 12) for v in op.svd().s.tolist()})  # each output sees 4 pixels
        [0.5]
    """

    def __init__(self, in_shape: Sequence[int], factor: int, kernel: str = "avg") -> None:
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3:
            raise ValueError(f"SuperResolution needs in_shape (C, H, W); got {shape}")
        builders = {"avg": avgpool_matrix, "bicubic": bicubic_matrix}
        if kernel not in builders:
            raise ValueError(f"kernel must be one of {sorted(builders)}; got {kernel!r}")
        self.factor, self.kernel = int(factor), kernel
        make = builders[kernel]
        super().__init__(make(shape[1], self.factor), make(shape[2], self.factor), shape)

    def describe(self) -> str:
        return f"SuperResolution(x{self.factor} {self.kernel}, {self.in_shape} -> {self.out_shape})"

    @classmethod
    def example(cls) -> SuperResolution:
        return cls((2, 4, 6), 2)
