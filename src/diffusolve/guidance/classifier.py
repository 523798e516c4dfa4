"""Classifier guidance with a noise-aware classifier (Dhariwal & Nichol, "Diffusion Models
Beat GANs on Image Synthesis", NeurIPS 2021).

The guided score is ``grad log p_t(x | y) ~ grad log p_t(x) + s * grad_x log p(y | x, t)``;
with Tweedie's ``x0 = (x + sigma^2 score) / alpha`` this is the x0 shift

    x0 <- x0 + s * sigma^2 / alpha * grad_x log softmax(classifier(x, t))[y].

The gradient is taken through the classifier only (never through the denoiser). At ``s = 1``
with the exact classifier ``p(y | x_t)`` of the data, the guided unconditional model is the
exact conditional model (tested on a class-conditional Gaussian mixture). The paper uses
scales 1-10 on ImageNet (with an unconditional or a conditional model); ``scale`` has no
universal default.

``classifier(x_t, t) -> logits [B, K]`` takes the process time ``t`` (``time_map`` converts it
for a classifier trained on other units): the bundled ``models.load_classifier("digits")``
takes the digits process's time directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._labels import net_dtype, target_labels
from .base import Evaluation, GuidanceTerm, Guided, as_scale, per_sample

__all__ = ["ClassifierTerm", "ClassifierGuidance", "classifier_log_prob_grad"]


def classifier_log_prob_grad(
    classifier: Any, x: Tensor, t: Tensor, y: Tensor, time_map: Any = None
) -> Tensor:
    """``grad_x log softmax(classifier(x, t))[y]`` per sample, through the classifier only."""
    xr = x.detach().requires_grad_(True)
    tt = t.expand(x.shape[0]) if t.ndim == 0 else t
    if time_map is not None:
        tt = time_map(tt)
    with torch.enable_grad():
        logits = classifier(xr.to(net_dtype(classifier, x)), tt)
        logp = torch.log_softmax(logits, dim=1).gather(1, y.to(logits.device)[:, None])
        (grad,) = torch.autograd.grad(logp.sum(), xr)
    return grad


class ClassifierTerm(GuidanceTerm):
    """The x0 shift ``scale * sigma^2 / alpha * grad_x log p(y | x, t)``.

    Args:
        classifier: ``classifier(x_t, t) -> logits``; ``t`` the process time ``[B]``.
        scale: the guidance scale ``s >= 0`` (float or per sample ``[B]``).
        target: the class labels (default: the evaluation's ``cond``).
        time_map: converts the process time to the classifier's time input.
    """

    def __init__(
        self, classifier: Any, scale: Any = 1.0, *, target: Any = None, time_map: Any = None
    ) -> None:
        if not callable(classifier):
            raise TypeError("classifier must be callable: classifier(x_t, t) -> logits")
        self.classifier = classifier
        self.scale = as_scale(scale)
        self.target = target
        self.time_map = time_map

    def shift(self, ev: Evaluation) -> Tensor:
        b = ev.batch
        y = target_labels(ev.cond, self.target, b, ev.x.device)
        grad = classifier_log_prob_grad(self.classifier, ev.x, ev.t, y, self.time_map)
        return ev.rows(per_sample(self.scale, b) * ev.score_to_x0()) * grad.to(ev.x.dtype)

    def __repr__(self) -> str:
        return f"ClassifierTerm(scale={self.scale})"


class ClassifierGuidance(Guided):
    """Classifier guidance (Dhariwal & Nichol 2021) on ``model`` with a noise-aware classifier.

    Args:
        model: the base denoiser.
        classifier: ``classifier(x_t, t) -> logits`` (e.g. ``models.load_classifier()``).
        scale: the classifier scale (float or per sample ``[B]``).
        cfg: the CFG scale of the base estimate (1: the conditional model, 0: unconditional,
            the paper's main setting; ``> 1``: both, in the same network call).
        target: the class labels to guide to (default: ``cond``).
        time_map, null_cond: see :class:`ClassifierTerm` and :class:`Guided`.

    Example:
        >>> import torch
        >>> from diffusolve.guidance import ClassifierGuidance
        >>> from diffusolve.models import load, load_classifier
        >>> g = ClassifierGuidance(load("digits"), load_classifier(), 2.0)
        >>> g(torch.zeros(2, 1, 16, 16), 500.0, [3, 7]).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        model: Any,
        classifier: Any,
        scale: Any = 1.0,
        *,
        cfg: Any = 1.0,
        target: Any = None,
        time_map: Any = None,
        null_cond: Any = None,
    ) -> None:
        term = ClassifierTerm(classifier, scale, target=target, time_map=time_map)
        super().__init__(model, cfg, [term], null_cond=null_cond)
