"""Single-step stage helpers: intermediate times and first-order sub-steps.

A single-step (Runge-Kutta-like) exponential integrator evaluates the model at
intermediate times ``s_i = t(lambda_s + r_i h)`` inside a step ``s -> t``; each stage
starts from a first-order (DDIM) sub-step ``s -> s_i`` or a higher-order combination of the
outputs so far.
"""

from __future__ import annotations

from torch import Tensor

from .base import BoundModel
from .expint import ExpStep

__all__ = ["sub_time", "Stage"]


def sub_time(model: BoundModel, step: ExpStep, r: float) -> Tensor:
    """The intermediate time ``t(lambda_s + r h)`` of a step (float64 0-d tensor)."""
    return model.process.t_of_lambda(step.lam_s + r * step.h)


class Stage:
    """One stage of a step: its time, its frame from the step's start, and its output.

    ``Stage.at(model, step, s_scalars, r, prediction)`` places a stage at ratio ``r`` of the
    step; ``frame`` is the exponential-integrator frame from the step's start to it.
    """

    __slots__ = ("t", "frame")

    def __init__(self, t: Tensor, frame: ExpStep) -> None:
        self.t, self.frame = t, frame

    @classmethod
    def at(
        cls,
        model: BoundModel,
        step: ExpStep,
        s: tuple[float, float, float],
        r: float,
        prediction: str,
    ) -> Stage:
        t = sub_time(model, step, r)
        return cls(t, ExpStep(s, model.scalars(t), prediction))
