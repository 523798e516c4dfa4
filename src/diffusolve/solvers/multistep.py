"""Multistep history, the warm-up order and the one ``lower_order_final`` rule.

A multistep solver keeps the model outputs of past grid times in a :class:`History`: an
immutable tuple of :class:`Record` (time, lambda, output), newest last. Pushing returns a
new history, so a step never mutates its input state. The order of step ``i`` is the
solver's order limited by the history (warm-up) and, optionally, near the end of the grid
by :func:`final_order_cap`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import BoundModel, Solver, StepContext, check_choice

__all__ = [
    "MultistepSolver",
    "Record",
    "History",
    "MultistepState",
    "LOWER_ORDER_FINAL",
    "LOWER_ORDER_FINAL_BELOW",
    "check_lower_order_final",
    "final_order_cap",
    "step_order",
]

#: diffusers applies ``lower_order_final`` only on grids with fewer steps than this
LOWER_ORDER_FINAL_BELOW = 15
LOWER_ORDER_FINAL = (False, True, "grid")
_NO_CAP = 1 << 30


@dataclass(frozen=True, slots=True)
class Record:
    """One stored model output: its time, its lambda and the output (x0 or epsilon)."""

    t: float
    lam: float
    out: Tensor


class History(tuple):
    """An immutable sequence of :class:`Record`, newest last."""

    __slots__ = ()

    def push(self, record: Record, keep: int) -> History:
        """A new history with ``record`` appended, keeping the newest ``keep`` records."""
        return History((*self, record)[-keep:] if keep > 0 else ())

    def newest(self, k: int) -> Record:
        """The ``k``-th newest record (``0``: the newest)."""
        return self[-1 - k]


@dataclass(frozen=True, slots=True)
class MultistepState:
    """The state of a multistep solver: its history of model outputs."""

    hist: History = History()


@dataclass(frozen=True)
class MultistepSolver(Solver):
    """Base of the solvers whose state is a :class:`MultistepState` (one history)."""

    multistep = True

    def init(self, model: BoundModel, x: Tensor) -> MultistepState:
        return MultistepState()


def check_lower_order_final(value: bool | str) -> bool | str:
    """Validate a ``lower_order_final`` option (``False``, ``True`` or ``"grid"``)."""
    check_choice("lower_order_final", value, LOWER_ORDER_FINAL)
    return value


def final_order_cap(ctx: StepContext, mode: bool | str = True) -> int:
    """The largest order ``lower_order_final=mode`` allows at step ``ctx.i``.

    diffusers' rule: on a schedule of fewer than 15 steps, step ``i`` uses at most the
    number of steps left (``n - i``), so the last step is first order and the one before at
    most second order. With ``mode=True`` and a final policy that evaluates the model once
    more (``"denoise"`` or ``"zero"``), that last evaluation is the step diffusers takes to
    sigma = 0 (``final_sigmas_type="zero"``), so it counts as the last step and the last
    grid step may use order 2. ``mode="grid"`` counts grid steps only. ``False``: no cap.
    Returns a large number when no cap applies.

    Example:
        >>> [final_order_cap(StepContext(i, 5, "none")) for i in range(5)]
        [5, 4, 3, 2, 1]
    """
    if not mode:
        return _NO_CAP
    extra = 1 if (mode is True and ctx.final in ("denoise", "zero")) else 0
    n = ctx.n + extra
    if n >= LOWER_ORDER_FINAL_BELOW:
        return _NO_CAP
    return max(1, n - ctx.i)


def step_order(order: int, n_hist: int, ctx: StepContext, lower_order_final: bool | str) -> int:
    """The order of the current step: ``order``, limited by the ``n_hist`` stored outputs
    (warm-up) and by :func:`final_order_cap`; at least 1."""
    q = min(order, n_hist)
    if lower_order_final:
        q = min(q, final_order_cap(ctx, lower_order_final))
    return max(q, 1)
