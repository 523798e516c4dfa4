"""The Gaussian mixture prior ``x0 ~ sum_k w_k N(mu_k, C_k)``: exact at every noise level.

Under ``x_t = alpha x0 + sigma eps``, with ``x~ = x / alpha``, ``s = sigma / alpha`` and
``C_k = U_k diag(l_k) U_k^T``, each component noises to ``N(mu_k, C_k + s^2 I)`` in ``x~``:

* responsibilities ``r_k(x~) = softmax_k(log w_k + log N(x~; mu_k, C_k + s^2 I))``
  (log-sum-exp, so they stay exact however far apart the components are);
* denoiser ``D = sum_k r_k (mu_k + U_k diag(l_k / (l_k + s^2)) U_k^T (x~ - mu_k))``;
* score ``grad log p_t(x) = -(1/alpha) sum_k r_k U_k diag(1 / (l_k + s^2)) U_k^T (x~ - mu_k)``;
* the probability-flow ODE has no closed form: :meth:`GaussianMixture.ode_solve` solves it
  to tight tolerance in float64 (:func:`~diffusolve.models.analytic.reference.pf_ode_solve`).

All ``K`` components are evaluated at once: ``x~ @ [U_1 ... U_K]`` is one matrix product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...process import Process, as_time
from ..base import Denoiser
from .gaussian import _col
from .reference import ODEReference

__all__ = ["GaussianMixture"]

_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of ~4M float64 [b, K, d] entries


class GaussianMixture(Denoiser, ODEReference):
    """Exact Gaussian-mixture prior on ``R^d`` (samples of any shape with ``prod(shape) == d``).

    Args:
        weights: ``[K]`` positive mixture weights (normalised here).
        means: ``[K, d]``.
        covs: ``[K, d, d]`` full symmetric positive definite, ``[K, d]`` diagonal or ``[K]``
            isotropic variances.
        process: the noise process.
        shape: optional sample shape (default ``(d,)``).

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import edm
        >>> gmm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0], [1.0]]),
        ...                       torch.tensor([0.01, 0.01]), process=edm())
        >>> gmm(torch.tensor([[0.9]]), 0.002)  # tiny noise: almost the identity
        tensor([[0.9000]])
        >>> gmm(torch.tensor([[0.0]]), 80.0)  # huge noise: the data mean
        tensor([[0.]])
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covs: Tensor,
        *,
        process: Process,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        k = w.numel()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] != k:
            raise ValueError(f"means must be [K, d] with K={k} (from weights); got {tuple(means.shape)}")
        if not torch.all(w > 0):
            raise ValueError("mixture weights must be positive")
        d = means.shape[1]
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape == (k,):
            evals, evecs = covs[:, None].expand(k, d).clone(), None
        elif covs.shape == (k, d):
            evals, evecs = covs.clone(), None
        elif covs.shape == (k, d, d):
            if not torch.allclose(covs, covs.transpose(1, 2), atol=1e-10):
                raise ValueError("covs must be symmetric")
            evals, evecs = torch.linalg.eigh(covs)
        else:
            raise ValueError(
                f"covs must be [K, d, d], [K, d] or [K] with K={k}, d={d}; got {tuple(covs.shape)}"
            )
        if not torch.all(evals > 0):
            raise ValueError("every covariance must be positive definite (all eigenvalues > 0)")
        self.weights = w / w.sum()
        self.log_weights = torch.log(self.weights)
        self.means, self.evals, self.evecs = means, evals, evecs
        self.n_components, self.dim = k, d
        self.process = process
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not have {d} elements")
        if evecs is not None:
            # x~ @ u_all gives every x~ @ U_k side by side: [B, K * d]
            self._u_all = evecs.permute(1, 0, 2).reshape(d, k * d).contiguous()
            self._mu_rot = torch.einsum("kd,kde->ke", means, evecs)

    @property
    def covs(self) -> Tensor:
        """``[K, d, d]`` covariances."""
        if self.evecs is None:
            return torch.diag_embed(self.evals)
        return (self.evecs * self.evals[:, None, :]) @ self.evecs.transpose(1, 2)

    # ------------------------------------------------------------ helpers
    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected samples of shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def _rotate(self, xt: Tensor) -> Tensor:
        """``y_k = U_k^T (x~ - mu_k)`` for every component: ``[b, K, d]``."""
        if self.evecs is None:
            return xt[:, None, :] - self.means
        b = xt.shape[0]
        return (xt @ self._u_all).reshape(b, self.n_components, self.dim) - self._mu_rot

    def _unrotate(self, z: Tensor) -> Tensor:
        """``sum_k U_k z_k`` for ``z`` ``[b, K, d]``: ``[b, d]``."""
        if self.evecs is None:
            return z.sum(1)
        return z.reshape(z.shape[0], -1) @ self._u_all.T

    def _parts(self, xt: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated residuals ``y [b,K,d]``, variances ``v [b,K,d]``, log-joint ``[b,K]``."""
        y = self._rotate(xt)
        v = self.evals + s2[:, :, None]
        logj = self.log_weights - 0.5 * ((y * y / v).sum(-1) + torch.log(v).sum(-1))
        return y, v, logj

    def _rows(self) -> int:
        return max(1, _CHUNK_ELEMENTS // (self.n_components * self.dim))

    def _apply(self, fn: Any, x: Tensor, t: Tensor | float) -> Tensor:
        """Run ``fn(x~, a, s2)`` on row chunks with per-row ``alpha`` and ``s^2``."""
        xf = self._flat(x)
        n = xf.shape[0]
        t = as_time(t)
        a = _col(self.process.alpha(t), n)
        s = _col(self.process.sigma_tilde(t), n)
        step = self._rows()
        outs = [
            fn(xf[i : i + step] / a[i : i + step], a[i : i + step], s[i : i + step] ** 2)
            for i in range(0, n, step)
        ]
        return torch.cat(outs)

    # ------------------------------------------------------------ contract
    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            y, v, logj = self._parts(xt, s2)
            r = torch.softmax(logj, dim=-1)
            return r @ self.means + self._unrotate(r[:, :, None] * y * (self.evals / v))

        return self._apply(fn, x, t).reshape(x.shape).to(x.dtype)

    def responsibilities(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Posterior component probabilities ``p(k | x_t = x)``, ``[B, K]`` (float64)."""
        return self._apply(
            lambda xt, a, s2: torch.softmax(self._parts(xt, s2)[2], dim=-1), x, t
        )

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x)``."""

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            y, v, logj = self._parts(xt, s2)
            r = torch.softmax(logj, dim=-1)
            return -self._unrotate(r[:, :, None] * y / v) / a

        return self._apply(fn, x, t).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x)`` per sample, ``[B]`` (float64)."""
        c = 0.5 * self.dim * math.log(2 * math.pi)

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            logj = self._parts(xt, s2)[2]
            return torch.logsumexp(logj, dim=-1) - c - self.dim * torch.log(a[:, 0])

        return self._apply(fn, x, t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact data samples (float64)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + z * self.evals[comp].sqrt()
        if self.evecs is not None:
            for k in torch.unique(comp).tolist():
                idx = comp == k
                x[idx] = self.means[k] + (z[idx] * self.evals[k].sqrt()) @ self.evecs[k].T
        return x.reshape((n,) + self.shape)

    # ------------------------------------------------------------ construction
    @classmethod
    def random(
        cls,
        dim: int,
        n_components: int,
        *,
        process: Process,
        seed: int = 0,
        mean_scale: float = 1.0,
        eig_range: tuple[float, float] = (1e-3, 1e-1),
        concentration: float = 2.0,
        shape: tuple[int, ...] | None = None,
    ) -> GaussianMixture:
        """A random but deterministic (for ``seed``) mixture that is hard to sample from.

        * weights ``~ Dirichlet(concentration)`` (unequal);
        * means ``~ N(0, mean_scale^2 I)`` (data scale about 1 per coordinate; the best of 16
          draws by smallest pairwise distance, so components stay apart in low ``d``);
        * full covariances ``U_k diag(l_k) U_k^T`` with Haar-random rotations ``U_k`` and
          eigenvalues log-uniform in ``eig_range`` (two decades by default, smallest ``1e-3``
          so the probability-flow ODE stays well conditioned).

        Example:
            >>> from diffusolve.models import GaussianMixture
            >>> from diffusolve.process import rectified_flow
            >>> gmm = GaussianMixture.random(8, 5, process=rectified_flow(), seed=0)
            >>> tuple(gmm.covs.shape), round(float(gmm.weights.sum()), 12)
            ((5, 8, 8), 1.0)
        """
        if dim < 1 or n_components < 1:
            raise ValueError("dim and n_components must be positive")
        lo, hi = eig_range
        if not 0 < lo <= hi:
            raise ValueError(f"eig_range must satisfy 0 < lo <= hi; got {eig_range}")
        rng = np.random.default_rng(seed)
        weights = rng.dirichlet(np.full(n_components, concentration))
        best, best_sep = None, -1.0
        for _ in range(16 if n_components > 1 else 1):
            m = rng.normal(0.0, mean_scale, (n_components, dim))
            diff = m[:, None, :] - m[None, :, :]
            dist = np.sqrt((diff**2).sum(-1))
            np.fill_diagonal(dist, np.inf)
            sep = float(dist.min()) if n_components > 1 else 0.0
            if sep > best_sep:
                best, best_sep = m, sep
        evals = np.exp(rng.uniform(math.log(lo), math.log(hi), (n_components, dim)))
        q, r = np.linalg.qr(rng.normal(size=(n_components, dim, dim)))
        q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
        covs = (q * evals[:, None, :]) @ q.transpose(0, 2, 1)
        covs = 0.5 * (covs + covs.transpose(0, 2, 1))
        return cls(
            torch.from_numpy(weights),
            torch.from_numpy(best),
            torch.from_numpy(covs),
            process=process,
            shape=shape,
        )

    def __repr__(self) -> str:
        return (
            f"GaussianMixture(K={self.n_components}, d={self.dim}, shape={self.shape}, "
            f"process={self.process.name!r})"
        )
