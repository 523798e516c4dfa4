"""EDICT: exact inversion by two coupled sequences (Wallace, Gokul & Naik, CVPR 2023).

Written in ``alpha``/``sigma`` so it runs on any process (VP, VE, EDM, rectified flow).
With the noise estimate ``eps(v, t) = (v - a D(v, t)) / s`` of the model at the upper time
``t`` and the DDIM move with the noise held fixed (:func:`~.steps.eps_move`),

    ``A = a' / a``,  ``B = s' - A s``  (the paper's ``a_t``, ``b_t`` for a VP process),

one sampling step ``t -> t'`` of the pair ``(x, y)`` is

    ``x_i = A x + B eps(y, t)``
    ``y_i = A y + B eps(x_i, t)``
    ``x' = p x_i + (1 - p) y_i``
    ``y' = p y_i + (1 - p) x'``

and every line is an affine map of one sequence given the other, so the inverse step runs
the lines backwards: ``y_i = (y' - (1 - p) x') / p``, ``x_i = (x' - (1 - p) y_i) / p``,
``y = (y_i - B eps(x_i, t)) / A``, ``x = (x_i - B eps(y, t)) / A``. Two model evaluations
per step. With ``leapfrog=True`` the roles of ``x`` and ``y`` swap on odd steps (step index
``i`` counted from the noisy end), as in the paper.

Inversion starts both sequences at the data; the :class:`~.base.Inversion`'s ``latent`` is
``x`` at the noisiest time and ``aux["y"]`` the second sequence there. Reconstruction
returns ``x`` at the clean end. The round trip is exact up to rounding, but the two
sequences drift apart during sampling unless the mixing damps the drift, and rounding
errors ride on that drift: measured relative round-trip errors on float32 mixtures with
``p = 0.93`` are 3e-4 (20 steps), 1-4e-5 (50) and 2-4e-7 (100), and 1e-3 on the digits
UNet at 10 steps; in float64 1e-14-9e-11 (3e-11-9e-11 on the digits models at 10-20
steps: the inverse amplifies a rounding error about 1e5-fold there). So by default
(``precision="double-double"``) the coupled state is kept as a double-float64 pair
(:mod:`.compensated`, about 32 significant digits) whatever the input's dtype: every
update is exact to ~1e-32, the network sees the leading float64 part (in its own dtype:
the adapter casts its input and output), so forward and inverse evaluate it at
bit-identical inputs, and the reconstruction is returned in the input's dtype. The latents
are float64; their low parts are kept in ``aux`` (``latent_lo``, ``y_lo``) so a saved
inversion reconstructs as exactly. ``precision="float64"`` keeps plain float64 states
(the 1e-11 level above); ``precision="input"`` computes in the input's dtype (pure
float32: use more steps or a smaller ``p``, 0.9: 7e-7 at 50 steps).

Paper defaults: ``p = 0.93`` ("values in [0.9, 0.97] generally effective for 50 steps"),
leapfrog on, 50 steps, guidance 3 for editing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..solvers.base import BoundModel
from .base import Inversion, Inverter, register, sampling_grid
from .compensated import Pair, divide, hi, lincomb
from .steps import (
    bind,
    check_precision,
    dtype_name,
    from_state,
    noise_at,
    progress_bar,
    state_parts,
    step_info,
    to_state,
)

__all__ = ["EDICT"]


def _coefficients(model: BoundModel, t: Tensor, t_next: Tensor) -> tuple[float, float]:
    a, s, _ = model.scalars(t)
    a1, s1, _ = model.scalars(t_next)
    r = a1 / a
    return r, s1 - r * s


@register
@dataclass(frozen=True)
class EDICT(Inverter):
    """EDICT (exact): coupled sequences with mixing weight ``p``; see the module doc.

    Options:
        p: the mixing weight, in ``(0, 1]`` (``1``: no mixing). Paper default 0.93.
        leapfrog: swap the roles of the two sequences on odd steps (paper default on).
        precision: ``"double-double"`` (default) keeps the two sequences as double-float64
            pairs whatever the input dtype, ``"float64"`` in float64 (see the module
            doc); ``"input"`` computes in the input's dtype.

    Per-step use (for editing code): :meth:`step` and :meth:`inverse_step` take and return
    the pair ``(x, y)`` (tensors, or :class:`~.compensated.Pair` states); ``i`` is the
    step's index from the noisy end of the grid.

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import rectified_flow
        >>> gmm = GaussianMixture.random(4, 3, process=rectified_flow(), seed=0)
        >>> x = gmm.sample(5, torch.Generator().manual_seed(1))
        >>> inv = invert(gmm, x, 20, "edict", p=0.93)
        >>> sorted(inv.aux), inv.nfe
        (['input_dtype', 'latent_lo', 'y', 'y_lo'], 40)
        >>> float((reconstruct(gmm, inv) - x).abs().max()) < 1e-9
        True
    """

    p: float = 0.93
    leapfrog: bool = True
    precision: str = "double-double"

    name = "edict"
    citation = (
        "Wallace, Gokul & Naik, EDICT: Exact Diffusion Inversion via Coupled "
        "Transformations, CVPR 2023"
    )
    exact = True

    def __post_init__(self) -> None:
        p = self.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise ValueError(f"p must be a number in (0, 1], got {p!r}")
        if not 0 < p <= 1:
            raise ValueError(
                f"p must be in (0, 1] (the inverse divides by p; 1 = no mixing), got {p!r}"
            )
        if not isinstance(self.leapfrog, bool):
            raise ValueError(f"leapfrog must be True or False, got {self.leapfrog!r}")
        check_precision(self.precision)

    def _swap(self, i: int) -> bool:
        return self.leapfrog and i % 2 == 1

    def step(
        self,
        model: Any,
        x: Pair | Tensor,
        y: Pair | Tensor,
        t: Tensor,
        t_next: Tensor,
        i: int = 0,
        *,
        cond: Any = None,
    ) -> tuple[Any, Any]:
        """One sampling step ``t -> t_next`` of the pair: returns ``(x', y')``.

        ``model`` is a denoiser (with ``cond``) or a bound model; ``i`` the step index.
        """
        bound = bind(model, cond)
        A, B = _coefficients(bound, t, t_next)
        p, q = self.p, 1 - self.p
        u, v = (y, x) if self._swap(i) else (x, y)
        u = lincomb((A, u), (B, noise_at(bound, hi(v), t)))
        v = lincomb((A, v), (B, noise_at(bound, hi(u), t)))
        u = lincomb((p, u), (q, v))
        v = lincomb((p, v), (q, u))
        return (v, u) if self._swap(i) else (u, v)

    def inverse_step(
        self,
        model: Any,
        x: Pair | Tensor,
        y: Pair | Tensor,
        t: Tensor,
        t_next: Tensor,
        i: int = 0,
        *,
        cond: Any = None,
    ) -> tuple[Any, Any]:
        """The exact inverse of :meth:`step`: the pair at ``t`` from the pair ``(x, y)``
        at ``t_next`` (same ``t``, ``t_next``, ``i`` as the step it undoes)."""
        bound = bind(model, cond)
        A, B = _coefficients(bound, t, t_next)
        p, q = self.p, 1 - self.p
        u, v = (y, x) if self._swap(i) else (x, y)
        v = divide(lincomb((1.0, v), (-q, u)), p)
        u = divide(lincomb((1.0, u), (-q, v)), p)
        v = divide(lincomb((1.0, v), (-B, noise_at(bound, hi(u), t))), A)
        u = divide(lincomb((1.0, u), (-B, noise_at(bound, hi(v), t))), A)
        return (v, u) if self._swap(i) else (u, v)

    def invert(
        self,
        model: Any,
        x: Tensor,
        grid: Tensor,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Inversion:
        grid = sampling_grid(model, grid)
        bound = BoundModel(model, cond, grid)
        times = grid.unbind()
        n = len(times) - 1
        input_dtype = dtype_name(x)
        x = to_state(x, self.precision)
        y = x
        bar = progress_bar(progress, n, "invert edict")
        try:
            for i in range(n - 1, -1, -1):
                x_prev, y = self.inverse_step(bound, x, y, times[i], times[i + 1], i)
                if callback is not None:
                    callback(step_info(n - 1 - i, times[i + 1], times[i], x, x_prev))
                x = x_prev
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        aux = {**state_parts(x, "latent"), **state_parts(y, "y"), "input_dtype": input_dtype}
        return Inversion(latent=hi(x), grid=grid, method=self, cond=cond, aux=aux, nfe=bound.nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        if "y" not in inversion.aux:
            raise ValueError("an EDICT inversion needs aux['y'] (the second sequence's latent)")
        grid = inversion.grid
        bound = BoundModel(model, cond, grid)
        times = grid.unbind()
        n = len(times) - 1
        aux = inversion.aux
        x = to_state(inversion.latent, self.precision, aux.get("latent_lo"))
        y = to_state(aux["y"].to(inversion.latent), self.precision, aux.get("y_lo"))
        bar = progress_bar(progress, n, "edict")
        try:
            for i in range(n):
                x_next, y = self.step(bound, x, y, times[i], times[i + 1], i)
                if callback is not None:
                    callback(step_info(i, times[i], times[i + 1], x, x_next))
                x = x_next
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return from_state(x, inversion.aux.get("input_dtype"))
