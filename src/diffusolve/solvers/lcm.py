"""Multistep consistency sampling (Song et al. 2023; Luo et al. 2023, LCM).

Each step maps ``x_t`` to the clean estimate ``x0 = f(x_t, t)`` and re-noises it to the
next time with fresh noise: ``x_t' = alpha' x0 + sigma' z``. With a consistency model ``f``
is the model; with an ordinary denoiser this is a maximally stochastic sampler (it forgets
``x_t`` except through ``x0``). Paper default: 1-8 steps on a distilled model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import BoundModel, Solver, StepContext, register

__all__ = ["LCM"]


@register("lcm")
@dataclass(frozen=True)
class LCM(Solver):
    """Latent-consistency multistep sampling; stochastic, one evaluation per step.

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> get_solver("lcm").stochastic
        True
    """

    stochastic = True
    citation = (
        "Luo, Tan, Huang, Li & Zhao, Latent Consistency Models, 2023; "
        "Song, Dhariwal, Chen & Sutskever, Consistency Models, ICML 2023"
    )

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: None, ctx: StepContext
    ) -> tuple[Tensor, None]:
        a1, s1, _ = model.scalars(t_next)
        x0 = model(x, t)
        z = ctx.noise(tuple(x.shape), dtype=x.dtype, device=x.device)
        return a1 * x0 + s1 * z, None
