"""DDS: decomposed diffusion sampler (Chung, Lee, Ye, ICLR 2024).

The clean estimate is made data consistent by a few conjugate-gradient iterations started
at it (a Krylov subspace around the estimate, which keeps it near the data manifold):

* noisy (``sigma_y > 0``): ``(I + gamma A^T A) x = x0_hat + gamma A^T y``
  (``gamma`` the data weight; ``M`` iterations);
* noiseless: ``A^T A x = A^T y`` from ``x0_hat``.

The move is DDIM with ``eta``. Needs a linear operator (``A``, ``A^T``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..linalg import batched_cg
from .base import PosteriorSampler, Problem, register
from .parts import ddim_move

__all__ = ["DDS"]


@register
@dataclass(frozen=True)
class DDS(PosteriorSampler):
    """Decomposed diffusion sampling.

    Args:
        gamma: data weight of the noisy subproblem (default 1.0).
        cg_iters: conjugate-gradient iterations per step (default 5, the paper's).
        eta: DDIM stochasticity (default 0.85, the paper's).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import CompressedSensing
        >>> from diffusolve.inverse.samplers import DDS
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import ddpm
        >>> prior = Gaussian(torch.zeros(6), torch.eye(6), process=ddpm())
        >>> op = CompressedSensing((6,), 3, seed=0)
        >>> y = op(torch.ones(2, 6, dtype=torch.float64))
        >>> DDS().run(prior, op, y, 0.1, steps=10, noise=0).shape
        torch.Size([2, 6])
    """

    gamma: float = 1.0
    cg_iters: int = 5
    eta: float = 0.85

    name: ClassVar[str] = "dds"
    needs: ClassVar[tuple[str, ...]] = ("linear",)
    citation: ClassVar[str] = (
        "Chung, Lee, Ye. Decomposed Diffusion Sampler for Accelerating Large-Scale Inverse "
        "Problems. ICLR 2024."
    )
    SEARCH: ClassVar[dict[str, tuple[Any, ...]]] = {
        "gamma": (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
        "cg_iters": (1, 5, 20),
        "eta": (0.0, 0.85, 1.0),
    }

    def __post_init__(self) -> None:
        self._positive(gamma=self.gamma)
        self._unit(eta=self.eta)
        self._count(cg_iters=self.cg_iters)

    def consistent(self, p: Problem, x0: Tensor) -> Tensor:
        op = p.operator
        noisy = p.col((p.sigma_y > 0).to(x0.dtype), x0)
        # one system for both cases: noisy rows (I + gamma A^T A) x = x0 + gamma A^T y,
        # noiseless rows A^T A x = A^T y (``c`` the weight of the data term on each row)
        c = noisy * self.gamma + (1 - noisy)

        def apply(v: Tensor) -> Tensor:
            return noisy * v + c * op.normal(v)

        rhs = noisy * x0 + c * op.At(p.y).to(x0.dtype)
        return batched_cg(apply, rhs, x0, max_iter=self.cg_iters)

    def step(self, p: Problem, x: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        x0 = p.denoise(x, i)
        return ddim_move(p, x, self.consistent(p, x0), i, self.eta), state
