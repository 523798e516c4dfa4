"""DDCM virtual inversion (InfEdit; Xu, Huang, Kordi, Tsai, Baraniuk, Jin, CVPR 2024).

There is no inversion: the source branch knows its clean end ``x0`` (the data) at every
step. Both branches start from the same noisy state ``x_s = x_t = a_0 x0 + s_0 z`` at
``grid[0]`` (``z`` seeded), and each step from level ``(a, s)`` to ``(a1, s1)`` computes
the noise predictions ``e_s = eps(x_s, t, source)``, ``e_t = eps(x_t, t, target)`` and

    e_c   = (x_s - a x0) / s,
    x0_t  = x0 + ((x_t - x_s) - s (e_t - e_s)) / a,
    x_s  <- a1 x0   + sqrt(s1^2 - sigma^2) (e_t - e_s + e_c) + sigma z_i,
    x_t  <- a1 x0_t + sqrt(s1^2 - sigma^2) (e_t - e_s + e_c) + sigma z_i,

with ``sigma^2 = eta s1^2`` (the consistency-model step of the paper, written for any
process ``x = a x0 + s eps``) and ``z_i`` fresh seeded noise. The source branch uses ``x0``
in place of its estimate. The last step returns the target's ``x0_t``, as the paper's
latent-consistency pipeline returns its final x0 prediction. With target = source the two
branches coincide (``x_t = x_s``, ``e_t = e_s``) and ``x0_t = x0``: the reconstruction is
exact by construction, whatever ``eta``.

The model's guidance scale guides the target branch; ``source_scale`` (default: the same)
guides the source branch (the paper's PIE-Bench run uses 1 for the source and 2.3 for the
target). Paper defaults: ``eta = 1`` in the PIE-Bench script (``0.1`` in its demo), 12
steps (10 in the demo) from strength 0.7; ``aux["data"]`` stores ``x0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..process.base import seeded_normal
from ..solvers.base import BoundModel
from .base import Inversion, Inverter, register
from .fixed_point import Steps, _check_pos
from .null_text import guided_parts, same_cond

__all__ = ["DDCMInversion", "ddcm_edit"]

#: seed stride between the per-step noises (the initial noise uses ``seed + b``)
_STRIDE = 1_000_003


def _noise(seed: int, step: int, like: Tensor) -> Tensor:
    """Seeded standard normal noise of ``like``'s shape (sample ``b`` of step ``k`` from its
    own generator, so independent of dtype, device and batch layout)."""
    b = like.shape[0]
    base = seed + _STRIDE * step
    return seeded_normal([base + j for j in range(b)], tuple(like.shape), like.dtype, like.device)


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _check_eta(eta: Any) -> None:
    _check_pos("eta", eta, zero=True)
    if eta > 1:
        raise ValueError(f"eta must be in [0, 1] (sigma^2 = eta * s1^2), got {eta!r}")


@register
@dataclass(frozen=True)
class DDCMInversion(Inverter):
    """DDCM virtual inversion (see the module docstring for the equations).

    ``invert`` evaluates no model: the latent is the data noised to ``grid[0]`` with seeded
    noise, and ``aux["data"]`` keeps the data. ``reconstruct`` runs the two branches; with
    the inversion's condition it returns the data exactly, with another condition the edit
    (:func:`ddcm_edit`).

    Args:
        eta: the stochasticity of the step, in ``[0, 1]`` (PIE-Bench: 1).
        seed: the seed of the initial and per-step noise.
        source_scale: the guidance scale of the source branch (default ``None``: the
            model's own scale; only for classifier-free-guidance models).

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.inversion import invert, reconstruct
        >>> model = diffusolve.load("digits", guidance=2.0)
        >>> x = torch.rand(1, 1, 16, 16) * 2 - 1
        >>> with torch.no_grad():
        ...     inv = invert(model, x, 6, "ddcm", cond=4)
        ...     same = reconstruct(model, inv)
        ...     edit = reconstruct(model, inv, cond=9)
        >>> bool(torch.equal(same, x)), edit.shape
        (True, torch.Size([1, 1, 16, 16]))
    """

    name: ClassVar[str] = "ddcm"
    citation: ClassVar[str] = (
        "Xu, Huang, Kordi, Tsai, Baraniuk, Jin. Inversion-Free Image Editing with Natural "
        "Language (InfEdit). CVPR 2024."
    )
    exact: ClassVar[bool] = True

    eta: float = 1.0
    seed: int = 0
    source_scale: float | None = None

    def __post_init__(self) -> None:
        _check_eta(self.eta)
        _check_seed(self.seed)
        if self.source_scale is not None:
            _check_pos("source_scale", self.source_scale, zero=True)

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
        a, s, _ = BoundModel(model, cond, grid).scalars(grid[0])
        latent = a * x + s * _noise(self.seed, 0, x)
        return Inversion(latent, grid, self, cond=cond, aux={"data": x}, nfe=0)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        data = inversion.aux.get("data")
        if not isinstance(data, Tensor):
            raise ValueError("this inversion has no data (aux['data']); invert with method='ddcm'")
        return _ddcm(
            model,
            data.to(inversion.latent),
            inversion.latent,
            inversion.cond,
            cond,
            inversion.grid,
            self,
            progress,
            callback,
        )


def _ddcm(
    model: Any,
    x0: Tensor,
    latent: Tensor,
    source_cond: Any,
    target_cond: Any,
    grid: Tensor,
    opts: DDCMInversion,
    progress: bool | None,
    callback: Callable[[dict[str, Any]], None] | None,
) -> Tensor:
    parts = guided_parts(model, method="ddcm", required=False)
    if opts.source_scale is not None and not parts.guided_model:
        raise ValueError(
            "source_scale needs a classifier-free-guidance model; this model is unguided"
        )
    b = x0.shape[0]
    cs = parts.net_cond(source_cond, b, x0.device)
    ct = parts.net_cond(target_cond, b, x0.device)
    same = same_cond(source_cond, target_cond) and (
        opts.source_scale is None or opts.source_scale == parts.scale
    )
    scalars = BoundModel(model, source_cond, grid).scalars
    steps = Steps(grid, up=False, desc="ddcm", progress=progress, callback=callback)
    x_s = latent
    x_t = latent
    out = x0
    n = len(steps)
    for i, t, t_next in steps:
        a, s, _ = scalars(t)
        a1, s1, _ = scalars(t_next)
        e_s = (x_s - a * parts.guided(x_s, t, cs, scale=opts.source_scale)) / s
        if same and torch.equal(x_t, x_s):
            e_t = e_s  # the same branch: the same prediction
        else:
            e_t = (x_t - a * parts.guided(x_t, t, ct)) / s
        e_c = (x_s - a * x0) / s
        x0_t = x0 + ((x_t - x_s) - s * (e_t - e_s)) / a
        if i == n - 1:
            steps.report(i, x_t, x0_t, parts.nfe)
            out = x0_t
            break
        var = opts.eta * s1 * s1
        direction = math.sqrt(s1 * s1 - var) * (e_t - e_s + e_c)
        x_s_next = a1 * x0 + direction
        x_t_next = a1 * x0_t + direction
        if var > 0:
            z = math.sqrt(var) * _noise(opts.seed, i + 1, x0)
            x_s_next = x_s_next + z
            x_t_next = x_t_next + z
        steps.report(i, x_t, x_t_next, parts.nfe)
        x_s, x_t = x_s_next, x_t_next
    return out


def ddcm_edit(
    model: Any,
    x0: Tensor,
    source_cond: Any,
    target_cond: Any,
    grid: Tensor,
    eta: float = 1.0,
    seed: int = 0,
    *,
    source_scale: float | None = None,
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """Edit ``x0`` from ``source_cond`` to ``target_cond`` by DDCM virtual inversion on the
    decreasing sampling ``grid`` (its ``grid[0]`` is the edit strength); returns the target.

    The same as ``reconstruct(model, invert(model, x0, grid, "ddcm", cond=source_cond,
    eta=eta, seed=seed), cond=target_cond)``; with ``target_cond == source_cond`` it
    returns ``x0`` exactly.

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.inversion import sampling_grid
        >>> from diffusolve.inversion.ddcm import ddcm_edit
        >>> model = diffusolve.load("digits", guidance=2.0)
        >>> grid = sampling_grid(model, 6, t_start=700.0)
        >>> x = torch.rand(1, 1, 16, 16) * 2 - 1
        >>> with torch.no_grad():
        ...     y = ddcm_edit(model, x, 4, 9, grid)
        >>> y.shape
        torch.Size([1, 1, 16, 16])
    """
    from .base import sampling_grid

    _check_eta(eta)
    _check_seed(seed)
    opts = DDCMInversion(eta=eta, seed=seed, source_scale=source_scale)
    grid = sampling_grid(model, grid)
    inv = opts.invert(model, x0, grid, cond=source_cond)
    return _ddcm(model, x0, inv.latent, source_cond, target_cond, grid, opts, progress, callback)
