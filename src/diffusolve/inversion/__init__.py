"""Inversion: data -> the noise that regenerates it, exactly or accurately.

``invert(model, x, steps, method)`` returns an :class:`Inversion`;
``reconstruct(model, inversion, cond=...)`` regenerates (under another ``cond``: an edit).
See :mod:`diffusolve.inversion.base` for the grid convention and the inverter contract.

Example:
    >>> import torch
    >>> from diffusolve.inversion import invert, reconstruct
    >>> from diffusolve.models import Gaussian
    >>> from diffusolve.process import ddpm
    >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=ddpm())
    >>> x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> inv = invert(prior, x, 20, "edict")
    >>> float((reconstruct(prior, inv) - x).abs().max()) < 1e-10
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import (
    INVERTERS,
    Inversion,
    Inverter,
    get_inverter,
    list_inverters,
    load_inversion,
    register,
    sampling_grid,
)

__all__ = ["invert", "reconstruct", "Inversion", "Inverter", "INVERTERS", "register"]
__all__ += ["get_inverter", "list_inverters", "load_inversion", "sampling_grid"]

_NOT_GIVEN: Any = object()


def invert(
    model: Any,
    x: Tensor,
    steps: int | Tensor = 50,
    method: str | Inverter = "ddim",
    *,
    cond: Any = None,
    grid_kind: str = "time_uniform",
    t_start: float | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    stats: dict[str, Any] | None = None,
    **options: Any,
) -> Inversion:
    """Invert ``x`` (the clean end of the grid) to the latent at the grid's noisiest time.

    Args:
        model: a denoiser (``model(x, t, cond) -> x0``), possibly classifier-free guided.
        x: the data batch; not modified.
        steps: an int number of steps (a ``grid_kind`` grid from ``t_start``/``t_max`` to
            ``t_min``) or the decreasing sampling grid itself.
        method: an inverter name (see :func:`list_inverters`), a deterministic solver name
            (run on the reversed grid) or an :class:`Inverter`.
        cond: the condition of every model call (the source prompt / label).
        dtype: the compute dtype (``torch.float64`` for exact round trips).
        stats: if given, filled with ``nfe`` and ``method``.
        **options: the method's options (e.g. ``p=0.93`` for EDICT).
    """
    if not isinstance(x, Tensor):
        raise TypeError("x must be a torch.Tensor")
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension")
    inverter = get_inverter(method, **options)
    grid = sampling_grid(model, steps, grid_kind, t_start)
    if dtype is not None:
        x = x.to(dtype)
    inv = inverter.invert(model, x, grid, cond=cond, progress=progress, callback=callback)
    if not torch.isfinite(inv.latent).all():
        raise FloatingPointError(
            f"{inverter.name} inversion produced non-finite values; try dtype=torch.float64 "
            "or more steps."
        )
    if stats is not None:
        stats.update(nfe=inv.nfe, method=inverter.name)
    return inv


def reconstruct(
    model: Any,
    inversion: Inversion,
    *,
    cond: Any = _NOT_GIVEN,
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """Regenerate from an inversion: the state at the clean end of its grid.

    ``cond`` defaults to the inversion's own condition (a reconstruction); another
    condition regenerates under it (an edit that keeps what the method preserves).
    """
    if not isinstance(inversion, Inversion):
        raise TypeError(f"reconstruct needs an Inversion (from invert), got {type(inversion)}")
    c = inversion.cond if cond is _NOT_GIVEN else cond
    return inversion.method.reconstruct(
        model, inversion, cond=c, progress=progress, callback=callback
    )
