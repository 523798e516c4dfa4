"""The small noise-aware digits classifier ``p(y | x_t, t)`` (network and loader).

The network sees a noised digit ``x_t = alpha(t) x0 + sigma(t) eps`` of the bundled model's
process (DDPM, linear betas, 1,000 steps; ``t`` in diffusers timestep units 0..999) and the
time ``t``. Its penultimate features at ``t = t_min`` on clean images define FD-digits
(:func:`diffusolve.models.fd_digits`); the same network can serve classifier guidance.
Training lives in :mod:`diffusolve.train.classifier`.

Architecture: three conv stages (16x16 -> 8x8 -> 4x4, widths 16/32/64) of conv + GroupNorm
+ SiLU, each modulated (FiLM scale/shift) by an MLP of a sinusoidal embedding of ``t``;
global average pooling, a linear layer to ``feature_dim`` features (+ SiLU), then the logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import NUM_CLASSES

__all__ = ["NoiseAwareClassifier", "load_classifier_from", "CLASSIFIER_FILE", "CLASSIFIER_CONFIG"]

CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier_config.json"


def _time_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, t_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.film = nn.Linear(t_dim, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(h)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
        return nn.functional.silu(self.norm2(self.conv2(h)))


class NoiseAwareClassifier(nn.Module):
    """``logits = net(x_t, t)`` for ``x_t`` of shape ``[B, 1, 16, 16]`` and ``t`` of shape
    ``[B]`` or 0-d (process time, diffusers timestep units).

    :meth:`features` returns the ``feature_dim`` penultimate activations used by FD-digits.

    Example:
        >>> import torch
        >>> from diffusolve.models.classifier import NoiseAwareClassifier
        >>> net = NoiseAwareClassifier()
        >>> net(torch.zeros(2, 1, 16, 16), torch.tensor(0.0)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        feature_dim: int = 64,
        t_dim: int = 64,
        num_classes: int = NUM_CLASSES,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.time_scale = float(time_scale)
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        blocks, c = [], 1
        for i, w in enumerate(widths):
            blocks.append(_Block(c, w, 1 if i == 0 else 2, t_dim))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(c, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.t_mlp(_time_embedding(t * self.time_scale, self.t_dim))
        h = x
        for block in self.blocks:
            h = block(h, temb)
        return nn.functional.silu(self.proj(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.head(self.features(x, t))


def load_classifier_from(folder: str | Path) -> NoiseAwareClassifier:
    """Load a classifier saved by :func:`diffusolve.train.classifier.train_classifier`
    (safetensors, never pickle), in eval mode with gradients disabled on its parameters.

    A missing, corrupt or mismatched file raises one ``ValueError`` / ``FileNotFoundError``
    that names the file and how to fix it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CLASSIFIER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found; train it with `diffusolve train digits-classifier`."
        )
    fix = "retrain it with `diffusolve train digits-classifier --out <folder> --force`"
    try:
        cfg = json.loads(cfg_path.read_text())
        net = NoiseAwareClassifier(
            tuple(cfg["widths"]),
            cfg["feature_dim"],
            cfg["t_dim"],
            cfg["num_classes"],
            cfg["time_scale"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path} is not a valid classifier config ({err}); {fix}") from None
    weights = folder / CLASSIFIER_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; {fix}.")
    try:
        net.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read the classifier weights {weights} ({first}); {fix}") from None
    return net.eval().requires_grad_(False)
