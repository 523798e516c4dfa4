"""Saving image grids (Pillow), for the CLI and the demo."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["to_uint8", "save_grid"]


def to_uint8(x: Tensor) -> Tensor:
    """Map images in [-1, 1] (``[N, C, H, W]``) to uint8 ``[N, H, W, C]``; values outside
    [-1, 1] are clamped for display only."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def save_grid(
    images: Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 4, pad: int = 1
) -> Path:
    """Save ``[N, C, H, W]`` images in [-1, 1] as one PNG grid with ``nrow`` images a row.

    Example:
        >>> import torch, tempfile, os
        >>> p = save_grid(torch.zeros(4, 1, 8, 8), os.path.join(tempfile.mkdtemp(), "g.png"))
        >>> p.suffix
        '.png'
    """
    from PIL import Image

    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    arr = to_uint8(images)
    canvas = torch.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = arr[i]
    img = canvas.numpy()
    mode = "L" if c == 1 else "RGB"
    pil = Image.fromarray(img[..., 0] if c == 1 else img, mode=mode)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path
