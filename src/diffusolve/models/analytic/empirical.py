"""The empirical prior of a finite data set: the optimal denoiser over training points.

For data points ``x_1 .. x_N`` the noised density is ``p_t(x) = (1/N) sum_i N(x; alpha x_i,
sigma^2 I)``; with ``x~ = x / alpha`` and ``s = sigma / alpha``:

* denoiser ``D(x~) = sum_i r_i x_i`` with ``r = softmax_i(-||x~ - x_i||^2 / (2 s^2))``
  (computed as ``softmax_i((x~ . x_i - ||x_i||^2 / 2) / s^2)``, stable at any ``s``);
* score ``(D - x~) / (alpha s^2)``; the probability-flow ODE ends on a training point.

This is what a perfectly trained network would memorise; rows are processed in chunks so
memory stays ``O(chunk * N)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...process import Process
from ..base import Denoiser
from ._move import Movable
from .gaussian import chunked_apply
from .reference import ODEReference

__all__ = ["Empirical"]

_CHUNK_ELEMENTS = 1 << 22


class Empirical(Movable, Denoiser, ODEReference):
    """Exact prior of the uniform distribution over ``data`` (``[N, *shape]``).

    Args:
        data: ``[N, ...]`` training points (copied to float64, on their device;
            ``to(device, dtype)`` gives a moved copy).
        process: the noise process.

    Example:
        >>> import torch
        >>> from diffusolve.models import Empirical
        >>> from diffusolve.process import edm
        >>> emp = Empirical(torch.tensor([[0.0, 0.0], [2.0, 2.0]]), process=edm())
        >>> emp(torch.tensor([[1.9, 2.1]]), 0.01)  # small noise: the nearest point
        tensor([[2., 2.]])
        >>> emp(torch.tensor([[1.0, 1.0]]), 50.0)  # large noise: the mean
        tensor([[1., 1.]])
    """

    _anchor = "data"

    def __init__(self, data: Tensor, *, process: Process) -> None:
        data = torch.as_tensor(data, dtype=torch.float64)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must be [N, ...] with N >= 1; got {tuple(data.shape)}")
        self.shape = tuple(data.shape[1:])
        self.data = data.reshape(data.shape[0], -1).clone()
        self.n_points, self.dim = self.data.shape
        self._half_sq = 0.5 * (self.data * self.data).sum(1)
        self.process = process

    # ------------------------------------------------------------ helpers
    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected samples of shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}"
            )
        return self._input(x)

    def _logits(self, xt: Tensor, s2: Tensor) -> Tensor:
        """``-||x~ - x_i||^2 / (2 s^2)`` up to a per-row constant: ``[b, N]``."""
        return (xt @ self.data.T - self._half_sq) / s2

    def _apply(self, fn: Any, x: Tensor, t: Tensor | float) -> Tensor:
        """Run ``fn(x~, a, s2)`` on row chunks with per-row ``alpha`` and ``s^2``."""
        return chunked_apply(
            self.process, fn, self._flat(x), t, max(1, _CHUNK_ELEMENTS // self.n_points)
        )

    # ------------------------------------------------------------ contract
    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            return torch.softmax(self._logits(xt, s2), dim=-1) @ self.data

        return self._apply(fn, x, t).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def weights(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Posterior probabilities of the training points ``p(x_i | x_t = x)``, ``[B, N]``."""
        w = self._apply(lambda xt, a, s2: torch.softmax(self._logits(xt, s2), -1), x, t)
        return w.to(x.device)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x)``."""

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            d = torch.softmax(self._logits(xt, s2), dim=-1) @ self.data
            return (d - xt) / (a * s2)

        return self._apply(fn, x, t).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x)`` per sample, ``[B]`` (the prior's dtype, on ``x``'s device)."""

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            lse = torch.logsumexp(self._logits(xt, s2), dim=-1)
            quad = 0.5 * (xt * xt).sum(1) / s2[:, 0]
            log_norm = 0.5 * self.dim * torch.log(2 * math.pi * s2[:, 0] * a[:, 0] ** 2)
            return lse - quad - math.log(self.n_points) - log_norm

        return self._apply(fn, x, t).to(x.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact data samples: training points drawn uniformly with replacement."""
        gdev = generator.device if generator is not None else "cpu"
        idx = torch.randint(self.n_points, (n,), generator=generator, device=gdev)
        return self.data[idx.to(self.device)].reshape((n,) + self.shape)

    def posterior(self, operator: Any, y: Tensor, sigma_y: float) -> Empirical:
        """Exact posterior ``p(x0 | y)`` for ``y = A x0 + sigma_y eps`` with a linear operator
        (a dense ``[m, d]`` tensor or an object with ``matrix()``/``A``): the same points
        reweighted by their likelihoods, an :class:`Empirical` with weights
        (:class:`.posterior.WeightedEmpirical`), same process.

        Example:
            >>> import torch
            >>> from diffusolve.models import Empirical
            >>> from diffusolve.process import edm
            >>> emp = Empirical(torch.tensor([[0.0], [2.0]]), process=edm())
            >>> emp.posterior(torch.ones(1, 1), torch.tensor([2.0]), 0.1).sample(3)
            tensor([[2.],
                    [2.],
                    [2.]], dtype=torch.float64)
        """
        from .posterior import empirical_posterior

        return empirical_posterior(self, operator, y, sigma_y)

    def __repr__(self) -> str:
        return f"Empirical(N={self.n_points}, shape={self.shape}, process={self.process.name!r})"
