"""Denoiser wrappers that change the x0 estimate: one way to transform x0 for every solver.

Each wrapper has the model's signature (``model(x, t, cond) -> x0``) and carries its
process, so any solver sees the transformed estimate. Dynamic thresholding is
:class:`~diffusolve.models.DynamicThresholding`; :class:`MapX0` applies any function and
:class:`Clamp` clips to a range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import Denoiser

__all__ = ["MapX0", "Clamp"]


class MapX0(Denoiser):
    """Apply ``fn`` to every x0 estimate of ``model``.

    Example:
        >>> import torch
        >>> from diffusolve.models import from_callable
        >>> from diffusolve.process import vp_linear
        >>> m = from_callable(lambda x, t: 3 * x, vp_linear(), "x0")
        >>> float(MapX0(m, torch.tanh)(torch.ones(1, 2, dtype=torch.float64), 0.5)[0, 0]) == math.tanh(3.0)
        True
    """

    def __init__(self, model: Any, fn: Callable[[Tensor], Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (x0 -> x0), got {type(fn).__name__}")
        self.model = model
        self.process = model.process
        self.fn = fn

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.fn(self.model(x, t, cond))


class Clamp(Denoiser):
    """Clip every x0 estimate of ``model`` to ``[lo, hi]`` (e.g. images in ``[-1, 1]``).

    Example:
        >>> import torch
        >>> from diffusolve.models import from_callable
        >>> from diffusolve.process import vp_linear
        >>> m = from_callable(lambda x, t: 3 * x, vp_linear(), "x0")
        >>> Clamp(m)(torch.tensor([[1.0, -1.0]]), 0.5).tolist()
        [[1.0, -1.0]]
    """

    def __init__(self, model: Any, lo: float = -1.0, hi: float = 1.0) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"Clamp needs finite lo < hi, got lo={lo}, hi={hi}")
        self.model = model
        self.process = model.process
        self.lo, self.hi = float(lo), float(hi)

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return torch.clamp(self.model(x, t, cond), self.lo, self.hi)
