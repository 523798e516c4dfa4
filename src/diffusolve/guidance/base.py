"""One guided evaluation shared by every guidance term: :class:`Guided`.

A guided denoiser is the base model's x0 estimate, combined from a conditional and an
unconditional branch by a **rule** (classifier-free guidance and its variants), plus the x0
shifts of any number of **terms** (classifier, calibrated-classifier and loss guidance):

    x0 = rule(x0(x, t, cond), x0(x, t, null)) + sum_k term_k.shift(evaluation)

The network is called **once per evaluation**: the rows that need the conditional branch and
the rows that need the unconditional one go in one batch (CFG's doubled batch counts as one
call; a row whose effective scale is 1 only needs the conditional branch, one whose scale is
0 only the unconditional branch, so an interval or per-sample schedule costs no more than
the rows that use it), and every term reuses that output (the :class:`Evaluation`). A term
that differentiates through the denoiser (``needs_graph``) makes the one call run on an input
that requires gradients; the others differentiate only their own classifier or loss.

Score-level meaning of an x0 shift. With ``x0 = (x + sigma^2 score) / alpha`` (Tweedie), a
guidance term ``s * grad_x log r(x)`` added to the score is the x0 shift
``s * sigma^2 / alpha * grad_x log r(x)``: every solver that consumes x0 then follows the
guided score. Scales are a float or a per-sample tensor ``[B]``.

Label and caption models (:class:`~diffusolve.models.LabelConditioned`,
:class:`~diffusolve.models.bundled.TokenConditioned`) are taken apart: the condition is
converted once (int labels -> a long tensor ``[B]``, captions -> embeddings), the inner
network is guided with the model's null input, and the terms see the converted condition
(class-label terms read their target from it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..models.base import Denoiser
from ..models.bundled import LabelConditioned, TokenConditioned
from ..process import as_time
from .cfg import concat_cond

__all__ = [
    "Evaluation",
    "GuidanceTerm",
    "CFGRule",
    "Guided",
    "as_scale",
    "per_sample",
    "next_grid_time",
]


def as_scale(scale: Any, *, name: str = "scale", low: float = 0.0, high: float = math.inf) -> Any:
    """A validated guidance scale: a float, or a float64 tensor ``[B]`` (per sample).

    Every value must be finite and in ``[low, high]``; the error says which value was wrong.
    """
    if isinstance(scale, Tensor):
        if scale.ndim > 1:
            raise ValueError(
                f"{name} must be a float or a tensor [B], got shape {tuple(scale.shape)}"
            )
        value = scale.detach().to(torch.float64).reshape(-1)
        bad = ~torch.isfinite(value) | (value < low) | (value > high)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must be finite and in [{low:g}, {high:g}]; got {value[bad].tolist()}"
            )
        return value
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a tensor [B], got {scale!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be finite and in [{low:g}, {high:g}], got {scale!r}")
    return value


def per_sample(value: Any, b: int) -> Tensor:
    """A float or a tensor ``[1]``/``[B]`` as a float64 tensor ``[B]``."""
    if isinstance(value, Tensor):
        v = value.to(torch.float64).reshape(-1)
        if v.numel() == 1:
            return v.expand(b)
        if v.numel() != b:
            raise ValueError(f"got {v.numel()} per-sample values for a batch of {b}")
        return v
    return torch.full((b,), float(value), dtype=torch.float64)


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``[B]`` coefficient shaped to multiply ``like`` ``[B, ...]``."""
    return v.to(dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * (like.ndim - 1))


def next_grid_time(grid: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """For each time in ``t`` (0-d or ``[B]``), the largest time of the decreasing ``grid``
    strictly below it (up to a relative tolerance of ``1e-9``, so a grid time maps to the
    next one). Returns ``(t_next, has_next)``; ``t_next`` is meaningless where ``has_next``
    is ``False`` (``t`` at or below the last grid time).

    Example:
        >>> import torch
        >>> g = torch.tensor([999.0, 500.0, 0.0], dtype=torch.float64)
        >>> tn, ok = next_grid_time(g, torch.tensor([999.0, 700.0, 0.0], dtype=torch.float64))
        >>> tn[ok].tolist(), ok.tolist()
        ([500.0, 500.0], [True, True, False])
    """
    asc = torch.flip(grid.to(torch.float64), (0,))
    tt = t.to(torch.float64).reshape(-1)
    tol = 1e-9 * torch.clamp(tt.abs(), min=1.0)
    k = torch.searchsorted(asc, tt - tol, right=False)  # number of grid times < t - tol
    has = k > 0
    nxt = asc[torch.clamp(k - 1, min=0)]
    return nxt.reshape(t.shape), has.reshape(t.shape)


@dataclass
class Evaluation:
    """What one guided evaluation knows; shared by every term.

    Attributes:
        x: the state ``[B, ...]`` (detached when a term needs the graph; see ``x_graph``).
        t: the time, float64, 0-d or ``[B]``.
        cond: the condition as the inner network sees it (long labels ``[B]`` for a label
            model).
        x0: the rule's combined estimate (before any term's shift). It is a function of
            ``x_graph`` when ``x_graph`` is set.
        x0_cond / x0_uncond: the branches (``None`` where no row needed them).
        x_graph: the input that requires gradients when a term needs the graph, else None.
        process: the model's process.
    """

    x: Tensor
    t: Tensor
    cond: Any
    x0: Tensor
    process: Any
    x0_cond: Tensor | None = None
    x0_uncond: Tensor | None = None
    x_graph: Tensor | None = None
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def alpha_sigma(self) -> tuple[Tensor, Tensor]:
        """``alpha(t)``, ``sigma(t)`` as float64 tensors ``[B]``."""
        if "alpha" not in self._cache:
            b = self.batch
            self._cache["alpha"] = per_sample(self.process.alpha(self.t), b)
            self._cache["sigma"] = per_sample(self.process.sigma(self.t), b)
        return self._cache["alpha"], self._cache["sigma"]

    def rows(self, v: Tensor) -> Tensor:
        """A per-sample ``[B]`` coefficient shaped (and typed) to multiply ``x``."""
        return _rows(v, self.x)

    def score_to_x0(self) -> Tensor:
        """``sigma^2 / alpha`` per sample ``[B]``: the x0 shift of a unit score shift."""
        a, s = self.alpha_sigma()
        return s * s / a


class GuidanceTerm:
    """An additive x0 shift computed from an :class:`Evaluation`.

    Subclasses implement :meth:`shift` (``[B, ...]``, the x0 shift) and set
    ``needs_graph = True`` when they differentiate through the denoiser's output.
    """

    needs_graph: bool = False

    def shift(self, ev: Evaluation) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class CFGRule:
    """Plain classifier-free guidance ``x0_u + w (x0_c - x0_u)`` with ``w`` a float or a
    per-sample tensor ``[B]`` (the convention of :mod:`diffusolve.guidance.cfg`: 0 =
    unconditional, 1 = conditional, > 1 guided). Variants override :meth:`weights`
    (the effective scale per sample at ``t``) and/or :meth:`combine`."""

    def __init__(self, scale: Any = 1.0) -> None:
        self.scale = as_scale(scale)

    def weights(self, t: Tensor, b: int, process: Any) -> Any:
        """The effective CFG scale: a float (the same for every row) or a tensor ``[B]``."""
        return self.scale

    def combine(
        self,
        x: Tensor,
        t: Tensor,
        x0_c: Tensor,
        x0_u: Tensor,
        w: Any,
        process: Any,
        rows: Any = None,
    ) -> Tensor:
        """The guided estimate of the rows that have both branches (``w`` a float or one value
        per such row; ``rows``: their indices in the batch, ``None`` for all rows)."""
        if isinstance(w, Tensor):
            w = _rows(w, x0_c)
        return x0_u + w * (x0_c - x0_u)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


def _take(c: Any, idx: Tensor, b: int) -> Any:
    """Rows ``idx`` of a condition for a batch of ``b`` (tensors of batch 1 broadcast)."""
    if c is None:
        return None
    if isinstance(c, Tensor):
        if c.ndim == 0:
            return c
        if c.shape[0] == 1:
            return c.expand((len(idx),) + tuple(c.shape[1:]))
        if c.shape[0] != b:
            raise ValueError(f"a condition has batch size {c.shape[0]}; expected {b} or 1")
        return c[idx.to(c.device)]
    if isinstance(c, Mapping):
        return {k: _take(v, idx, b) for k, v in c.items()}
    return c


def _cat_cond(a: Any, b: Any) -> Any:
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.ndim == 0 and b.ndim == 0 and bool(a == b):
            return a
        return torch.cat([a, b.to(a.device)])
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if not isinstance(a, (Tensor, Mapping)) and a == b:
        return a
    raise TypeError(f"cannot batch conditions of types {type(a).__name__} and {type(b).__name__}")


class Guided(Denoiser):
    """A denoiser guided by a CFG rule and additive terms, with one network call per
    evaluation.

    Args:
        model: the base denoiser (a label or caption model, an analytic
            ``ClassConditionalMixture``, or any denoiser taking ``cond``).
        rule: a :class:`CFGRule` (or variant: ``CFGPlusPlusRule``, ``IntervalRule``,
            ``RescaledRule``), or a float / tensor ``[B]`` for plain CFG at that scale.
            Default 1: the conditional model, one branch.
        terms: additive guidance terms (``ClassifierTerm``, ``EluCDTerm``, ``LossTerm``...).
        null_cond: the unconditional input; read from the model when it knows it (label and
            caption models, ``model.null_cond``). Needed only when a row's scale is not 1.

    Autograd: without a ``needs_graph`` term the output keeps the caller's graph through the
    network (term shifts are constants); with one, the network runs on a detached input that
    requires gradients and the output is detached from the caller's graph.

    Example:
        >>> import torch
        >>> from diffusolve.guidance import Guided, ClassifierFreeGuidance
        >>> from diffusolve.models.analytic.conditional import ClassConditionalMixture
        >>> from diffusolve.process import vp_linear
        >>> m = ClassConditionalMixture.random(2, process=vp_linear(), seed=0)
        >>> x, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
        >>> g = Guided(m, 3.0)
        >>> torch.equal(g(x, 0.5, y), ClassifierFreeGuidance(m, 3.0, null_cond=m.null_cond)(x, 0.5, y))
        True
    """

    def __init__(
        self,
        model: Any,
        rule: Any = 1.0,
        terms: Sequence[GuidanceTerm] = (),
        *,
        null_cond: Any = None,
    ) -> None:
        self.base = model
        self.process = model.process
        self._labels: LabelConditioned | None = None
        self._tokens: TokenConditioned | None = None
        if isinstance(model, LabelConditioned):
            if null_cond is not None:
                raise ValueError("a label model's null class is fixed; do not pass null_cond")
            self._labels, self.net = model, model.model
            null_cond = torch.tensor([model.null])
        elif isinstance(model, TokenConditioned):
            self._tokens, self.net = model, model.model
            if null_cond is None:
                null_cond = model.embed(None, 1)
        else:
            self.net = model
            if null_cond is None:
                null_cond = getattr(model, "null_cond", None)
        self.null_cond = null_cond
        self.rule = rule if isinstance(rule, CFGRule) else CFGRule(rule)
        self.terms = tuple(terms)
        for term in self.terms:
            if not isinstance(term, GuidanceTerm):
                raise TypeError(f"terms must be GuidanceTerm objects, got {type(term).__name__}")
        self.needs_graph = any(term.needs_graph for term in self.terms)

    # ------------------------------------------------------------------ condition
    def _convert(self, cond: Any, x: Tensor) -> Any:
        if self._labels is not None:
            return self._labels.labels(cond, x.shape[0], x.device)
        if self._tokens is not None:
            return self._tokens.embed(cond, x.shape[0], x.device)
        if isinstance(cond, (int, list, tuple)) and isinstance(self.null_cond, Tensor):
            return torch.as_tensor(cond, device=x.device)  # int labels, batched like the null
        return cond

    # ------------------------------------------------------------------ branches
    def _branches(self, x: Tensor, t: Tensor, cond: Any, w: Any) -> tuple[Tensor, Any, Any]:
        """``(x0, x0_cond, x0_uncond)`` with one call of the network."""
        b = x.shape[0]
        net = self.net
        if not isinstance(w, Tensor):  # one scale for the batch
            if w == 1.0:
                x0 = net(x, t, cond)
                return x0, x0, None
            self._need_null()
            if w == 0.0:
                x0 = net(x, t, _take(self.null_cond, torch.arange(b), b))
                return x0, None, x0
            t2 = t if t.ndim == 0 else torch.cat([t, t])
            out = net(torch.cat([x, x]), t2, concat_cond(cond, self.null_cond, b))
            x0_c, x0_u = out[:b], out[b:]
            return self.rule.combine(x, t, x0_c, x0_u, w, self.process), x0_c, x0_u
        w = per_sample(w, b)
        need_c, need_u = w != 0, w != 1
        if bool(need_u.any()):
            self._need_null()
        ic = torch.nonzero(need_c).flatten()
        iu = torch.nonzero(need_u).flatten()
        xs = torch.cat([x[ic.to(x.device)], x[iu.to(x.device)]])
        ts = t if t.ndim == 0 else torch.cat([t[ic], t[iu]])
        cs = _cat_cond(_take(cond, ic, b), _take(self.null_cond, iu, b))
        out = net(xs, ts, cs)
        x0_c = torch.zeros_like(x)
        x0_u = torch.zeros_like(x)
        x0_c = x0_c.index_copy(0, ic.to(x.device), out[: len(ic)])
        x0_u = x0_u.index_copy(0, iu.to(x.device), out[len(ic) :])
        both = need_c & need_u
        x0 = torch.where(_rows(need_c.to(torch.float64), x) > 0, x0_c, x0_u)
        if bool(both.any()):
            ib = torch.nonzero(both).flatten().to(x.device)
            tb = t if t.ndim == 0 else t[ib]
            mixed = self.rule.combine(x[ib], tb, x0_c[ib], x0_u[ib], w[both], self.process, ib)
            x0 = x0.index_copy(0, ib, mixed)
        return x0, x0_c, x0_u

    def _need_null(self) -> None:
        if self.null_cond is None:
            raise ValueError(
                "guidance with a scale other than 1 needs the unconditional input: pass "
                "null_cond (or a model that knows it: diffusolve.models.load, or an analytic "
                "ClassConditionalMixture)"
            )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Evaluation:
        """The shared :class:`Evaluation` (the rule's estimate and branches, one call)."""
        t = as_time(t)
        cond = self._convert(cond, x)
        w = self.rule.weights(t, x.shape[0], self.process)
        if self.needs_graph:
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                x0, x0_c, x0_u = self._branches(xg, t, cond, w)
            return Evaluation(x.detach(), t, cond, x0, self.process, x0_c, x0_u, x_graph=xg)
        x0, x0_c, x0_u = self._branches(x, t, cond, w)
        return Evaluation(x, t, cond, x0, self.process, x0_c, x0_u)

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        ev = self.evaluate(x, t, cond)
        if not self.terms:
            return ev.x0
        shift = sum(term.shift(ev) for term in self.terms)
        x0 = ev.x0.detach() if self.needs_graph else ev.x0
        return x0 + shift.to(x0.dtype)

    def __repr__(self) -> str:
        terms = ", ".join(repr(term) for term in self.terms)
        return f"{type(self).__name__}({self.base!r}, {self.rule!r}, terms=[{terms}])"
