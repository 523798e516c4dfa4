"""An exact class-conditional Gaussian mixture: a conditional model with a null class.

Each mixture component belongs to one class. The condition ``c`` (an int label, a list of
labels or an int tensor ``[B]``) selects the mixture of its class's components, with their
weights renormalised; the null label ``num_classes`` (or ``None``) is the whole mixture.
So ``p(x | c)`` and ``p(x)`` are both exact mixtures, and classifier-free guidance
(:func:`diffusolve.guidance.classifier_free` with ``null_cond=model.null_cond``, the
null label as a tensor; the guided model then takes tensor labels) runs on an
analytic model whose every piece is known in closed form: the testbed for guided inversion
and editing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import Denoiser
from ._move import Movable
from .gmm import GaussianMixture

__all__ = ["ClassConditionalMixture"]


class ClassConditionalMixture(Movable, Denoiser):
    """A class-conditional mixture built from one :class:`GaussianMixture`.

    Args:
        mixture: the unconditional mixture (its process is the model's).
        classes: ``[K]`` int class of each component, ``0 .. num_classes - 1``; every class
            must own at least one component.

    Example:
        >>> import torch
        >>> from diffusolve.models.analytic.conditional import ClassConditionalMixture
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import ddpm
        >>> gmm = GaussianMixture.random(4, 4, process=ddpm(), seed=0)
        >>> model = ClassConditionalMixture(gmm, torch.tensor([0, 0, 1, 1]))
        >>> x = model.sample(3, 1, generator=torch.Generator().manual_seed(0))
        >>> model(x, 10.0, 1).shape, model.null_cond
        (torch.Size([3, 4]), tensor([2]))
    """

    _anchor = "classes_anchor"

    @property
    def classes_anchor(self) -> Tensor:
        """The tensor whose device and dtype are the model's (the mixture's means)."""
        return self.mixture.means

    def __init__(self, mixture: GaussianMixture, classes: Tensor) -> None:
        classes = torch.as_tensor(classes, dtype=torch.long, device=mixture.device).flatten()
        if classes.numel() != mixture.n_components:
            raise ValueError(
                f"classes must give one class per component ({mixture.n_components}), got "
                f"{classes.numel()}"
            )
        if bool((classes < 0).any()):
            raise ValueError("classes must be non-negative integers")
        n = int(classes.max()) + 1
        missing = [c for c in range(n) if not bool((classes == c).any())]
        if missing:
            raise ValueError(f"classes {missing} own no component; number classes 0..n-1")
        self.mixture = mixture
        self.process = mixture.process
        self.shape = mixture.shape
        self.classes = classes
        self.num_classes = n
        #: the null label as a tensor (what classifier-free guidance concatenates)
        self.null_cond = torch.tensor([n], device=mixture.device)
        self.parts = [self._part(classes == c) for c in range(n)] + [mixture]

    def _part(self, keep: Tensor) -> GaussianMixture:
        m = self.mixture
        w, mu, ev = m.weights[keep], m.means[keep], m.evals[keep]
        if m.evecs is None:
            return GaussianMixture(w, mu, ev, process=m.process, shape=m.shape)
        return GaussianMixture.from_eigh(w, mu, ev, m.evecs[keep], process=m.process, shape=m.shape)

    @classmethod
    def random(
        cls, dim: int, num_classes: int = 2, per_class: int = 3, *, process: Any, seed: int = 0
    ) -> ClassConditionalMixture:
        """``num_classes`` classes of ``per_class`` components each from
        :meth:`GaussianMixture.random` (deterministic for ``seed``)."""
        gmm = GaussianMixture.random(dim, num_classes * per_class, process=process, seed=seed)
        return cls(gmm, torch.arange(num_classes).repeat_interleave(per_class))

    def labels(self, cond: Any, batch: int) -> Tensor:
        """``cond`` as a ``[batch]`` long tensor (``None`` = the null class)."""
        if cond is None:
            cond = self.num_classes
        y = torch.as_tensor(cond, device=self.device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"class labels must be integers, got dtype {y.dtype}")
        y = y.to(torch.long).reshape(-1)
        if y.numel() == 1:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"got {y.numel()} labels for a batch of {batch}")
        if bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(
                f"labels must be in 0..{self.num_classes} ({self.null_cond} = unconditional)"
            )
        return y

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        y = self.labels(cond, x.shape[0]).to(x.device)
        t = torch.as_tensor(t, dtype=torch.float64)
        out = torch.empty_like(x)
        for c in torch.unique(y).tolist():
            idx = y == c
            tc = t if t.ndim == 0 else t.reshape(-1)[idx.to(t.device)]
            out[idx] = self.parts[c](x[idx], tc).to(x.dtype)
        return out

    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact data samples of class ``cond`` (the mixture's dtype and device)."""
        y = self.labels(cond, n)
        out = torch.empty((n,) + tuple(self.shape), dtype=self.dtype, device=self.device)
        for c in torch.unique(y).tolist():
            idx = y == c
            out[idx] = self.parts[c].sample(int(idx.sum()), generator=generator)
        return out

    def __repr__(self) -> str:
        return (
            f"ClassConditionalMixture(classes={self.num_classes}, K={self.mixture.n_components}, "
            f"d={self.mixture.dim}, process={self.process.name!r})"
        )
