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
    """

    def __init__(self, model: Any, num_labels: int = _NUM_LABELS, null: int = NULL_CLASS) -> None:
        self.model = model
        self.process = model.process
        self.num_labels = int(num_labels)
        self.null = int(null)

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
    name: str = "digits", *, guidance: float | None = None, dtype: torch.dtype = torch.float32
) -> Denoiser:
    """The bundled model ``name`` as a ready :class:`Denoiser` (``cond`` = int labels).

    Loads the packaged diffusers folder with ``from_pretrained`` (local files only, safetensors,
    never the network). With ``guidance=w`` the model is wrapped in classifier-free guidance
    (diffusers' ``guidance_scale`` convention: 1 = conditional, 0 = unconditional) with the
    null class 10. The UNet's parameters do not require gradients; gradients with respect to
    ``x`` still flow (the caller owns autograd).

    Example:
        >>> import torch
        >>> from diffusolve import sample
        >>> from diffusolve.models import load
        >>> model = load("digits", guidance=2.0)
        >>> x = model.process.prior_sample((4, 1, 16, 16), torch.Generator().manual_seed(0))
        >>> with torch.no_grad():
        ...     digits = sample(model, x, 20, "ddim", cond=torch.tensor([0, 1, 2, 3]))
        >>> digits.shape
        torch.Size([4, 1, 16, 16])
    """
    from ..guidance import ClassifierFreeGuidance
    from .diffusers_adapter import load_diffusers

    base = load_diffusers(asset_dir(name), dtype=dtype)
    base.unet.eval().requires_grad_(False)
    model: Denoiser = base
    if guidance is not None:
        model = ClassifierFreeGuidance(base, float(guidance), null_cond=torch.tensor([NULL_CLASS]))
    return LabelConditioned(model)


def load_classifier(name: str = "digits") -> torch.nn.Module:
    """The bundled noise-aware classifier of ``name`` (``net(x_t, t) -> logits``,
    ``net.features(x_t, t)`` for FD-digits), in eval mode, parameters frozen."""
    from ..train.classifier import load_classifier_from

    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; available: {BUNDLED}")
    return load_classifier_from(Path(__file__).resolve().parent.parent / "assets" / name)
