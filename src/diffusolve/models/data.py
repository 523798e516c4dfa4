"""scikit-learn's digits as 16x16 single-channel images in [-1, 1], with a fixed split.

The data set ships inside scikit-learn (no download): 1,797 grey-level 8x8 digits with values
0..16. We resize them bilinearly to 16x16 (``torch.nn.functional.interpolate``), scale to
[-1, 1] and split 80/20, stratified by class, with a fixed seed, so that the training run,
the classifier and the FD-digits metric all see the same held-out images.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SPLIT_SEED", "HELDOUT_FRACTION", "IMAGE_SIZE", "NUM_CLASSES", "load_digits", "split"]

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
IMAGE_SIZE = 16
NUM_CLASSES = 10


def _all_digits(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits as _sk_load

    bunch = _sk_load()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    if size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False
        )
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return x.contiguous(), y


def split(
    labels: Tensor, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """Stratified indices ``(train_idx, heldout_idx)``: per class, a seeded permutation and
    the first ``round(fraction * n_class)`` indices held out. Deterministic for ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values


def load_digits(part: str = "train", size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, size, size]`` (float32, in [-1, 1]) and labels ``[N]`` (int64).

    Args:
        part: ``"train"`` (80%), ``"heldout"`` (20%) or ``"all"``.
        size: output side length (16 for the bundled model; 8 keeps the originals).

    Example:
        >>> from diffusolve.models.data import load_digits
        >>> x, y = load_digits("heldout")
        >>> tuple(x.shape[1:]), float(x.min()) >= -1.0, int(y.max())
        ((1, 16, 16), True, 9)
    """
    x, y = _all_digits(size)
    if part == "all":
        return x, y
    train_idx, held_idx = split(y)
    if part == "train":
        return x[train_idx], y[train_idx]
    if part in ("heldout", "test"):
        return x[held_idx], y[held_idx]
    raise ValueError(f"part must be 'train', 'heldout' or 'all', got {part!r}")
