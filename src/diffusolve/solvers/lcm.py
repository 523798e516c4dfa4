"""Multistep consistency sampling (Song et al. 2023; Luo et al. 2023, LCM).

Each step maps ``x_t`` to the clean estimate ``x0 = f(x_t, t)`` and re-noises it to the
next time with fresh noise: ``x_t' = alpha' x0 + sigma' z``. With a consistency model ``f``
is the model; with an ordinary denoiser this is a maximally stochastic sampler (it forgets
``x_t`` except through ``x0``). Paper default: 1-8 steps on a distilled model.
"""

from __future__ import annotations

from .base import Solver, coef, register

__all__ = ["LCM"]


@register("lcm")
class LCM(Solver):
    """Latent-consistency multistep sampling; stochastic, one evaluation per step."""

    order = 1
    stochastic = True
    citation = "Luo, Tan, Huang, Li & Zhao, Latent Consistency Models, 2023; Song, Dhariwal, Chen & Sutskever, Consistency Models, ICML 2023"

    def step(self, model, x, t, t_next, state):
        p = model.process
        x0 = model(x, t)
        z = state["noise"](tuple(x.shape), dtype=x.dtype, device=x.device)
        return coef(p.alpha(t_next), x) * x0 + coef(p.sigma(t_next), x) * z, state
