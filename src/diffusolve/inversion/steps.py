"""Shared pieces of inverters: the DDIM move in alpha/sigma for any process."""

from __future__ import annotations

from torch import Tensor

__all__ = ["ddim_move", "eps_from"]


def eps_from(x: Tensor, x0: Tensor, a: float, s: float) -> Tensor:
    """The noise implied by an x0 estimate at ``x = a x0 + s eps``."""
    return (x - a * x0) / s


def ddim_move(x: Tensor, x0: Tensor, a: float, s: float, a1: float, s1: float) -> Tensor:
    """The deterministic DDIM move from level ``(a, s)`` to ``(a1, s1)`` with the x0
    estimate ``x0``: ``a1 x0 + s1 (x - a x0) / s``. It is affine in ``x`` for a fixed
    ``x0``, which is what exact inversions invert; up (``s1 > s``) or down alike."""
    return a1 * x0 + (s1 / s) * (x - a * x0)
