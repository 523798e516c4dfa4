"""Shared parts of composition: the forward SDE of a process and the scores of several models.

* :func:`sde_coefficients`: ``f(t) = d log alpha / dt`` and ``g(t)^2 = d sigma^2 / dt -
  2 f sigma^2`` of the forward SDE ``dx = f x dt + g dW`` whose marginals are
  ``x_t = alpha(t) x0 + sigma(t) eps`` (float64 Python floats).
* :class:`Experts`: several denoisers that share one process, or one conditional denoiser
  under several conditions. :meth:`Experts.denoise` returns the ``M`` x0 estimates
  ``[M, B, ...]``; with one model and stackable conditions (int labels or ``[B]`` label
  tensors) the network is called **once** on the stacked batch ``[M * B, ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..process import Process, as_time

__all__ = ["sde_coefficients", "Experts", "score_from_x0", "x0_from_score"]


def sde_coefficients(process: Process, t: Tensor | float) -> tuple[float, float]:
    """``(f, g^2)`` of the forward SDE ``dx = f(t) x dt + g(t) dW`` at time ``t``.

    ``f = alpha' / alpha`` and ``g^2 = 2 sigma sigma' - 2 f sigma^2`` make the marginal of
    ``x_t`` equal ``N(alpha x0, sigma^2 I)`` given ``x0`` (Song et al. 2021, eq. 5 and
    appendix B; Kingma et al. 2021, eq. 29).

    Example:
        >>> from diffusolve.process import rectified_flow
        >>> f, g2 = sde_coefficients(rectified_flow(), 0.5)  # alpha = 1 - t, sigma = t
        >>> round(f, 12), round(g2, 12)  # f = -1 / (1 - t); g^2 = 2t + 2t^2 / (1 - t)
        (-2.0, 2.0)
    """
    t = as_time(t)
    a, s = float(process.alpha(t)), float(process.sigma(t))
    da, ds = float(process.d_alpha(t)), float(process.d_sigma(t))
    f = da / a
    g2 = 2.0 * s * ds - 2.0 * f * s * s
    if not g2 > 0:
        raise ValueError(
            f"{process.name}: g(t)^2 = {g2:g} <= 0 at t = {float(t):g}; the forward SDE needs "
            "sigma / alpha to increase with t"
        )
    return f, g2


def score_from_x0(x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    """``grad log q_t(x) = (alpha x0 - x) / sigma^2`` (Tweedie)."""
    return (alpha * x0 - x) / (sigma * sigma)


def x0_from_score(x: Tensor, score: Tensor, alpha: float, sigma: float) -> Tensor:
    """``x0 = (x + sigma^2 score) / alpha``."""
    return (x + (sigma * sigma) * score) / alpha


def _stack_conds(conds: Sequence[Any], batch: int) -> Tensor | None:
    """The conditions as one ``[M * batch]`` label tensor, or ``None`` when they are not
    integer labels (captions, embeddings): then each is passed in its own call."""
    parts = []
    for c in conds:
        if isinstance(c, bool) or c is None:
            return None
        if isinstance(c, int):
            parts.append(torch.full((batch,), c, dtype=torch.long))
            continue
        if isinstance(c, Tensor) and not c.is_floating_point() and not c.is_complex():
            c = c.reshape(-1).to(torch.long)
            if c.numel() == 1:
                c = c.expand(batch)
            if c.shape != (batch,):
                return None
            parts.append(c.cpu())
            continue
        return None
    return torch.cat(parts)


class Experts:
    """``M`` denoisers on one process: separate models, or one model with ``M`` conditions.

    Args:
        models: a denoiser, or a sequence of ``M`` denoisers (all with the same process:
            compared by identity or by ``alpha``/``sigma`` on a few times).
        cond: ``None``, or a sequence of ``M`` conditions (one per expert). With a single
            model, ``cond`` must have at least two entries.

    Example:
        >>> import torch
        >>> from diffusolve.models.analytic.conditional import ClassConditionalMixture
        >>> from diffusolve.process import ddpm
        >>> model = ClassConditionalMixture.random(3, 2, 1, process=ddpm(), seed=0)
        >>> ex = Experts(model, cond=[0, 1])
        >>> ex.size, ex.stacked, tuple(ex.denoise(torch.zeros(4, 3), 500.0).shape)
        (2, True, (2, 4, 3))
    """

    def __init__(self, models: Any, cond: Sequence[Any] | None = None) -> None:
        if isinstance(models, Sequence) and not isinstance(models, (str, bytes)):
            models = list(models)
            if cond is not None and len(cond) != len(models):
                raise ValueError(f"got {len(cond)} conditions for {len(models)} models")
            conds = list(cond) if cond is not None else [None] * len(models)
        else:
            if cond is None or isinstance(cond, (str, bytes)) or not isinstance(cond, Sequence):
                raise ValueError(
                    "one model needs a list of conditions (one per expert), e.g. cond=[3, 8]; "
                    "or pass a list of models"
                )
            conds = list(cond)
            models = [models] * len(conds)
        if len(models) < 1:
            raise ValueError("composition needs at least one expert, got none")
        process = models[0].process
        ts = torch.linspace(process.t_min, process.t_max, 5, dtype=torch.float64)
        for m in models[1:]:
            p = m.process
            if p is process:
                continue
            same = torch.allclose(p.alpha(ts), process.alpha(ts)) and torch.allclose(
                p.sigma(ts), process.sigma(ts)
            )
            if not same:
                raise ValueError(f"every expert must share one process; got {process!r} and {p!r}")
        self.models, self.conds, self.process = models, conds, process
        self.size = len(models)
        self._one = all(m is models[0] for m in models)
        self.stacked = self._one and _stack_conds(conds, 1) is not None

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The experts' x0 estimates at ``(x, t)``: ``[M, B, ...]`` (one network call when
        :attr:`stacked`)."""
        b = x.shape[0]
        if self.stacked:
            labels = _stack_conds(self.conds, b)
            xs = x.expand((self.size,) + tuple(x.shape)).reshape((self.size * b,) + x.shape[1:])
            out = self.models[0](xs, t, labels.to(x.device))
            return out.reshape((self.size,) + tuple(x.shape))
        return torch.stack([m(x, t, c) for m, c in zip(self.models, self.conds, strict=True)])

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log q_i,t(x)`` of every expert ``[M, B]`` (only for experts with ``log_prob``,
        e.g. :class:`~diffusolve.models.GaussianMixture`, and no condition)."""
        out = []
        for m, c in zip(self.models, self.conds, strict=True):
            fn = getattr(m, "log_prob", None)
            if fn is None or c is not None:
                raise TypeError(
                    f"{type(m).__name__} has no energy log q_t(x) (log_prob); the exact "
                    "energy is available for analytic priors such as GaussianMixture. Use a "
                    "sampler that needs only scores (ULA) for networks."
                )
            out.append(fn(x, t))
        return torch.stack(out)

    @property
    def has_energy(self) -> bool:
        """Whether every expert exposes its exact log-density ``log_prob(x, t)``."""
        return all(
            getattr(m, "log_prob", None) is not None and c is None
            for m, c in zip(self.models, self.conds, strict=True)
        )
