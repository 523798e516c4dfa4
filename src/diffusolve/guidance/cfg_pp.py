"""CFG++ (Chung, Kim, Park, Nam & Ye, "CFG++: Manifold-constrained Classifier Free Guidance
for Diffusion Models", arXiv 2406.08070, 2024) as classifier-free guidance with a
step-dependent scale.

CFG++ takes ``lambda`` in ``[0, 1]`` (paper: 0.2-0.8 for text-to-image DDIM; 0 is the
unconditional model, 1 the conditional Tweedie estimate) and renoises the DDIM step with the
*unconditional* noise:

    x0^lam = x0_u + lam (x0_c - x0_u),     x' = alpha' x0^lam + sigma' eps_u,
    eps_u = (x - alpha x0_u) / sigma.

Derivation of the equivalent CFG scale. A DDIM step of CFG at scale ``w`` is
``x' = (sigma'/sigma) x + (alpha' - sigma' alpha / sigma) x0^w``. Writing both steps with
``d = x0_c - x0_u`` and ``st = sigma / alpha``, the ``x`` and ``x0_u`` coefficients agree and the
``d`` coefficients are ``(alpha' - sigma' alpha / sigma) w`` and ``alpha' lam``, so the steps
are equal exactly when

    w = lam * alpha' / (alpha' - sigma' alpha / sigma) = lam * st / (st - st').

So in the x0-denoiser contract CFG++ is CFG whose scale depends on the next time ``t'`` of the
sampling grid: the wrapper needs the grid. With ``solver="ddim"`` on that grid it reproduces the
CFG++ DDIM loop exactly (tested in float64 to 1e-12). At or below the grid's last time (the
final denoising evaluation) there is no next time and ``st' = 0``: ``w = lam``, the CFG++ x0.

Other solvers and times off the grid (an approximation): for an evaluation at ``t`` the next
grid time strictly below ``t`` is used, so a multistep solver (``dpmpp_2m``, ...) sees the same
per-step estimate CFG++ would use for its DDIM step, and a singlestep solver's intermediate
stages use the scale of the step they lie in. Neither reproduces a published CFG++ variant
of that solver; ``w`` grows like ``st / (st - st')`` on fine grids (``w`` is large where the
steps are short), which is what the renoising with ``eps_u`` amounts to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import CFGRule, Guided, as_scale, next_grid_time, per_sample

__all__ = ["CFGPlusPlusRule", "CFGPlusPlus", "cfgpp_scale"]


def cfgpp_scale(process: Any, grid: Tensor, t: Tensor, lam: Any) -> Tensor:
    """The CFG scale ``lam * st / (st - st')`` equivalent to CFG++ at ``t`` on ``grid``
    (``st' = 0`` where ``t`` has no grid time below it). Float64, the shape of ``t``
    (``[B]`` if ``lam`` is per sample)."""
    t_next, has = next_grid_time(grid, t)
    st = process.sigma_tilde(t)
    st1 = torch.where(has, process.sigma_tilde(torch.where(has, t_next, t)), torch.zeros_like(st))
    ratio = st / (st - st1)
    if isinstance(lam, Tensor):
        return per_sample(lam, lam.numel()) * ratio
    return lam * ratio


class CFGPlusPlusRule(CFGRule):
    """The CFG++ rule: CFG at the scale :func:`cfgpp_scale` (``lam`` float or ``[B]`` in
    ``[0, 1]``) on the decreasing sampling ``grid``."""

    def __init__(self, lam: Any, grid: Tensor) -> None:
        self.scale = as_scale(lam, name="the CFG++ lambda", high=1.0)
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("grid must be the decreasing sampling grid (at least 2 times)")
        self.grid = grid

    def weights(self, t: Tensor, b: int, process: Any) -> Any:
        w = cfgpp_scale(process, self.grid, t, self.scale)
        if w.ndim == 0 and not isinstance(self.scale, Tensor):
            return float(w)
        return per_sample(w, b)

    def __repr__(self) -> str:
        return f"CFGPlusPlusRule(lam={self.scale}, steps={self.grid.numel() - 1})"


class CFGPlusPlus(Guided):
    """CFG++ (Chung et al. 2024) for the sampling ``grid``; see the module docstring.

    Args:
        model: the base denoiser (label, caption or analytic class-conditional model).
        lam: ``lambda`` in ``[0, 1]``, a float or per sample ``[B]`` (paper: 0.2-0.8).
        grid: the decreasing float64 grid the solver will run (``make_grid(...)``); exact
            with ``solver="ddim"`` on this grid.
        null_cond: the unconditional input when the model does not know it.
        terms: additional guidance terms sharing the network call.

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.guidance import CFGPlusPlus
        >>> from diffusolve.models.analytic.conditional import ClassConditionalMixture
        >>> from diffusolve.process import ddpm, make_grid
        >>> m = ClassConditionalMixture.random(2, process=ddpm(), seed=0)
        >>> grid = make_grid(m.process, 10, "time_uniform")
        >>> x = m.process.prior_sample((3, 2), noise=0).double()
        >>> diffusolve.sample(CFGPlusPlus(m, 0.6, grid=grid), x, grid, "ddim", cond=1).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, model: Any, lam: Any, *, grid: Tensor, null_cond: Any = None, terms: Any = ()
    ) -> None:
        super().__init__(model, CFGPlusPlusRule(lam, grid), terms, null_cond=null_cond)
