"""Nonlinear operators: ``A`` only (``linear = False``); gradients through autograd.

* Phase retrieval (Fourier magnitudes, e.g. Fienup, *Appl. Opt.* 21(15), 1982):
  ``y = |F pad(x)|`` with an orthonormal 2-D DFT of the zero-padded image.
* A low-light / HDR tone curve: exposure ``gain``, a power law ``gamma`` and clipping at
  the top of the data range (saturation), on data in ``data_range``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Operator, register

__all__ = ["PhaseRetrieval", "ToneCurve"]


@register("phase_retrieval")
class PhaseRetrieval(Operator):
    """``y = |F pad(x)|``: Fourier magnitudes of ``[C, H, W]`` images zero-padded to
    ``oversample`` times their size (``oversample >= 2`` makes the problem well posed up
    to the trivial ambiguities: shifts, flips, global sign).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import PhaseRetrieval
        >>> op = PhaseRetrieval((1, 4, 4))
        >>> x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
        >>> op.out_shape, bool(torch.allclose(op(x), op(-x)))  # blind to the global sign
        ((1, 8, 8), True)
    """

    linear = False

    def __init__(self, in_shape: Sequence[int], oversample: float = 2.0) -> None:
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != 3:
            raise ValueError(f"PhaseRetrieval needs in_shape (C, H, W); got {shape}")
        if oversample < 1:
            raise ValueError(f"oversample must be >= 1; got {oversample}")
        self.oversample = float(oversample)
        self.in_shape = shape
        self.out_shape = (
            shape[0],
            round(shape[1] * self.oversample),
            round(shape[2] * self.oversample),
        )

    def _A(self, x: Tensor) -> Tensor:
        h, w = self.out_shape[1:]
        xp = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
        return torch.fft.fft2(xp, norm="ortho").abs()

    @classmethod
    def example(cls) -> PhaseRetrieval:
        return cls((1, 3, 4))


@register("tone_curve")
class ToneCurve(Operator):
    """Low-light / HDR tone curve on data in ``data_range = (lo, hi)``:

    ``u = (x - lo) / (hi - lo)``, ``y = lo + (hi - lo) min(gain max(u, 0)^gamma, 1)``.

    A low-light capture is ``gain < 1`` (often with ``gamma > 1``); an over-exposed (HDR)
    one is ``gain > 1``, where the clipping at ``hi`` loses the highlights.

    Example:
        >>> import torch
        >>> from diffusolve.inverse import ToneCurve
        >>> op = ToneCurve((1, 1, 3), gain=2.0, gamma=1.0, data_range=(0.0, 1.0))
        >>> op(torch.tensor([[[[0.1, 0.4, 0.8]]]], dtype=torch.float64)).squeeze().tolist()
        [0.2, 0.8, 1.0]
    """

    linear = False

    def __init__(
        self,
        in_shape: Sequence[int],
        gain: float = 0.25,
        gamma: float = 1.5,
        data_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        if gain <= 0 or gamma <= 0:
            raise ValueError(f"gain and gamma must be positive; got {gain}, {gamma}")
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise ValueError(f"data_range must be (lo, hi) with hi > lo; got {data_range}")
        self.gain, self.gamma, self.data_range = float(gain), float(gamma), (lo, hi)
        self.in_shape = self.out_shape = tuple(int(s) for s in in_shape)

    def _A(self, x: Tensor) -> Tensor:
        lo, hi = self.data_range
        u = (x - lo) / (hi - lo)
        pos = u > 0  # the double `where` keeps the gradient finite (zero) where u <= 0
        p = torch.where(pos, torch.where(pos, u, torch.ones_like(u)) ** self.gamma, 0.0)
        return lo + (hi - lo) * (self.gain * p).clamp_max(1.0)

    def describe(self) -> str:
        return f"ToneCurve(gain={self.gain}, gamma={self.gamma}, {self.in_shape})"

    @classmethod
    def example(cls) -> ToneCurve:
        return cls((2, 3, 3), gain=1.5, gamma=1.5)

    @classmethod
    def examples(cls) -> list[ToneCurve]:
        return [cls.example(), cls((1, 2, 2), gain=0.3, gamma=0.8, data_range=(0.0, 1.0))]
