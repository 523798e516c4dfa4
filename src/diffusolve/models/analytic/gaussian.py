"""The Gaussian prior ``x0 ~ N(mean, cov)``: everything in closed form.

Under ``x_t = alpha x0 + sigma eps`` the marginal is ``N(alpha mean, alpha^2 cov + sigma^2 I)``
and, with ``cov = U diag(l) U^T``, ``x~ = x / alpha``, ``s = sigma / alpha``:

* denoiser ``D = mean + U diag(l / (l + s^2)) U^T (x~ - mean)``;
* the probability-flow ODE ``dx~/ds = (x~ - D) / s`` decouples in the eigenbasis into
  ``dy_i/ds = s y_i / (l_i + s^2)`` whose solution is
  ``y_i(s') = y_i(s) sqrt((l_i + s'^2) / (l_i + s^2))`` -- exact solver errors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...process import Process, as_time
from ..base import Denoiser
from ._move import Movable

__all__ = ["Gaussian"]


def _col(v: Tensor, n: int, like: Tensor) -> Tensor:
    """Shape a 0-d or [B] coefficient as [B, 1] (or [1, 1]) on ``like``'s device and dtype."""
    v = v.to(device=like.device, dtype=like.dtype)
    return v.reshape(-1, 1) if v.ndim else v.reshape(1, 1).expand(n, 1)


def chunked_apply(process: Process, fn: Any, xf: Tensor, t: Tensor | float, rows: int) -> Tensor:
    """Run ``fn(x~, a, s2)`` on chunks of ``rows`` rows of the flat batch ``xf`` (``[B, d]``),
    with per-row ``a = alpha(t)`` and ``s2 = (sigma / alpha)^2`` shaped ``[b, 1]``."""
    n = xf.shape[0]
    t = as_time(t)
    a = _col(process.alpha(t), n, xf)
    s = _col(process.sigma_tilde(t), n, xf)
    step = max(1, int(rows))
    if n <= step:
        return fn(xf / a, a, s**2)
    # split, not slicing: the backward of a slice fills a zero tensor of the whole batch per
    # chunk (quadratic in the batch), the backward of a split is one concatenation
    outs = [
        fn(xc / ac, ac, sc**2)
        for xc, ac, sc in zip(xf.split(step), a.split(step), s.split(step), strict=True)
    ]
    return torch.cat(outs)


class Gaussian(Movable, Denoiser):
    """Exact Gaussian prior on ``R^d`` (samples of any shape with ``prod(shape) == d``).

    Args:
        mean: ``[d]`` (the prior computes in float64 on ``mean``'s device; ``to(device,
            dtype)`` gives a moved copy).
        cov: ``[d, d]`` symmetric positive definite, or ``[d]`` for a diagonal.
        process: the noise process.
        shape: optional sample shape (default ``(d,)``).

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import edm
        >>> g = Gaussian(torch.zeros(2), torch.tensor([1.0, 4.0]), process=edm())
        >>> g(torch.tensor([[1.0, 1.0]]), 1.0)  # shrinks by l / (l + 1)
        tensor([[0.5000, 0.8000]])
    """

    _anchor = "mean"

    def __init__(
        self,
        mean: Tensor,
        cov: Tensor,
        *,
        process: Process,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        d = mean.numel()
        cov = torch.as_tensor(cov, dtype=torch.float64, device=mean.device)
        if cov.ndim == 1:
            if cov.numel() != d:
                raise ValueError(f"diagonal cov has {cov.numel()} entries, mean has {d}")
            evals, evecs = cov.clone(), torch.eye(d, dtype=torch.float64, device=mean.device)
            cov = torch.diag(cov)
        elif cov.shape == (d, d):
            if not torch.allclose(cov, cov.T, atol=1e-10):
                raise ValueError("cov must be symmetric")
            evals, evecs = torch.linalg.eigh(cov)
        else:
            raise ValueError(f"cov must be [d] or [d, d] with d={d}; got {tuple(cov.shape)}")
        if not torch.all(evals > 0):
            raise ValueError("cov must be positive definite (all eigenvalues > 0)")
        self.mean, self.cov, self.evals, self.evecs = mean, cov, evals, evecs
        self.process = process
        self.dim = d
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not have {d} elements")

    # ------------------------------------------------------------ helpers
    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected samples of shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}"
            )
        return self._input(x)

    def _st(self, t: Tensor, n: int) -> tuple[Tensor, Tensor]:
        t, m = as_time(t), self.mean
        return _col(self.process.alpha(t), n, m), _col(self.process.sigma_tilde(t), n, m)

    # ------------------------------------------------------------ contract
    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        xf = self._flat(x)
        a, s = self._st(t, xf.shape[0])
        y = (xf / a - self.mean) @ self.evecs
        d = self.mean + (y * (self.evals / (self.evals + s * s))) @ self.evecs.T
        return d.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x)``."""
        xf = self._flat(x)
        t = as_time(t)
        a, sig = (
            _col(self.process.alpha(t), xf.shape[0], xf),
            _col(self.process.sigma(t), xf.shape[0], xf),
        )
        y = (xf - a * self.mean) @ self.evecs
        g = -(y / (a * a * self.evals + sig * sig)) @ self.evecs.T
        return g.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x)`` per sample, ``[B]`` (the prior's dtype, on ``x``'s device)."""
        xf = self._flat(x)
        t = as_time(t)
        a, sig = (
            _col(self.process.alpha(t), xf.shape[0], xf),
            _col(self.process.sigma(t), xf.shape[0], xf),
        )
        var = a * a * self.evals + sig * sig
        y = (xf - a * self.mean) @ self.evecs
        out = -0.5 * (
            (y * y / var).sum(1) + torch.log(var).sum(1) + self.dim * math.log(2 * math.pi)
        )
        return out.to(x.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact data samples (in the prior's dtype, on its device; drawn in float64
        on the generator's device)."""
        gdev = generator.device if generator is not None else "cpu"
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gdev)
        z = z.to(device=self.device, dtype=self.dtype)
        x = self.mean + (z * self.evals.sqrt()) @ self.evecs.T
        return x.reshape((n,) + self.shape)

    def ode_solution(self, x: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
        """The exact probability-flow ODE map from ``(x, t)`` to time ``t_next`` (either direction)."""
        xf = self._flat(x)
        a, s = self._st(as_time(t), xf.shape[0])
        a1, s1 = self._st(as_time(t_next), xf.shape[0])
        y = (xf / a - self.mean) @ self.evecs
        y1 = y * torch.sqrt((self.evals + s1 * s1) / (self.evals + s * s))
        out = a1 * (self.mean + y1 @ self.evecs.T)
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def reference(
        self, x: Tensor, t: Tensor | float, t_end: Tensor | float, final: str = "denoise"
    ) -> Tensor:
        """Exact result of :func:`diffusolve.sample` from ``(x, t)`` to ``t_end`` with ``final``."""
        xe = self.ode_solution(x, t, t_end)
        return self(xe, t_end) if final == "denoise" else xe

    def posterior(self, operator: Any, y: Tensor, sigma_y: float) -> Gaussian:
        """Exact posterior ``p(x0 | y)`` for ``y = A x0 + sigma_y eps`` with a linear operator
        (a dense ``[m, d]`` tensor or an object with ``matrix()``/``A``): a :class:`Gaussian`
        with the same process and shape (:func:`.posterior.gaussian_posterior`).

        Example:
            >>> import torch
            >>> from diffusolve.models import Gaussian
            >>> from diffusolve.process import edm
            >>> prior = Gaussian(torch.zeros(1), torch.ones(1), process=edm())
            >>> post = prior.posterior(torch.ones(1, 1), torch.tensor([2.0]), 1.0)
            >>> round(post.mean.item(), 12), round(post.cov.item(), 12)
            (1.0, 0.5)
        """
        from .posterior import gaussian_posterior

        return gaussian_posterior(self, operator, y, sigma_y)
