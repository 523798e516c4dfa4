"""Shared pieces of inverters: the DDIM move in alpha/sigma for any process."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from ..solvers.base import BoundModel
from .compensated import Pair, hi

__all__ = ["ddim_move", "eps_from", "eps_move", "bind", "noise_at", "progress_bar", "step_info"]


def eps_from(x: Tensor, x0: Tensor, a: float, s: float) -> Tensor:
    """The noise implied by an x0 estimate at ``x = a x0 + s eps``."""
    return (x - a * x0) / s


def ddim_move(x: Tensor, x0: Tensor, a: float, s: float, a1: float, s1: float) -> Tensor:
    """The deterministic DDIM move from level ``(a, s)`` to ``(a1, s1)`` with the x0
    estimate ``x0``: ``a1 x0 + s1 (x - a x0) / s``. It is affine in ``x`` for a fixed
    ``x0``, which is what exact inversions invert; up (``s1 > s``) or down alike."""
    return a1 * x0 + (s1 / s) * (x - a * x0)


def eps_move(x: Tensor, eps: Tensor, a: float, s: float, a1: float, s1: float) -> Tensor:
    """The DDIM move from ``(a, s)`` to ``(a1, s1)`` with the *noise* estimate ``eps``
    held fixed: ``a1 (x - s eps) / a + s1 eps = (a1/a) x + (s1 - a1 s / a) eps``.

    Affine in ``x`` for a fixed ``eps`` with slope ``a1 / a > 0``, so it stays invertible
    when ``s`` or ``s1`` is 0 (EDICT's form; the prompt-to-prompt inversion step)."""
    r = a1 / a
    return torch.add(x * r, eps, alpha=s1 - r * s)


def bind(model: Any, cond: Any = None) -> BoundModel:
    """``model`` as a :class:`~diffusolve.solvers.base.BoundModel` with ``cond`` bound
    (a bound model is returned as it is, so a loop can share one NFE counter)."""
    if isinstance(model, BoundModel):
        return model
    if not hasattr(model, "process"):
        raise TypeError(
            f"model must be a denoiser with a .process (model(x, t, cond) -> x0), got "
            f"{type(model).__name__}"
        )
    return BoundModel(model, cond)


def noise_at(model: BoundModel, x: Tensor, t: Tensor) -> Tensor:
    """The model's noise estimate ``(x - a D(x, t)) / s`` at ``(x, t)``; ``s`` must be > 0."""
    a, s, _ = model.scalars(t)
    if s <= 0:
        raise ValueError(
            f"the noise estimate at t={float(t):g} divides by sigma = {s:g}; the model can "
            "only be evaluated where sigma > 0"
        )
    return (x - a * model(x, t)) / s


def progress_bar(progress: bool | None, total: int, desc: str) -> Any:
    """A tqdm bar (``progress=None``: when stderr is a terminal), or ``None``."""
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def step_info(i: int, t: Tensor, t_next: Tensor, x: Tensor, x_next: Tensor) -> dict[str, Any]:
    """The dict a callback receives after a step."""
    return {"i": i, "t": t, "t_next": t_next, "x": x, "x_next": x_next}


#: where an exact scheme keeps its state: a double-float64 pair, float64, or the input's dtype
PRECISIONS = ("double-double", "float64", "input")


def check_precision(precision: str) -> None:
    """Refuse a ``precision`` option outside :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def to_state(x: Tensor, precision: str, lo: Tensor | None = None) -> Pair | Tensor:
    """``x`` in the form an exact scheme computes its state in (see :data:`PRECISIONS`).

    Rounding errors of an exact round trip grow with the steps and the guidance (they ride
    on EDICT's drift between its sequences, and accumulate in BDIA's and BELM's two-state
    recursions), so exact schemes keep their state as a double-float64
    :class:`~.compensated.Pair` by default (``lo``: its stored low part, if any), or in
    float64; the network runs in its own dtype (the adapters cast its input and output)."""
    if precision == "double-double":
        return Pair.of(x, lo)
    return x.to(torch.float64) if precision == "float64" else x


def state_parts(x: Pair | Tensor, name: str) -> dict[str, Tensor]:
    """An inversion's aux entries for a state: ``{name: hi}`` plus ``{name_lo: lo}`` for a
    pair (``name`` ``"latent"`` gives only the low part; the latent is stored apart)."""
    if isinstance(x, Pair):
        parts = {f"{name}_lo": x.lo}
        if name != "latent":
            parts[name] = x.hi
        return parts
    return {} if name == "latent" else {name: x}


def dtype_name(x: Tensor) -> str:
    """``"float32"`` for a float32 tensor (JSON-able, stored in an inversion's aux)."""
    return str(x.dtype).removeprefix("torch.")


def from_state(x: Pair | Tensor, input_dtype: str | None) -> Tensor:
    """A reconstruction in the dtype of the inverted input (``input_dtype`` from aux)."""
    x = hi(x)
    dtype = getattr(torch, str(input_dtype), None) if input_dtype else None
    return x.to(dtype) if isinstance(dtype, torch.dtype) else x
