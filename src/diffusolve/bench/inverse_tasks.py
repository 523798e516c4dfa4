"""The Gaussian-mixture inverse problems of ``diffusolve bench inverse`` (MCGdiff set-up).

The prior has 25 components with identity covariances whose means lie on the 5x5 grid
``(-8 i, -8 j)``, ``i, j in {-2, ..., 2}``, tiled to dimension ``d`` (the 2-D grid repeated
``d / 2`` times); the weights are squared standard normals, normalised. The measurement is
``y = A x* + sigma_y eps`` with ``x*`` drawn from the prior, ``A`` a ``dy x d`` matrix built
from the full SVD ``U S V`` of a standard normal matrix with its singular values replaced by
sorted (descending) ``U(0, 1)`` draws, ``A = U diag(s) V[:dy]``, and ``sigma_y = u * s_max``
with ``u ~ U(0, 1)``. Every problem draws all of this from its own seed
(:func:`problem_seed`). The process is :func:`~diffusolve.process.ddpm` ``("linear")`` and
the mixture itself is the exact denoiser (float64); the exact posterior is a mixture too
(:meth:`~diffusolve.models.analytic.gmm.GaussianMixture.posterior`).

Example:
    >>> from diffusolve.bench.inverse_tasks import make_problem
    >>> p = make_problem(8, 2, 0)
    >>> tuple(p.matrix.shape), bool(p.s[0] >= p.s[1]), bool(p.sigma_y < p.s[0])
    ((2, 8), True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GMM_DIMS",
    "GMM_DYS",
    "GRID_STEP",
    "MAX_PROBLEMS",
    "TUNING_OFFSET",
    "grid_means",
    "problem_seed",
    "GMMProblem",
    "make_problem",
    "exact_samples",
]

#: data dimensions and measurement dimensions of the set-up
GMM_DIMS = (8, 80, 800)
GMM_DYS = (1, 2, 4)
#: spacing of the 5x5 grid of means
GRID_STEP = 8.0
#: reported problems per (d, dy) are indexed 0 .. MAX_PROBLEMS - 1; tuning problems are
#: indexed from TUNING_OFFSET on, so the two sets of seeds never meet
MAX_PROBLEMS = 5000
TUNING_OFFSET = 5000
_SEED_SCALE = 10_000  # > TUNING_OFFSET + the largest tuning index


def grid_means(d: int) -> Tensor:
    """``[25, d]`` float64 means: the 2-D grid ``(-8 i, -8 j)`` repeated ``d / 2`` times."""
    if d < 2 or d % 2:
        raise ValueError(f"the mixture dimension must be even and >= 2; got {d}")
    r = range(-2, 3)
    grid = torch.tensor(
        [[-GRID_STEP * i, -GRID_STEP * j] for i in r for j in r], dtype=torch.float64
    )
    return grid.repeat(1, d // 2)


def problem_seed(d: int, dy: int, index: int, *, tuning: bool = False) -> int:
    """The seed of problem ``index`` at ``(d, dy)``: ``2^i_d 3^i_dy 10^4 + index`` for a
    reported problem and ``... + 5000 + index`` for a tuning problem, where ``i_d``/``i_dy``
    are the positions of ``d``/``dy`` in :data:`GMM_DIMS`/:data:`GMM_DYS`.

    Distinct ``(d, dy, index, tuning)`` give distinct seeds; no tuning seed equals a
    reported one.

    Example:
        >>> problem_seed(8, 1, 3), problem_seed(80, 2, 0), problem_seed(8, 1, 0, tuning=True)
        (10003, 60000, 15000)
    """
    if d not in GMM_DIMS:
        raise ValueError(f"d must be one of {GMM_DIMS}; got {d}")
    if dy not in GMM_DYS:
        raise ValueError(f"dy must be one of {GMM_DYS}; got {dy}")
    limit = _SEED_SCALE - TUNING_OFFSET if tuning else MAX_PROBLEMS
    if not 0 <= index < limit:
        raise ValueError(f"problem index must lie in [0, {limit}); got {index}")
    base = 2 ** GMM_DIMS.index(d) * 3 ** GMM_DYS.index(dy) * _SEED_SCALE
    return base + (TUNING_OFFSET if tuning else 0) + int(index)


@dataclass
class GMMProblem:
    """One random inverse problem: prior, operator, measurement and its exact posterior.

    Attributes:
        d, dy, index, tuning, seed: what it is and where it came from.
        prior: the :class:`~diffusolve.models.analytic.gmm.GaussianMixture` (the denoiser).
        matrix: ``[dy, d]`` float64 ``A``; ``s``: its singular values (descending).
        operator: ``MatrixOperator(A, (d,))``.
        sigma_y: the noise std; ``x_true``: ``[d]`` the prior draw; ``y``: ``[dy]``.
        posterior: the exact posterior mixture.
    """

    d: int
    dy: int
    index: int
    tuning: bool
    seed: int
    prior: Any
    matrix: Tensor
    s: Tensor
    operator: Any
    sigma_y: float
    x_true: Tensor
    y: Tensor
    posterior: Any

    @property
    def name(self) -> str:
        return f"gmm-d{self.d}-dy{self.dy}"

    def info(self) -> dict[str, Any]:
        """JSON-able facts of the problem."""
        return {
            "seed": self.seed,
            "sigma_y": round(self.sigma_y, 6),
            "s": [round(float(v), 6) for v in self.s],
            "posterior_components": int(self.posterior.n_components),
        }


def make_problem(d: int, dy: int, index: int, *, tuning: bool = False) -> GMMProblem:
    """Problem ``index`` at ``(d, dy)`` (a tuning problem with ``tuning=True``)."""
    from ..inverse.matrix import MatrixOperator
    from ..models.analytic.gmm import GaussianMixture
    from ..process import ddpm

    if dy > d:
        raise ValueError(f"dy must not exceed d; got dy={dy}, d={d}")
    seed = problem_seed(d, dy, index, tuning=tuning)
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    w = torch.randn(25, generator=g, dtype=f64) ** 2
    prior = GaussianMixture(
        w / w.sum(), grid_means(d), torch.ones(25, dtype=f64), process=ddpm("linear")
    )
    u, _, vh = torch.linalg.svd(torch.randn(dy, d, generator=g, dtype=f64), full_matrices=True)
    s = torch.sort(torch.rand(dy, generator=g, dtype=f64), descending=True).values
    matrix = u @ torch.diag(s) @ vh[:dy]
    sigma_y = float(torch.rand(1, generator=g, dtype=f64)) * float(s.max())
    x_true = prior.sample(1, g)[0]
    y = matrix @ x_true + sigma_y * torch.randn(dy, generator=g, dtype=f64)
    return GMMProblem(
        d=d,
        dy=dy,
        index=int(index),
        tuning=tuning,
        seed=seed,
        prior=prior,
        matrix=matrix,
        s=s,
        operator=MatrixOperator(matrix, (d,)),
        sigma_y=sigma_y,
        x_true=x_true,
        y=y,
        posterior=prior.posterior(matrix, y, sigma_y),
    )


def exact_samples(problem: GMMProblem, n: int, which: int) -> Tensor:
    """``n`` exact posterior samples ``[n, d]``; ``which`` = 0 is the reference set the
    methods are compared with, 1 the independent set of the noise floor."""
    g = torch.Generator().manual_seed(problem.seed * 4 + 1 + int(which))
    return problem.posterior.sample(n, g)
