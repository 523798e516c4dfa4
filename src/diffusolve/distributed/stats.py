"""Streaming sample statistics reduced across ranks: Gaussian moments for FD, projections for
sliced Wasserstein.

FD (Heusel et al. 2017) needs only the mean and covariance of the features, i.e. the count,
the sum and the sum of outer products, which add up over shards and ranks
(:class:`GaussianMoments`, one ``all_reduce`` each): FD on 50,000 samples holds one shard's
features at a time, ``O(D^2)`` memory whatever the number of samples. Sliced Wasserstein
(Bonneel et al. 2015) needs the sorted one-dimensional projections of every sample; they
are ``n_projections`` numbers a sample instead of the sample itself
(:class:`StreamingProjections`, gathered once at the end).

All sums are in float64. The covariance from sums, ``(S2 - S S^T / N) / (N - 1)``, equals
the two-pass covariance to float64 rounding when the features' mean is not many orders of
magnitude above their spread (classifier features are not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..metrics.fd import frechet_distance_from_moments
from ..metrics.sliced import random_projections
from .context import DistContext, current

__all__ = ["GaussianMoments", "StreamingProjections", "streaming_fd"]


def _rows64(x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    return t.reshape(t.shape[0], -1)


@dataclass
class GaussianMoments:
    """Count, sum and sum of outer products of feature rows ``[N, D]`` (float64).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(300, 3, generator=g, dtype=torch.float64)
        >>> m = GaussianMoments(3)
        >>> for chunk in a.split(64):
        ...     _ = m.update(chunk)
        >>> m.count, bool(torch.allclose(m.mean, a.mean(0))), bool(torch.allclose(m.cov, a.T.cov()))
        (300, True, True)
    """

    dim: int
    count: int = 0
    total: Tensor = field(default=None)  # type: ignore[assignment]
    outer: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.dim, dtype=torch.float64)
        if self.outer is None:
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, feats: Tensor | np.ndarray) -> GaussianMoments:
        """Add feature rows ``[n, D]`` (flattened per row); returns ``self``."""
        x = _rows64(feats)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} columns, these moments {self.dim}")
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def reduce(self, ctx: DistContext | None = None) -> GaussianMoments:
        """The moments summed over every rank (three ``all_reduce`` sums), a new object."""
        ctx = current() if ctx is None else ctx
        count = ctx.all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64))
        return GaussianMoments(
            self.dim,
            int(count.item()),
            ctx.all_reduce_sum(self.total),
            ctx.all_reduce_sum(self.outer),
        )

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance (divides by ``N - 1``, as ``numpy.cov``)."""
        if self.count < 2:
            raise ValueError("need at least 2 samples to fit a covariance")
        mu = self.mean
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)

    def frechet_distance(self, other: GaussianMoments) -> float:
        """FD between the Gaussians fitted to ``self`` and ``other``
        (:func:`diffusolve.metrics.fd.frechet_distance_from_moments`)."""
        if other.dim != self.dim:
            raise ValueError(f"feature dimensions differ: {self.dim} vs {other.dim}")
        return frechet_distance_from_moments(
            self.mean.numpy(), self.cov.numpy(), other.mean.numpy(), other.cov.numpy()
        )


@dataclass
class StreamingProjections:
    """One-dimensional projections of samples on fixed random directions, kept per shard and
    gathered across ranks, for sliced Wasserstein.

    The directions are :func:`diffusolve.metrics.sliced.random_projections` ``(dim,
    n_projections, seed)``, those of :func:`diffusolve.metrics.sliced_wasserstein`, so
    :meth:`sliced_wasserstein` equals it on the same samples.

    Example:
        >>> from diffusolve.metrics import sliced_wasserstein
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 4, generator=g), torch.randn(150, 4, generator=g) + 0.5
        >>> px, py = StreamingProjections(4, 64), StreamingProjections(4, 64)
        >>> for chunk in x.split(50):
        ...     _ = px.update(chunk)
        >>> _ = py.update(y)
        >>> abs(px.sliced_wasserstein(py) - sliced_wasserstein(x, y, n_projections=64)) < 1e-12
        True
    """

    dim: int
    n_projections: int = 256
    seed: int = 0
    parts: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._dirs = random_projections(self.dim, self.n_projections, self.seed)

    def update(self, x: Tensor | np.ndarray) -> StreamingProjections:
        """Project samples ``[n, ...]`` (flattened per sample); returns ``self``."""
        rows = _rows64(x).numpy()
        if rows.shape[1] != self.dim:
            raise ValueError(f"samples have dimension {rows.shape[1]}, directions {self.dim}")
        self.parts.append(rows @ self._dirs)
        return self

    def values(self) -> np.ndarray:
        """This rank's projections ``[n, n_projections]``."""
        if not self.parts:
            return np.zeros((0, self.n_projections))
        return np.concatenate(self.parts)

    def gather(self, ctx: DistContext | None = None) -> StreamingProjections:
        """Every rank's projections in one object (rank order; SW does not depend on it)."""
        ctx = current() if ctx is None else ctx
        out = StreamingProjections(self.dim, self.n_projections, self.seed)
        out.parts = [p for p in ctx.all_gather_object(self.values()) if len(p)]
        return out

    def sliced_wasserstein(self, other: StreamingProjections, p: int = 2) -> float:
        """Sliced ``p``-Wasserstein distance: ``(mean_k W_p^p(proj_k a, proj_k b))^(1/p)``
        with POT's one-dimensional ``wasserstein_1d`` (unequal sizes allowed)."""
        import ot

        if (other.dim, other.n_projections, other.seed) != (
            self.dim,
            self.n_projections,
            self.seed,
        ):
            raise ValueError("projections differ (dim, n_projections or seed); use the same")
        a, b = self.values(), other.values()
        return float(np.mean(ot.wasserstein_1d(a, b, p=p)) ** (1.0 / p))


def streaming_fd(
    batches: Callable[[], object],
    features: Callable[[Tensor], Tensor],
    reference: GaussianMoments,
    *,
    ctx: DistContext | None = None,
) -> tuple[float, GaussianMoments]:
    """FD between the features of ``batches()`` (an iterable of sample batches, this rank's
    share) over every rank, and ``reference`` moments; returns ``(fd, reduced moments)``.

    Memory: one batch of samples and ``D^2`` numbers, whatever the number of samples.
    """
    moments: GaussianMoments | None = None
    for x in batches():  # type: ignore[attr-defined]
        with torch.no_grad():
            f = _rows64(features(x))
        moments = GaussianMoments(f.shape[1]) if moments is None else moments
        moments.update(f)
    moments = GaussianMoments(reference.dim) if moments is None else moments
    total = moments.reduce(ctx)
    return total.frechet_distance(reference), total
