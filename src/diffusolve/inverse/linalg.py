"""Small linear-algebra parts shared by the operators: per-sample conjugate gradients and an
orthonormal real Fourier basis.

The real Fourier basis is what makes circular blur and single-coil MRI have an exact real
SVD: for a real image ``x`` with orthonormal 2-D DFT ``X = F x`` (``X(-k) = conj X(k)``), the
coordinates ``X(k)`` for self-conjugate ``k`` and ``sqrt(2) Re X(k)``, ``sqrt(2) Im X(k)`` for
one ``k`` of each pair ``{k, -k}`` are an orthonormal real basis, and every real operator
``A^T A = F^H diag(D) F`` with ``D(k) = D(-k)`` is diagonal in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["per_sample", "batched_cg", "RealFourier2d"]


def per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A float, 0-d or ``[B]`` value as ``[B, 1, ..., 1]`` in the real dtype/device of ``like``.

    Example:
        >>> import torch
        >>> per_sample(torch.tensor([1.0, 2.0]), torch.zeros(2, 3, 4)).shape
        torch.Size([2, 1, 1])
    """
    dtype = like.real.dtype if like.is_complex() else like.dtype
    v = torch.as_tensor(value, dtype=dtype, device=like.device)
    b = like.shape[0]
    if v.ndim == 0:
        v = v.expand(b)
    if v.shape != (b,):
        raise ValueError(f"expected a float or one value per sample ([{b}]); got {tuple(v.shape)}")
    return v.reshape((b,) + (1,) * (like.ndim - 1))


def batched_cg(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 500,
) -> Tensor:
    """Conjugate gradients for ``M x = b`` with ``M`` symmetric positive (semi-)definite and
    block diagonal over the batch (``apply`` acts on each sample separately).

    Inner products and step sizes are per sample, and a sample stops (its iterate is frozen)
    once its residual is below ``tol * ||b||`` (default ``1e-10`` in float64, ``1e-5``
    otherwise): a batch never changes one sample's result.

    Example:
        >>> import torch
        >>> d = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
        >>> b = torch.ones(1, 3, dtype=torch.float64)
        >>> batched_cg(lambda v: d * v, b, torch.zeros_like(b))
        tensor([[1.0000, 0.5000, 0.2500]], dtype=torch.float64)
    """
    if tol is None:
        tol = 1e-10 if b.dtype == torch.float64 else 1e-5
    dims = tuple(range(1, b.ndim))
    shape = (b.shape[0],) + (1,) * (b.ndim - 1)

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum(dims)

    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = dot(r, r)
    stop = tol * tol * dot(b, b)
    for _ in range(max_iter):
        active = rs > stop
        if not bool(active.any()):
            break
        ap = apply(p)
        pap = dot(p, ap)
        ok = active & (pap > 0)
        alpha = torch.where(ok, rs / torch.where(ok, pap, torch.ones_like(pap)), 0.0)
        x = x + alpha.reshape(shape) * p
        r = r - alpha.reshape(shape) * ap
        rs_new = dot(r, r)
        beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)), 0.0)
        p = torch.where(ok.reshape(shape), r + beta.reshape(shape) * p, p)
        rs = torch.where(ok, rs_new, torch.zeros_like(rs))
    return x


class RealFourier2d:
    """Orthonormal real Fourier basis of real ``H x W`` images (over the last two dims).

    ``forward(x)`` gives ``[..., H*W]`` coefficients: the self-conjugate frequencies first,
    then ``sqrt(2) Re X(k)`` and ``sqrt(2) Im X(k)`` for the representative ``k`` of each pair;
    ``freq`` holds the flat frequency index of every coefficient and ``neg_freq`` that of its
    conjugate. ``inverse`` is the transpose (and inverse).

    Example:
        >>> import torch
        >>> rf = RealFourier2d(3, 4)
        >>> x = torch.randn(2, 3, 4, dtype=torch.float64)
        >>> c = rf.forward(x)
        >>> torch.allclose(rf.inverse(c), x), torch.allclose(c.norm(), x.norm())
        (True, True)
    """

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = int(h), int(w)
        k1 = torch.arange(self.h)[:, None]
        k2 = torch.arange(self.w)[None, :]
        flat = (k1 * self.w + k2).flatten()
        neg = (((-k1) % self.h) * self.w + (-k2) % self.w).flatten()
        self.self_idx = flat[flat == neg]
        self.rep_idx = flat[flat < neg]
        self.neg_rep_idx = neg[flat < neg]
        self.freq = torch.cat([self.self_idx, self.rep_idx, self.rep_idx])
        self.neg_freq = neg[self.freq]
        self._dev: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _idx(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._dev:
            self._dev[device] = tuple(  # type: ignore[assignment]
                t.to(device) for t in (self.self_idx, self.rep_idx, self.neg_rep_idx)
            )
        return self._dev[device]

    def symmetrised(self, d: Tensor) -> Tensor:
        """Per coefficient ``(d(k) + d(-k)) / 2`` for a per-frequency ``d`` (``[H*W]``)."""
        d = d.flatten()
        return 0.5 * (d[self.freq] + d[self.neg_freq])

    def forward(self, x: Tensor) -> Tensor:
        si, ri, _ = self._idx(x.device)
        big = torch.fft.fft2(x, norm="ortho").flatten(-2)
        rep = big[..., ri] * math.sqrt(2.0)
        return torch.cat([big[..., si].real, rep.real, rep.imag], -1)

    def inverse(self, c: Tensor) -> Tensor:
        si, ri, ni = self._idx(c.device)
        ns, nr = si.numel(), ri.numel()
        cdtype = torch.complex128 if c.dtype == torch.float64 else torch.complex64
        z = torch.complex(c[..., ns : ns + nr], c[..., ns + nr :]) / math.sqrt(2.0)
        big = torch.zeros(c.shape[:-1] + (self.h * self.w,), dtype=cdtype, device=c.device)
        big = big.index_copy(-1, si, c[..., :ns].to(cdtype))
        big = big.index_copy(-1, ri, z).index_copy(-1, ni, z.conj())
        return torch.fft.ifft2(big.unflatten(-1, (self.h, self.w)), norm="ortho").real
