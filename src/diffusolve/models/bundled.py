"""Small models shipped inside the package, loaded offline.

``digits``: a class-conditional diffusers ``UNet2DModel`` (1.1M parameters) trained here on
scikit-learn's digits (16x16, one channel, [-1, 1]); DDPM process with linear betas and
1,000 steps, v-prediction; classes 0-9 plus the null class 10 for classifier-free guidance.
See ``assets/digits/MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Denoiser

__all__ = ["BUNDLED", "NULL_CLASS", "asset_dir", "load", "load_classifier", "LabelConditioned"]

BUNDLED = ("digits",)
NULL_CLASS = 10
_NUM_LABELS = 11


def asset_dir(name: str = "digits") -> Path:
    """The packaged folder of bundled model ``name``."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; available: {BUNDLED}")
    path = Path(__file__).resolve().parent.parent / "assets" / name
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no weights; retrain them with `diffusolve train {name}`."
        )
    return path


class LabelConditioned(Denoiser):
    """Turns integer labels into the class-label tensor the UNet expects.

    ``cond`` may be an int (one label for the batch), a sequence of ints or an integer
    tensor of shape ``[B]`` or ``[1]``; ``None`` means the null class (unconditional).
    ``num_labels`` counts the null class; the real classes are ``0 .. num_classes - 1``.
    """

    def __init__(self, model: Any, num_labels: int = _NUM_LABELS, null: int = NULL_CLASS) -> None:
        self.model = model
        self.process = model.process
        self.num_labels = int(num_labels)
        self.null = int(null)

    @property
    def num_classes(self) -> int:
        """The number of real classes (labels other than the null class)."""
        return self.num_labels - 1

    def labels(self, cond: Any, batch: int, device: torch.device) -> Tensor:
        if cond is None:
            cond = self.null
        y = torch.as_tensor(cond, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"class labels must be integers, got dtype {y.dtype}")
        y = y.to(torch.long).reshape(-1)
        if y.numel() == 1:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"got {y.numel()} labels for a batch of {batch}")
        if bool(((y < 0) | (y >= self.num_labels)).any()):
            raise ValueError(
                f"labels must be in 0..{self.num_labels - 1} ({self.null} = unconditional)"
            )
        return y

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.model(x, t, self.labels(cond, x.shape[0], x.device))

    def __repr__(self) -> str:
        return f"LabelConditioned({self.model!r})"


def load(
    name: str | Path = "digits",
    *,
    dtype: torch.dtype = torch.float32,
    guidance: float | None = None,
) -> Denoiser:
    """A bundled model or a local diffusers folder as a ready :class:`Denoiser`.

    Args:
        name: a bundled model name (``"digits"``) or the path of a diffusers folder, e.g. one
            written by ``diffusolve train digits --out my-digits``.
        dtype: the network's dtype.

    Loads with ``from_pretrained`` (local files only, safetensors, never the network). The
    UNet's parameters do not require gradients; gradients with respect to ``x`` still flow
    (the caller owns autograd). A class-conditional UNet (``num_class_embeds = K``) is
    wrapped in :class:`LabelConditioned`: ``cond`` takes int labels ``0 .. K-2`` and the last
    label ``K-1`` is the null (unconditional) class, as in the models ``diffusolve train``
    writes (``K = 11`` for digits: classes 0-9, null 10); ``cond=None`` means the null class.

    Classifier-free guidance is a layer above models: ``diffusolve.load(name, guidance=w)``
    or :func:`diffusolve.guidance.classifier_free`.

    Example:
        >>> import torch
        >>> from diffusolve import sample
        >>> from diffusolve.models import load
        >>> model = load("digits")
        >>> x = model.process.prior_sample((4, 1, 16, 16), noise=0)
        >>> with torch.no_grad():
        ...     digits = sample(model, x, 20, "ddim", cond=torch.tensor([0, 1, 2, 3]))
        >>> digits.shape
        torch.Size([4, 1, 16, 16])
    """
    from .diffusers_adapter import load_diffusers

    if guidance is not None:
        raise TypeError(
            "diffusolve.models.load no longer applies classifier-free guidance (models sit "
            "below guidance); use diffusolve.load(name, guidance=w), or "
            "diffusolve.guidance.classifier_free(diffusolve.models.load(name), w)."
        )
    folder = _resolve(name)
    base = load_diffusers(folder, dtype=dtype)
    base.unet.eval().requires_grad_(False)
    k = getattr(getattr(base.unet, "config", None), "num_class_embeds", None)
    if k:
        if int(k) < 2:
            raise ValueError(f"{folder}: num_class_embeds={k}; a label model needs at least 2")
        return LabelConditioned(base, num_labels=int(k), null=int(k) - 1)
    return base


def _resolve(name: str | Path) -> Path:
    """The folder of bundled model ``name``, or ``name`` itself when it is a folder."""
    if isinstance(name, str) and name in BUNDLED:
        return asset_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise ValueError(
        f"unknown bundled model {str(name)!r}; available: {', '.join(BUNDLED)}, or the path "
        "of a local diffusers folder (e.g. one written by `diffusolve train digits --out DIR`)"
    )


def load_classifier(name: str = "digits") -> torch.nn.Module:
    """The bundled noise-aware classifier of ``name`` (``net(x_t, t) -> logits``,
    ``net.features(x_t, t)`` for FD-digits), in eval mode, parameters frozen."""
    from .classifier import load_classifier_from

    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; available: {BUNDLED}")
    return load_classifier_from(Path(__file__).resolve().parent.parent / "assets" / name)
