"""Off-the-shelf *clean* digits classifiers ``net(x0) -> logits`` (network and loaders).

Small ResNet-style CNNs with ReLU activations (declared as ``nn.ReLU`` modules, so
:func:`diffusolve.guidance.softplus_relu` can swap them), trained on clean train-split
digits only (:mod:`diffusolve.train.clean_classifier`), never on noised images. Two are
shipped in ``assets/digits/``:

- the **guide** (``clean_classifier.safetensors``): what EluCD and loss guidance use;
- the **judge** (``judge_classifier.safetensors``): another seed and width, used only to
  *measure* target-class accuracy of guided samples (no guidance method ever uses it).

Architecture: a 3x3 stem conv (width ``w``) + ReLU, then three stages (16x16, 8x8, 4x4; widths
``w, 2w, 4w``) of one residual block each (conv-GroupNorm-ReLU-conv-GroupNorm, ``gcd(8, width)`` groups, a strided
1x1 projection on the shortcut when the shape changes, ReLU after the sum), global average
pooling and a linear layer to the 10 logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import Tensor, nn

from .data import NUM_CLASSES

__all__ = [
    "CleanClassifier",
    "load_clean_classifier_from",
    "load_clean_classifier",
    "load_judge_classifier",
    "GUIDE_FILE",
    "JUDGE_FILE",
]

GUIDE_FILE = "clean_classifier"
JUDGE_FILE = "judge_classifier"


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))
        )
        self.act2 = nn.ReLU()

    def forward(self, h: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(h)))))
        return self.act2(out + self.skip(h))


class CleanClassifier(nn.Module):
    """``logits = net(x)`` for clean digits ``x`` ``[B, 1, 16, 16]`` in [-1, 1].

    Example:
        >>> import torch
        >>> from diffusolve.models.clean_classifier import CleanClassifier
        >>> net = CleanClassifier(width=8)
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
        self.width = int(width)
        w = self.width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), _norm(w), nn.ReLU())
        self.stages = nn.Sequential(
            _ResBlock(w, w, 1), _ResBlock(w, 2 * w, 2), _ResBlock(2 * w, 4 * w, 2)
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def load_clean_classifier_from(folder: str | Path, name: str = GUIDE_FILE) -> CleanClassifier:
    """Load ``<name>.safetensors`` + ``<name>_config.json`` from ``folder`` (written by
    :func:`diffusolve.train.clean_classifier.train_clean_classifier`), in eval mode with its
    parameters frozen. A missing or corrupt file raises an error that says how to rebuild it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / f"{name}_config.json"
    fix = f"retrain it with `diffusolve train digits-clean-classifier --out {folder} --force`"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found; {fix}")
    try:
        cfg = json.loads(cfg_path.read_text())
        net = CleanClassifier(int(cfg["width"]), int(cfg["num_classes"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{cfg_path} is not a valid clean-classifier config ({err}); {fix}"
        ) from None
    weights = folder / f"{name}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; {fix}")
    try:
        net.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {weights} ({first}); {fix}") from None
    return net.eval().requires_grad_(False)


def _asset(name: str) -> Path:
    if name != "digits":
        raise ValueError(f"no bundled clean classifier for {name!r}; available: 'digits'")
    return Path(__file__).resolve().parent.parent / "assets" / "digits"


def load_clean_classifier(name: str = "digits") -> CleanClassifier:
    """The bundled clean **guide** classifier of ``name`` (``net(x0) -> logits``)."""
    return load_clean_classifier_from(_asset(name), GUIDE_FILE)


def load_judge_classifier(name: str = "digits") -> CleanClassifier:
    """The bundled clean **judge** classifier of ``name``: for measuring target-class accuracy
    of samples only; no guidance method uses it."""
    return load_clean_classifier_from(_asset(name), JUDGE_FILE)
