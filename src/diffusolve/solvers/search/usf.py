"""USF: a multistep exponential integrator whose every step is a decision.

After the unified sampling framework of Liu, Ning, Yang & Wang ("A Unified Sampling
Framework for Solver Searching of Diffusion Probabilistic Models", ICLR 2024; its search is
S3): each step ``t_i -> t_{i+1}`` chooses

* ``prediction``: the exponential integrator in data (``x0``) or noise (``eps``)
  prediction (:class:`~diffusolve.solvers.expint.ExpStep`);
* ``order``: the Taylor order of the predictor, from the newest ``order`` model outputs
  (UniP-``order`` of UniPC; order 1 is DDIM, order 2 in ``bh2`` is DPM-Solver(++) 2M);
* ``corrector``: ``0`` (none) or the order ``c`` of a UniC corrector applied to the point
  this step predicts, at the next step, with the model output the next step evaluates there
  anyway (no extra evaluation; UniC-``c`` combines the newest ``c`` outputs and the new
  one). The last grid step is never corrected: that would need one more evaluation;
  ``final="denoise"`` / ``"zero"`` evaluate the model at the predicted point;
* ``variant``: UniPC's ``B(h)`` (``"bh1"``: ``h``, ``"bh2"``: ``expm1(h)``), which sets the
  weights of the finite differences;
* ``scale``: USF's relaxation coefficient, a factor on the predictor's finite-difference
  (derivative) terms (1: the plain estimate). Any other value makes the step first order
  in the asymptotic sense; at a handful of steps a searched scale can still cut the error
  (the steps are far from the asymptotic regime).

The coefficients come from the shared parts (:class:`~diffusolve.solvers.expint.ExpStep`
and :func:`~diffusolve.solvers.unipc.unipc_weights`). A corrector runs in the prediction and
variant of the step it corrects. Orders are capped by the stored outputs (warm-up).

How a step is chosen: ``decisions`` (one :class:`Decision` per grid step, indexed by
``ctx.i``) when given, else the solver's own fields for every step. With fields only and
``corrector_order = predictor_order`` the solver is UniPC; with ``corrector_order = 0`` and
``variant="bh2"`` it is DPM-Solver++ (data) or DPM-Solver (noise) multistep (tested to
1e-12). The final step's choice (plain denoise or the ``sigma -> 0`` endpoint) is the
loop's ``final=`` policy; a :class:`~diffusolve.solvers.search.Schedule` records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..base import BoundModel, Solver, StepContext, check_choice, register
from ..expint import PREDICTIONS, ExpStep
from ..multistep import History
from ..unipc import VARIANTS, unipc_update

__all__ = ["Decision", "USF", "USFState", "ORDERS", "CORRECTORS"]

ORDERS = (1, 2, 3)
CORRECTORS = (0, 1, 2, 3)
LIU_2024 = (
    "Liu, Ning, Yang & Wang, A Unified Sampling Framework for Solver Searching of Diffusion "
    "Probabilistic Models, ICLR 2024"
)


@dataclass(frozen=True)
class Decision:
    """The choices of one step (see the module docstring).

    Example:
        >>> Decision("data", 2, 2, "bh2").to_dict()
        {'prediction': 'data', 'order': 2, 'corrector': 2, 'variant': 'bh2', 'scale': 1.0}
    """

    prediction: str = "data"
    order: int = 2
    corrector: int = 0
    variant: str = "bh2"
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("order", self.order, ORDERS)
        check_choice("corrector", self.corrector, CORRECTORS)
        check_choice("variant", self.variant, VARIANTS)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``Decision(**d.to_dict()) == d``)."""
        return {
            "prediction": self.prediction,
            "order": self.order,
            "corrector": self.corrector,
            "variant": self.variant,
            "scale": float(self.scale),
        }

    @property
    def local_order(self) -> int:
        """The global order this step supports: ``order``, plus one with a corrector of at
        least that order (UniC-``c`` has local error ``O(h^{c+2})``, and the predicted
        output it uses adds ``O(h^{order+2})``); 1 when a relaxed derivative
        (``scale != 1``) enters the step."""
        if self.scale != 1.0 and self.order > 1:
            return 1
        return self.order if self.corrector == 0 else min(self.order + 1, self.corrector + 1)


@dataclass(frozen=True, slots=True)
class USFRecord:
    """One model evaluation: its time, lambda, and the output in both predictions."""

    t: float
    lam: float
    data: Tensor
    noise: Tensor


@dataclass(frozen=True, slots=True)
class USFState:
    """The outputs so far (newest last, at most 3), the state at the last grid time before
    correction is applied to the next one (``x_prev`` at ``t_prev``) and the corrector that
    the current step owes it (``pending``: decision and the history length it may use)."""

    hist: History = History()
    x_prev: Tensor | None = None
    t_prev: Tensor | None = None
    pending: Decision | None = None


@register("usf", citation=LIU_2024)
@dataclass(frozen=True)
class USF(Solver):
    """The per-step decision solver of the unified sampling framework (USF / S3).

    Options:
        prediction, predictor_order, corrector_order, variant: the decision of every step
            when ``decisions`` is empty (``corrector_order=0``: no corrector).
        decisions: one :class:`Decision` per grid step (the grid must then have exactly
            ``len(decisions)`` steps), e.g. from a searched
            :class:`~diffusolve.solvers.search.Schedule`.

    Defaults: UniPC-bh2 with the second-order predictor and corrector (``unipc_bh2_2``).

    Example:
        >>> import torch
        >>> from diffusolve import sample
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> from diffusolve.solvers.search import USF, Decision
        >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=vp_linear())
        >>> xT = prior.process.prior_sample((4, 2), torch.Generator().manual_seed(0))
        >>> plan = (Decision("data", 1), Decision("noise", 2, 2), Decision("data", 3, 0))
        >>> sample(prior, xT, 3, USF(decisions=plan)).shape
        torch.Size([4, 2])
    """

    prediction: str = "data"  # type: ignore[misc]
    predictor_order: int = 2
    corrector_order: int = 2
    variant: str = "bh2"
    decisions: tuple[Decision, ...] = ()

    multistep = True
    citation = LIU_2024
    SEARCH = {}

    def __post_init__(self) -> None:
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("predictor_order", self.predictor_order, ORDERS)
        check_choice("corrector_order", self.corrector_order, CORRECTORS)
        check_choice("variant", self.variant, VARIANTS)
        if not isinstance(self.decisions, tuple) or not all(
            isinstance(d, Decision) for d in self.decisions
        ):
            raise TypeError(
                f"decisions must be a tuple of Decision (one per grid step), got {self.decisions!r}"
            )

    @property
    def default_decision(self) -> Decision:
        """The decision of every step when ``decisions`` is empty."""
        return Decision(self.prediction, self.predictor_order, self.corrector_order, self.variant)

    @property
    def order(self) -> int:  # type: ignore[override]
        if self.decisions:
            return min(d.local_order for d in self.decisions)
        return self.default_decision.local_order

    @property
    def min_steps(self) -> int:
        return len(self.decisions) if self.decisions else 1

    def decision(self, ctx: StepContext) -> Decision:
        """The decision of step ``ctx.i`` (refuses a grid of the wrong length)."""
        if not self.decisions:
            return self.default_decision
        if ctx.n != len(self.decisions):
            raise ValueError(
                f"this usf solver has {len(self.decisions)} per-step decisions but the grid "
                f"has {ctx.n} steps; use a grid of {len(self.decisions)} steps (a Schedule "
                "carries its own)"
            )
        return self.decisions[ctx.i]

    def init(self, model: BoundModel, x: Tensor) -> USFState:
        return USFState()

    # -- the update (UniP-q / UniC-q in either prediction) -------------------------------
    @staticmethod
    def _update(
        model: BoundModel,
        x_s: Tensor,
        t_s: Tensor,
        t: Tensor,
        hist: History,
        q: int,
        d: Decision,
        m_new: Tensor | None,
    ) -> Tensor:
        """One step ``s -> t`` from ``x_s``; ``hist[-1]`` is the output at ``t_s``.

        ``m_new is None``: predictor of order ``q`` (newest ``q`` records); else the UniC-q
        corrector (newest ``q`` records and ``m_new``, the output at ``t``)."""
        f = ExpStep(model.scalars(t_s), model.scalars(t), d.prediction)
        h = f.h
        fac = f.c if d.prediction == "data" else -f.c  # alpha_t (data) or sigma_t (noise)
        newest = hist.newest(0)
        m0 = getattr(newest, d.prediction)
        past = [
            (getattr(hist.newest(k), d.prediction), (hist.newest(k).lam - newest.lam) / h)
            for k in range(1, q)
        ]
        scale = d.scale if m_new is None else 1.0
        return unipc_update(f, fac, x_s, m0, past, m_new, d.variant, scale)

    def step(
        self,
        model: BoundModel,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        state: USFState,
        ctx: StepContext,
    ) -> tuple[Tensor, USFState]:
        d = self.decision(ctx)
        x0 = model(x, t)
        a, s, lam = model.scalars(t)
        new = USFRecord(float(t), lam, x0, (x - a * x0) / s)
        owed = state.pending
        if owed is not None and state.x_prev is not None:
            m_new = getattr(new, owed.prediction)
            x = self._update(
                model, state.x_prev, state.t_prev, t, state.hist, owed.corrector, owed, m_new
            )
        hist = state.hist.push(new, 3)
        q = min(d.order, len(hist))
        x_next = self._update(model, x, t, t_next, hist, q, d, None)
        c = min(d.corrector, len(hist))
        pending = Decision(d.prediction, d.order, c, d.variant, d.scale) if c > 0 else None
        return x_next, USFState(hist, x, t, pending)
