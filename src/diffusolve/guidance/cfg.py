"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

``x0 = x0_uncond + scale * (x0_cond - x0_uncond)``. The conversions from epsilon, v, score
and velocity to x0 are affine in the prediction with the same ``x`` coefficient for both
branches, so guiding x0 is exactly the same as guiding epsilon (the usual formulation) or v.
Both branches are evaluated in one batched network call, so every solver stage costs one
call of the network (on a doubled batch).

The scale convention (one, everywhere in diffusolve, CLI included): ``scale`` is the ``s``
of ``x0 = x0_uncond + s * (x0_cond - x0_uncond)`` for every finite ``s >= 0``: ``0`` is
the unconditional model, ``1`` the conditional one (no extra evaluation), ``s > 1``
guidance. Above 1 this is diffusers' ``guidance_scale`` (``w + 1`` in Ho & Salimans);
unlike diffusers' pipelines, which switch guidance off for ``guidance_scale <= 1``, values
in ``[0, 1)`` interpolate towards the unconditional model. Negative and non-finite scales
are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..models.base import Denoiser
from ..models.bundled import LabelConditioned, TokenConditioned
from ..process import as_time

__all__ = ["ClassifierFreeGuidance", "concat_cond", "classifier_free", "check_scale"]


def _expand(c: Tensor, b: int) -> Tensor:
    if c.ndim > 0 and c.shape[0] == b:
        return c
    if c.ndim == 0 or c.shape[0] == 1:
        return c.expand((b,) + tuple(c.shape[1:])) if c.ndim > 0 else c.expand(b)
    raise ValueError(f"a condition has batch size {c.shape[0]}; expected {b} or 1.")


def concat_cond(cond: Any, null_cond: Any, b: int) -> Any:
    """Stack ``cond`` and ``null_cond`` along the batch (tensors or dicts of tensors).

    Tensors of batch size 1 (or 0-d) are broadcast to ``b``; non-tensor dict values must
    be equal in both conditions.
    """
    if isinstance(cond, Tensor) and isinstance(null_cond, Tensor):
        return torch.cat([_expand(cond, b), _expand(null_cond.to(cond.device), b)])
    if isinstance(cond, Mapping) and isinstance(null_cond, Mapping):
        if set(cond) != set(null_cond):
            raise ValueError(
                f"cond and null_cond have different keys: {sorted(cond)} vs {sorted(null_cond)}"
            )
        return {k: concat_cond(cond[k], null_cond[k], b) for k in cond}
    if cond is None and null_cond is None:
        return None
    if not isinstance(cond, (Tensor, Mapping)) and cond == null_cond:
        return cond
    raise TypeError(
        "cond and null_cond must both be tensors or both dicts of tensors "
        f"(got {type(cond).__name__} and {type(null_cond).__name__})."
    )


def check_scale(scale: Any) -> float:
    """``scale`` as a float if it is a valid guidance scale (finite, ``>= 0``), else a
    ``ValueError`` that states the convention."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"the guidance scale must be a number, got {scale!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"the guidance scale must be a finite number >= 0, got {scale!r} "
            "(0 = unconditional, 1 = conditional without guidance, > 1 = guided)"
        )
    return value


class ClassifierFreeGuidance(Denoiser):
    """``x0 = x0(x, t, null) + scale * (x0(x, t, cond) - x0(x, t, null))`` in one network call.

    Ho & Salimans, Classifier-Free Diffusion Guidance (2022). The conditional and
    unconditional branches are concatenated along the batch (``[x; x]`` with
    ``[cond; null_cond]``), so a solver stage calls ``model`` once. ``scale = 1`` is the
    conditional model (no extra evaluation); ``scale = 0`` the unconditional one; above 1
    ``scale`` is diffusers' ``guidance_scale`` (``w + 1`` in the paper). See the module
    docstring for the convention below 1.

    Args:
        model: a denoiser taking a condition (e.g. from :func:`from_diffusers`).
        scale: the guidance scale, finite and ``>= 0``.
        null_cond: the unconditional input, with the structure of ``cond`` (a tensor or a
            dict of tensors, batch size 1 or B): the "null" class label, the empty
            prompt's embedding, ...

    Example:
        >>> import torch
        >>> from diffusolve.guidance import ClassifierFreeGuidance
        >>> from diffusolve.models import from_callable
        >>> from diffusolve.process import vp_linear
        >>> net = from_callable(lambda x, t, c: c.float().view(-1, 1) * x, vp_linear(), "x0")
        >>> cfg = ClassifierFreeGuidance(net, 3.0, null_cond=torch.tensor([0]))
        >>> cfg(torch.ones(2, 1), 0.5, torch.tensor([1, 1])).flatten().tolist()
        [3.0, 3.0]
    """

    def __init__(self, model: Any, scale: float, *, null_cond: Any) -> None:
        self.model = model
        self.process = model.process
        self.scale = check_scale(scale)
        self.null_cond = null_cond

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self.scale == 1.0:
            return self.model(x, t, cond)
        b = x.shape[0]
        t = as_time(t)
        t2 = t if t.ndim == 0 else torch.cat([t, t])
        out = self.model(torch.cat([x, x]), t2, concat_cond(cond, self.null_cond, b))
        x0_c, x0_u = out[:b], out[b:]
        return x0_u + self.scale * (x0_c - x0_u)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance({self.model!r}, scale={self.scale:g})"


def classifier_free(model: Any, scale: float, *, null_cond: Any = None) -> Denoiser:
    """Classifier-free guidance at ``scale`` for ``model``.

    A label model (:class:`~diffusolve.models.LabelConditioned`, what
    :func:`diffusolve.models.load` returns for class-conditional UNets) keeps taking int
    labels, and its null class is the unconditional input; a caption model
    (:class:`~diffusolve.models.bundled.TokenConditioned`, ``digits-tokens``) keeps taking
    captions, ids or embeddings, and the empty caption is its null input; any other
    denoiser needs ``null_cond`` (e.g. the empty prompt's embedding).

    Example:
        >>> import torch
        >>> from diffusolve.guidance import classifier_free
        >>> from diffusolve.models import load
        >>> guided = classifier_free(load("digits"), 2.0)
        >>> with torch.no_grad():
        ...     guided(torch.zeros(2, 1, 16, 16), 500.0, [3, 7]).shape
        torch.Size([2, 1, 16, 16])
    """
    scale = check_scale(scale)
    if isinstance(model, LabelConditioned):
        if null_cond is not None:
            raise ValueError("a label model's null class is fixed; do not pass null_cond")
        inner = ClassifierFreeGuidance(model.model, scale, null_cond=torch.tensor([model.null]))
        return LabelConditioned(inner, num_labels=model.num_labels, null=model.null)
    if isinstance(model, TokenConditioned) and null_cond is None:
        # guide the network on embedded tokens (the empty caption's as the null input) and
        # convert captions outside, so every condition form works under guidance
        inner = ClassifierFreeGuidance(model.model, scale, null_cond=model.embed(None, 1))
        return model.rewrap(inner)
    if null_cond is None:
        raise ValueError(
            "classifier-free guidance needs the unconditional input: pass null_cond (for a "
            "class-conditional diffusers UNet, load it with diffusolve.models.load, which "
            "knows its null class)."
        )
    return ClassifierFreeGuidance(model, scale, null_cond=null_cond)
