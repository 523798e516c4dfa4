"""Training of the off-the-shelf clean digits classifiers (the EluCD guide and the judge).

:class:`~diffusolve.models.clean_classifier.CleanClassifier` trained on *clean* train-split
digits only (``models.data.load_digits("train")``), with light augmentations: a random
translation by up to one pixel, a random contrast ``(x + 1) c - 1`` with ``c`` in
``[1 - contrast, 1]`` and Gaussian pixel noise of std ``pixel_noise`` (clean-image noise, not
the diffusion's). AdamW with a one-cycle schedule; everything is drawn from generators
seeded by ``seed``, so a run is deterministic for its seed on one thread.

The shipped pair (``diffusolve train digits-clean-classifier``):

- guide: ``--role guide --seed 0 --width 16``
- judge: ``--role judge --seed 1 --width 12``
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.clean_classifier import GUIDE_FILE, JUDGE_FILE, CleanClassifier
from ..models.data import NUM_CLASSES, load_digits
from .classifier import _shift, fit

__all__ = ["CleanClassifierConfig", "train_clean_classifier", "ROLES"]

#: role -> file stem in the output folder
ROLES = {"guide": GUIDE_FILE, "judge": JUDGE_FILE}


@dataclass
class CleanClassifierConfig:
    """Hyper-parameters of :func:`train_clean_classifier` (defaults: the shipped guide)."""

    steps: int = 1200
    seed: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 16
    max_shift: int = 1
    contrast: float = 0.2
    pixel_noise: float = 0.05
    role: str = "guide"


def outputs(role: str) -> tuple[str, str]:
    """The two files a run of ``role`` writes."""
    stem = ROLES[role]
    return f"{stem}.safetensors", f"{stem}_config.json"


def train_clean_classifier(
    cfg: CleanClassifierConfig | None = None,
    out: str | Path | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on clean train-split digits; save ``<stem>.safetensors`` + ``<stem>_config.json``
    in ``out`` (default: the packaged ``assets/digits``), ``stem`` from ``cfg.role``. Returns
    the config written, with the held-out accuracy and the wall time."""
    from safetensors.torch import save_file

    from .digits import ASSET_DIR

    cfg = cfg or CleanClassifierConfig()
    if cfg.role not in ROLES:
        raise ValueError(f"role must be one of {tuple(ROLES)}, got {cfg.role!r}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.width < 1:
        raise ValueError("steps, batch_size and width must be at least 1")
    out = Path(out) if out is not None else ASSET_DIR
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("heldout")
    net = CleanClassifier(cfg.width)

    def batch_loss(x: Tensor, y: Tensor) -> Tensor:
        x = _shift(x, cfg.max_shift, gen)
        c = 1.0 - cfg.contrast * torch.rand((len(y), 1, 1, 1), generator=gen)
        x = (x + 1.0) * c - 1.0 + cfg.pixel_noise * torch.randn(x.shape, generator=gen)
        return nn.functional.cross_entropy(net(x), y)

    run, wall = fit(
        net, x_train, y_train, batch_loss, cfg, gen, desc=f"train {cfg.role}", progress=progress
    )
    net.eval()
    with torch.no_grad():
        acc = float((net(x_test).argmax(1) == y_test).float().mean())
        train_acc = float((net(x_train).argmax(1) == y_train).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    weights, config_name = outputs(cfg.role)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / weights))
    config = {
        "class": "CleanClassifier",
        "role": cfg.role,
        "width": cfg.width,
        "num_classes": NUM_CLASSES,
        "input": "clean digits [B, 1, 16, 16] in [-1, 1]",
        "train": asdict(cfg),
        "parameters": sum(p.numel() for p in net.parameters()),
        "wall_time_s": round(wall, 1),
        "final_loss": round(run or float("nan"), 5),
        "train_accuracy": round(train_acc, 4),
        "heldout_accuracy": round(acc, 4),
    }
    (out / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return config
