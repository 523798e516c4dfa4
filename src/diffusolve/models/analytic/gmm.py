"""The Gaussian mixture prior ``x0 ~ sum_k w_k N(mu_k, C_k)``: exact at every noise level.

Under ``x_t = alpha x0 + sigma eps``, with ``x~ = x / alpha``, ``s = sigma / alpha`` and
``C_k = U_k diag(l_k) U_k^T``, each component noises to ``N(mu_k, C_k + s^2 I)`` in ``x~``:

* responsibilities ``r_k(x~) = softmax_k(log w_k + log N(x~; mu_k, C_k + s^2 I))``
  (log-sum-exp, so they stay exact however far apart the components are);
* denoiser ``D = sum_k r_k (mu_k + U_k diag(l_k / (l_k + s^2)) U_k^T (x~ - mu_k))``;
* score ``grad log p_t(x) = -(1/alpha) sum_k r_k U_k diag(1 / (l_k + s^2)) U_k^T (x~ - mu_k)``;
* the probability-flow ODE has no closed form: :meth:`GaussianMixture.ode_solve` solves it
  to tight tolerance in float64 (:func:`~diffusolve.models.analytic.reference.pf_ode_solve`);
  :meth:`GaussianMixture.reference_zero` solves it down to ``s = 0`` through
  ``(x~ - D) / s^2 = sum_k r_k U_k diag(1 / (l_k + s^2)) U_k^T (x~ - mu_k)``
  (:meth:`GaussianMixture.pf_drift_v`, finite at ``s = 0`` since every ``l_k > 0``).

Components whose responsibility for a sample is provably negligible (below ``exp(-60)``,
from cheap bounds on the Mahalanobis distance) are skipped for that sample, so at low noise,
where the components separate, an evaluation costs about one component per sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...process import Process
from ..base import Denoiser
from ._move import Movable
from .gaussian import chunked_apply
from .reference import ODEReference

__all__ = ["GaussianMixture"]

_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of ~4M float64 [b, K, d] entries
_PRUNE = 60.0  # skip (row, component) pairs with responsibility provably below exp(-60)
_Term = tuple[int, "Tensor | None", Tensor, Tensor]


class GaussianMixture(Movable, Denoiser, ODEReference):
    """Exact Gaussian-mixture prior on ``R^d`` (samples of any shape with ``prod(shape) == d``).

    Args:
        weights: ``[K]`` positive mixture weights (normalised here). The mixture computes
            in float64 on the device of ``means``; ``to(device, dtype)`` gives a moved copy.
        means: ``[K, d]``.
        covs: ``[K, d, d]`` full symmetric positive definite, ``[K, d]`` diagonal or ``[K]``
            isotropic variances.
        process: the noise process.
        shape: optional sample shape (default ``(d,)``).
        singular: allow rank-deficient covariances (eigenvalues ``>= 0``): each component is
            then a Gaussian on an affine subspace of dimension ``rank C_k`` (a low-rank
            mixture with known intrinsic dimensions). Everything at noise ``s > 0`` is exact
            as before; :meth:`pf_drift_v` at ``v = 0`` and :meth:`reference_zero` (which
            need ``C_k`` invertible) are refused. Default ``False``: positive definite only.

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

    _anchor = "means"

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covs: Tensor,
        *,
        process: Process,
        shape: tuple[int, ...] | None = None,
        singular: bool = False,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64, device=means.device).flatten()
        k = w.numel()
        if means.ndim != 2 or means.shape[0] != k:
            raise ValueError(
                f"means must be [K, d] with K={k} (from weights); got {tuple(means.shape)}"
            )
        if not torch.all(w > 0):
            raise ValueError("mixture weights must be positive")
        d = means.shape[1]
        covs = torch.as_tensor(covs, dtype=torch.float64, device=means.device)
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
        if singular:
            if not torch.all(evals >= -1e-12 * evals.abs().max().clamp_min(1.0)):
                raise ValueError("every covariance must be positive semi-definite")
            evals = evals.clamp_min(0.0)
        elif not torch.all(evals > 0):
            raise ValueError(
                "every covariance must be positive definite (all eigenvalues > 0); pass "
                "singular=True for rank-deficient (low-rank) components"
            )
        self.singular = bool(singular)
        self.weights = w / w.sum()
        self.log_weights = torch.log(self.weights)
        self.means, self.evals, self.evecs = means, evals, evecs
        self.n_components, self.dim = k, d
        self.process = process
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not have {d} elements")
        self._lmin, self._lmax = evals.min(1).values, evals.max(1).values
        self._msq = (means * means).sum(1)
        # isotropic components (C_k = l_k I): the denoiser is two matrix products
        self._iso = self._lmin if evecs is None and torch.equal(self._lmin, self._lmax) else None

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
        return self._input(x)

    def _terms(self, xt: Tensor, s2: Tensor) -> tuple[Tensor, list[_Term]]:
        """Log-joint ``log w_k + log N(x~; mu_k, C_k + s^2 I)`` ``[b, K]`` and per-component terms.

        Pairs (row, component) whose responsibility is provably below ``exp(-_PRUNE)`` (from
        ``|x~ - mu_k|^2 / (l_max + s^2) <= maha_k <= |x~ - mu_k|^2 / (l_min + s^2)``) are
        skipped: their log-joint is ``-inf``. Each term is ``(k, rows, y, 1 / v)`` with
        ``rows`` the kept row indices (``None``: all rows), ``y = U_k^T (x~ - mu_k)`` and
        ``v = l_k + s^2`` (``[d]`` when all rows share one noise level, else per row).
        """
        b = xt.shape[0]
        shared = bool(torch.all(s2 == s2[0]))
        s2k = s2[:1] if shared else s2  # [1 or b, 1]
        v = self.evals + s2k[:, :, None]  # [1 or b, K, d]
        inv_v = 1.0 / v
        base = self.log_weights - 0.5 * torch.log(v).sum(-1)  # [1 or b, K]
        with torch.no_grad():
            dist2 = (xt * xt).sum(1, keepdim=True) - 2 * xt @ self.means.T + self._msq
            dist2 = dist2.clamp_min(0)
            upper = base - 0.5 * dist2 / (self._lmax + s2k)
            lower = base - 0.5 * dist2 / (self._lmin + s2k)
            keep = upper >= lower.max(1, keepdim=True).values - _PRUNE
        logj = xt.new_full((b, self.n_components), -math.inf)
        terms: list[_Term] = []
        for k in range(self.n_components):
            rows = keep[:, k].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            full = rows.numel() == b
            y = (xt if full else xt[rows]) - self.means[k]
            if self.evecs is not None:
                y = y @ self.evecs[k]
            if shared:
                iv, lj = inv_v[0, k], base[0, k]
                maha = (y * y) @ iv
            else:
                iv, lj = (inv_v[:, k], base[:, k]) if full else (inv_v[rows, k], base[rows, k])
                maha = (y * y * iv).sum(1)
            if full:
                logj[:, k] = lj - 0.5 * maha
            else:
                logj[rows, k] = lj - 0.5 * maha
            terms.append((k, None if full else rows, y, iv))
        return logj, terms

    def _combine(self, r: Tensor, terms: list[_Term], numer: Tensor | None) -> Tensor:
        """``sum_k r_k U_k diag(numer_k / v_k) y_k`` over the kept terms: ``[b, d]``."""
        out = r.new_zeros(r.shape[0], self.dim)
        for k, rows, y, iv in terms:
            c = iv if numer is None else numer[k] * iv
            rk = (r[:, k] if rows is None else r[rows, k])[:, None]
            if self.evecs is None:
                z = y * c
            elif c.ndim == 1:  # shared noise level: fold the scaling into the rotation
                z = y @ (self.evecs[k] * c).T
            else:
                z = (y * c) @ self.evecs[k].T
            if rows is None:
                out += rk * z
            else:
                out.index_add_(0, rows, rk * z)
        return out

    def _rows(self) -> int:
        return max(1, _CHUNK_ELEMENTS // (self.n_components * self.dim))

    def _apply(self, fn: Any, x: Tensor, t: Tensor | float) -> Tensor:
        """Run ``fn(x~, a, s2)`` on row chunks with per-row ``alpha`` and ``s^2``."""
        return chunked_apply(self.process, fn, self._flat(x), t, self._rows())

    # ------------------------------------------------------------ contract
    def _denoise_isotropic(self, xt: Tensor, s2: Tensor) -> Tensor:
        """The denoiser for isotropic components ``C_k = l_k I``: responsibilities
        ``softmax_k(log w_k - d/2 log(l_k + s^2) - |x~ - mu_k|^2 / (2 (l_k + s^2)))`` and
        ``x0 = sum_k r_k (mu_k + l_k / (l_k + s^2) (x~ - mu_k))``."""
        lam = self._iso  # [K]
        if bool(torch.all(s2 == s2[0])):
            s2 = s2[:1].contiguous()  # one noise level: [1, 1] broadcasts fastest
        v = lam + s2  # [b or 1, K]
        dist2 = ((xt * xt).sum(1, keepdim=True) - 2 * xt @ self.means.T + self._msq).clamp_min(0)
        logj = self.log_weights - 0.5 * self.dim * torch.log(v) - 0.5 * dist2 / v
        r = torch.softmax(logj, dim=-1)
        shrink = r * (s2 / v)  # r_k (1 - l_k / v_k): the weight of mu_k
        return shrink @ self.means + (r * (lam / v)).sum(1, keepdim=True) * xt

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self._iso is not None:
            return (
                self._apply(lambda xt, a, s2: self._denoise_isotropic(xt, s2), x, t)
                .reshape(x.shape)
                .to(device=x.device, dtype=x.dtype)
            )

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            logj, terms = self._terms(xt, s2)
            r = torch.softmax(logj, dim=-1)
            return r @ self.means + self._combine(r, terms, self.evals)

        return self._apply(fn, x, t).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def responsibilities(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Posterior component probabilities ``p(k | x_t = x)``, ``[B, K]`` (the prior's
        dtype, on ``x``'s device)."""
        r = self._apply(lambda xt, a, s2: torch.softmax(self._terms(xt, s2)[0], dim=-1), x, t)
        return r.to(x.device)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x)``."""

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            logj, terms = self._terms(xt, s2)
            r = torch.softmax(logj, dim=-1)
            return -self._combine(r, terms, None) / a

        return self._apply(fn, x, t).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x)`` per sample, ``[B]`` (the prior's dtype, on ``x``'s device)."""
        c = 0.5 * self.dim * math.log(2 * math.pi)

        def fn(xt: Tensor, a: Tensor, s2: Tensor) -> Tensor:
            logj = self._terms(xt, s2)[0]
            return torch.logsumexp(logj, dim=-1) - c - self.dim * torch.log(a[:, 0])

        return self._apply(fn, x, t).to(x.device)

    def pf_drift_v(self, xt: Tensor, v: Tensor) -> Tensor:
        """``(x~ - D(x~, s)) / s^2 = -grad log p_v(x~)`` at noise variance ``v = s^2 >= 0``.

        Process independent (``x~ = x / alpha``): ``[B, d]`` flat float64 states, ``[B]``
        variances (``v = 0``: the data density itself). Computed without the cancellation of
        ``x~ - D`` (see :func:`~diffusolve.models.analytic.reference.pf_ode_solve_to_zero`).
        """
        device = xt.device
        xt = self._input(xt)
        v = torch.as_tensor(v, dtype=self.dtype).reshape(-1).to(self.device)
        if self.singular and bool(torch.any(v <= 0)) and float(self.evals.min()) <= 0:
            raise ValueError("pf_drift_v needs v > 0 for rank-deficient covariances")
        if v.numel() == 1:
            v = v.expand(xt.shape[0])
        step = self._rows()
        outs = []
        for i in range(0, xt.shape[0], step):
            logj, terms = self._terms(xt[i : i + step], v[i : i + step, None])
            outs.append(self._combine(torch.softmax(logj, dim=-1), terms, None))
        return torch.cat(outs).to(device)

    @property
    def pf_v_scale(self) -> float:
        """The smallest component eigenvalue: the variance scale of the ODE near ``s = 0``."""
        lmin = float(self.evals.min())
        if lmin <= 0:
            raise ValueError(
                "this mixture has rank-deficient covariances (singular=True): the "
                "probability-flow drift is unbounded at s = 0, so there is no zero-noise "
                "reference; solve to a positive noise level with ode_solve instead"
            )
        return lmin

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact data samples (in the prior's dtype, on its device; drawn in float64 on
        the generator's device, so a seed gives the same samples on every device)."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        w = self.weights.to(device=gdev, dtype=torch.float64)
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gdev)
        comp, z = comp.to(self.device), z.to(device=self.device, dtype=self.dtype)
        x = self.means[comp] + z * self.evals[comp].sqrt()
        if self.evecs is not None:
            for k in torch.unique(comp).tolist():
                idx = comp == k
                x[idx] = self.means[k] + (z[idx] * self.evals[k].sqrt()) @ self.evecs[k].T
        return x.reshape((n,) + self.shape)

    @classmethod
    def from_eigh(
        cls,
        weights: Tensor,
        means: Tensor,
        evals: Tensor,
        evecs: Tensor,
        *,
        process: Process,
        shape: tuple[int, ...] | None = None,
        singular: bool = False,
    ) -> GaussianMixture:
        """A mixture with covariances ``C_k = evecs[k] diag(evals[k]) evecs[k]^T`` given by
        their eigendecompositions (none is computed; ``evecs`` ``[K, d, d]`` must have
        orthonormal columns and may be a broadcast view of one shared basis).
        ``singular=True`` allows zero eigenvalues (low-rank components, see the class).

        Example:
            >>> import torch
            >>> from diffusolve.models import GaussianMixture
            >>> from diffusolve.process import edm
            >>> q = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
            >>> g = GaussianMixture.from_eigh(torch.ones(2), torch.zeros(2, 2),
            ...     torch.tensor([[1.0, 4.0], [2.0, 2.0]]), q.expand(2, 2, 2), process=edm())
            >>> torch.allclose(g.covs[0], q @ torch.diag(torch.tensor([1.0, 4.0]).double()) @ q.T)
            True
        """
        out = cls(weights, means, evals, process=process, shape=shape, singular=singular)
        evecs = torch.as_tensor(evecs, dtype=out.dtype, device=out.device)
        if evecs.shape != (out.n_components, out.dim, out.dim):
            raise ValueError(
                f"evecs must be [K, d, d] = {(out.n_components, out.dim, out.dim)}; "
                f"got {tuple(evecs.shape)}"
            )
        out.evecs = evecs
        return out

    def posterior(self, operator: Any, y: Tensor, sigma_y: float) -> GaussianMixture:
        """Exact posterior ``p(x0 | y)`` for ``y = A x0 + sigma_y eps`` with a linear operator
        (a dense ``[m, d]`` tensor or an object with ``matrix()``/``A``): a reweighted
        :class:`GaussianMixture` of the component posteriors, same process and shape
        (:func:`.posterior.mixture_posterior`).

        Example:
            >>> import torch
            >>> from diffusolve.models import GaussianMixture
            >>> from diffusolve.process import edm
            >>> gmm = GaussianMixture.random(3, 2, process=edm(), seed=0)
            >>> post = gmm.posterior(torch.eye(3)[:1], torch.tensor([0.5]), 0.1)
            >>> post.n_components, post.process is gmm.process
            (2, True)
        """
        from .posterior import mixture_posterior

        return mixture_posterior(self, operator, y, sigma_y)

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
