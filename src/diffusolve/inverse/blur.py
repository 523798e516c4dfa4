"""Blur: circular convolution by FFT with Gaussian or motion kernels; exact SVD in the real
Fourier basis (singular values ``|K(k)|``, the modulus of the transfer function)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import register
from .fourier import FourierDiagonal

__all__ = ["Blur", "gaussian_kernel", "motion_kernel"]


def gaussian_kernel(std: float, size: int | None = None) -> Tensor:
    """Normalised isotropic Gaussian kernel ``[size, size]`` (default size
    ``2 ceil(3 std) + 1``).

    Example:
        >>> from diffusolve.inverse import gaussian_kernel
        >>> k = gaussian_kernel(1.0)
        >>> tuple(k.shape), round(float(k.sum()), 12)
        ((7, 7), 1.0)
    """
    if std <= 0:
        raise ValueError(f"std must be positive; got {std}")
    size = int(size) if size is not None else 2 * math.ceil(3 * std) + 1
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / std) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def motion_kernel(length: float, angle: float, size: int | None = None) -> Tensor:
    """Normalised linear motion-blur kernel: a segment of ``length`` pixels at ``angle``
    degrees (counter-clockwise from the horizontal) centred on the kernel centre, rendered
    by bilinear splatting of 16 evenly spaced points per pixel of length (default size
    ``2 ceil(length / 2) + 1``).

    Example:
        >>> from diffusolve.inverse import motion_kernel
        >>> k = motion_kernel(4, 0.0)  # horizontal: the middle row
        >>> tuple(k.shape), [round(v, 3) for v in k[2].tolist()]
        ((5, 5), [0.125, 0.25, 0.25, 0.25, 0.125])
    """
    if length <= 0:
        raise ValueError(f"length must be positive; got {length}")
    size = int(size) if size is not None else 2 * math.ceil(length / 2) + 1
    c = (size - 1) / 2
    n = max(2, math.ceil(16 * length))
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5) * length
    a = math.radians(angle)
    px, py = c + t * math.cos(a), c - t * math.sin(a)
    k = torch.zeros(size, size, dtype=torch.float64)
    x0, y0 = px.floor(), py.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            w = (1 - (px - x0 - dx).abs()) * (1 - (py - y0 - dy).abs())
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            k.index_put_((yi[ok], xi[ok]), w[ok], accumulate=True)
    return k / k.sum()


@register("blur")
class Blur(FourierDiagonal):
    """Circular convolution of every channel with ``kernel`` (centred at ``size // 2``).

    ``A x = F^H (K . F x)`` with ``K`` the DFT of the zero-padded, centred kernel; the
    adjoint uses ``conj(K)`` (correlation).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Blur, gaussian_kernel
        >>> op = Blur(gaussian_kernel(1.0, size=3), (1, 8, 8))
        >>> x = torch.zeros(1, 1, 8, 8); x[0, 0, 0, 0] = 1
        >>> round(float(op(x).sum()), 6), round(float(op.svd().s.max()), 6)  # mass kept
        (1.0, 1.0)
    """

    def __init__(self, kernel: Tensor, in_shape: Sequence[int]) -> None:
        self._init_fourier(in_shape)
        self.out_shape = self.in_shape
        k = torch.as_tensor(kernel, dtype=torch.float64)
        h, w = self.in_shape[1:]
        if k.ndim != 2 or k.shape[0] > h or k.shape[1] > w:
            raise ValueError(f"kernel must be 2-D and fit in {h}x{w}; got {tuple(k.shape)}")
        self.kernel = k
        pad = torch.zeros(h, w, dtype=torch.float64)
        pad[: k.shape[0], : k.shape[1]] = k
        pad = torch.roll(pad, (-(k.shape[0] // 2), -(k.shape[1] // 2)), (0, 1))
        self.transfer = torch.fft.fft2(pad)

    def _A(self, x: Tensor) -> Tensor:
        k = self._buf(self.transfer, x, complex=True)
        return torch.fft.ifft2(k * torch.fft.fft2(x)).real

    def _At(self, y: Tensor) -> Tensor:
        k = self._buf(self.transfer, y, complex=True)
        return torch.fft.ifft2(k.conj() * torch.fft.fft2(y)).real

    def _power(self) -> Tensor:
        return self.transfer.abs() ** 2

    @classmethod
    def example(cls) -> Blur:
        return cls(gaussian_kernel(0.8, size=3), (2, 5, 6))

    @classmethod
    def examples(cls) -> list[Blur]:
        return [cls.example(), cls(motion_kernel(3.0, 30.0), (1, 6, 6))]
