"""Measured attributes of digit images (stroke thickness, slant, size) and caption words.

Every measure works on the ink map ``ink = clamp((x + 1) / 2, 0, 1)`` of images
``[B, 1, H, W]`` in [-1, 1] (1 = ink, 0 = paper), in pixel units, and returns one float per
image (a tensor ``[B]``). Pixel ``(r, c)`` sits at ``u = c`` (rightwards) and ``v = -r``
(upwards); ``m`` is the ink mass, ``(u0, v0)`` the ink centroid and ``C`` the ink-weighted
covariance of ``(u, v)``.

- **thickness** = ``2 * area / perimeter`` with ``area = sum(ink)`` and ``perimeter`` the
  total variation of the ink map (sum of ``|grad ink|``, forward differences). For a stroke
  of length ``l`` and width ``w`` (``l >> w``) the area is ``l w`` and the perimeter ``2 l``,
  so this is ``w``; the total variation counts each edge once whatever its blur, so the
  bilinear upsampling of the data does not bias it. Dilating a digit raises it; a shear
  barely changes it.
- **slant** = ``C_uv / C_vv``: the horizontal shift per unit of height of the least-squares
  line ``u - u0 = slant * (v - v0)`` (the shear that deskewing would remove). **Positive =
  the top leans right** (italic, ``"slanted-right"``); negative = the top leans left.
  Shearing by ``u -> u + k v`` adds ``k``.
- **size** = ``2 sqrt(3) det(C)^(1/4)``: the side of the uniform square with the same
  second-moment area (a uniform ``a x b`` rectangle gives ``sqrt(a b)``; on the pixel grid
  the variances are ``(n^2 - 1) / 12``, so ``((a^2 - 1)(b^2 - 1))^(1/4)``). Scaling a digit by
  ``s`` multiplies it by ``s``; a shear leaves it unchanged (``det`` is shear invariant), so
  size and slant do not mix. A thresholded bounding box would not work here: the data set
  normalises the digits' height (1,417 of the 1,438 training digits span all 16 rows).

An image without ink gets 0 for all three.

**Words.** Each attribute is binned into three words by its terciles *within the digit's
class* on the train split (:func:`thresholds`), so a word means "for this digit" (a thick
one and a thick eight have different stroke widths) and each word covers a third of every
class: thickness ``thin / regular / thick``, slant ``slanted-left / upright /
slanted-right``, size ``small / medium / large``. A full caption is
``"<thickness> <slant> <size> <digit>"`` (e.g. ``"thick slanted-left small three"``); the
model is trained with words dropped, so any subset in this order is a valid caption
(``"thick three"``, ``"three"``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_WORDS",
    "DIGIT_WORDS",
    "ink",
    "thickness",
    "slant",
    "size",
    "measure",
    "thresholds",
    "attribute_bins",
    "caption_words",
    "captions",
    "parse_caption",
]

#: the measured attributes, in caption order
ATTRIBUTES = ("thickness", "slant", "size")
#: per attribute, the words of its low, middle and high tercile
ATTRIBUTE_WORDS: dict[str, tuple[str, str, str]] = {
    "thickness": ("thin", "regular", "thick"),
    "slant": ("slanted-left", "upright", "slanted-right"),
    "size": ("small", "medium", "large"),
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_EPS = 1e-6


def _check(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 1, H, W] in [-1, 1], got {shape}")
    return images


def ink(images: Tensor) -> Tensor:
    """The ink map ``clamp((x + 1) / 2, 0, 1)`` of images ``[B, 1, H, W]`` in [-1, 1]."""
    return ((_check(images).to(torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)


def _moments(images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ink mass ``[B]`` and the covariance entries ``C_uu, C_uv, C_vv`` ``[B]``."""
    p = ink(images)[:, 0]
    h, w = p.shape[-2:]
    u = torch.arange(w, dtype=p.dtype, device=p.device).view(1, 1, w)
    v = -torch.arange(h, dtype=p.dtype, device=p.device).view(1, h, 1)
    m = p.sum((1, 2))
    mm = m.clamp_min(_EPS)
    u0 = (p * u).sum((1, 2)) / mm
    v0 = (p * v).sum((1, 2)) / mm
    du = u - u0.view(-1, 1, 1)
    dv = v - v0.view(-1, 1, 1)
    cuu = (p * du * du).sum((1, 2)) / mm
    cuv = (p * du * dv).sum((1, 2)) / mm
    cvv = (p * dv * dv).sum((1, 2)) / mm
    return m, cuu, cuv, cvv


def thickness(images: Tensor) -> Tensor:
    """Stroke width in pixels, ``2 * sum(ink) / TV(ink)``, per image ``[B]`` (float64)."""
    p = ink(images)[:, 0]
    # paper around the image: an edge at the border counts
    q = torch.nn.functional.pad(p, (1, 1, 1, 1))
    gx = q[:, :-1, 1:] - q[:, :-1, :-1]
    gy = q[:, 1:, :-1] - q[:, :-1, :-1]
    tv = (gx * gx + gy * gy + 1e-12).sqrt().sum((1, 2))  # eps: a finite gradient at 0
    m = p.sum((1, 2))
    return torch.where(m > _EPS, 2.0 * m / tv.clamp_min(_EPS), torch.zeros_like(m))


def slant(images: Tensor) -> Tensor:
    """Horizontal shift per unit of height, ``C_uv / C_vv`` (positive: the top leans right),
    per image ``[B]`` (float64)."""
    m, _, cuv, cvv = _moments(images)
    return torch.where((m > _EPS) & (cvv > _EPS), cuv / cvv.clamp_min(_EPS), torch.zeros_like(m))


def size(images: Tensor) -> Tensor:
    """Side in pixels of the uniform square with the ink's second-moment area,
    ``2 sqrt(3) det(C)^(1/4)``, per image ``[B]`` (float64)."""
    m, cuu, cuv, cvv = _moments(images)
    det = (cuu * cvv - cuv * cuv).clamp_min(0.0)
    return torch.where(m > _EPS, 2.0 * 3.0**0.5 * det.pow(0.25), torch.zeros_like(m))


def measure(images: Tensor) -> Tensor:
    """The three attributes ``[B, 3]`` (float64) in :data:`ATTRIBUTES` order.

    Example:
        >>> from diffusolve.models.attributes import measure
        >>> from diffusolve.models.data import load_digits
        >>> measure(load_digits("heldout")[0][:2]).shape
        torch.Size([2, 3])
    """
    return torch.stack([thickness(images), slant(images), size(images)], dim=1)


@lru_cache(maxsize=1)
def _train_thresholds() -> Tensor:
    from .data import NUM_CLASSES, load_digits

    x, y = load_digits("train")
    values = measure(x)
    q = torch.tensor([1.0 / 3.0, 2.0 / 3.0], dtype=torch.float64)
    return torch.stack(
        [torch.quantile(values[y == c], q, dim=0).T for c in range(NUM_CLASSES)]
    )  # [10, 3, 2]


def thresholds() -> Tensor:
    """Per class and attribute, the lower and upper terciles on the train split:
    ``[10, 3, 2]`` float64 (class, attribute in :data:`ATTRIBUTES` order, (low, high))."""
    return _train_thresholds().clone()


def attribute_bins(images: Tensor, labels: Tensor | int, cuts: Tensor | None = None) -> Tensor:
    """Tercile bins ``[B, 3]`` (0 low, 1 middle, 2 high) of each attribute, cut at the
    thresholds of each image's class ``labels`` (an int or ``[B]``).

    A value equal to a cut falls in the lower bin. ``cuts`` defaults to :func:`thresholds`.
    """
    values = measure(images)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(len(values))
    cuts = thresholds() if cuts is None else cuts.to(torch.float64)
    c = cuts.to(values.device)[labels.to(values.device)]  # [B, 3, 2]
    return (values > c[..., 0]).long() + (values > c[..., 1]).long()


def caption_words(image: Tensor, label: int) -> list[str]:
    """The full caption of one digit as words: ``[thickness, slant, size, digit]``.

    ``image`` is ``[1, H, W]`` or ``[1, 1, H, W]``, ``label`` its digit (0-9), which selects
    the thresholds (terciles of that class on the train split).

    Example:
        >>> from diffusolve.models.attributes import caption_words
        >>> from diffusolve.models.data import load_digits
        >>> x, y = load_digits("train")
        >>> words = caption_words(x[0], int(y[0]))
        >>> len(words), words[-1] == "zero"
        (4, True)
    """
    x = image if image.ndim == 4 else image.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"caption_words takes one image; use captions() for a batch of {len(x)}")
    bins = attribute_bins(x, int(label))[0].tolist()
    words = [ATTRIBUTE_WORDS[a][b] for a, b in zip(ATTRIBUTES, bins, strict=True)]
    return words + [DIGIT_WORDS[int(label)]]


def captions(images: Tensor, labels: Tensor) -> list[str]:
    """Full captions (``"thin upright large seven"``) of images ``[B, 1, H, W]`` with digit
    labels ``[B]``."""
    bins = attribute_bins(images, labels).tolist()
    return [
        " ".join([ATTRIBUTE_WORDS[a][k] for a, k in zip(ATTRIBUTES, b, strict=True)])
        + " "
        + DIGIT_WORDS[int(d)]
        for b, d in zip(bins, torch.as_tensor(labels).reshape(-1).tolist(), strict=True)
    ]


def parse_caption(caption: str) -> tuple[int | None, dict[str, int]]:
    """The digit (or ``None``) and the requested bin of each attribute named in ``caption``.

    Example:
        >>> from diffusolve.models.attributes import parse_caption
        >>> parse_caption("thick slanted-left three")
        (3, {'thickness': 2, 'slant': 0})
    """
    digit: int | None = None
    bins: dict[str, int] = {}
    for word in caption.lower().split():
        if word in DIGIT_WORDS:
            digit = DIGIT_WORDS.index(word)
            continue
        for attr in ATTRIBUTES:
            if word in ATTRIBUTE_WORDS[attr]:
                bins[attr] = ATTRIBUTE_WORDS[attr].index(word)
                break
        else:
            known = list(DIGIT_WORDS) + [w for a in ATTRIBUTES for w in ATTRIBUTE_WORDS[a]]
            raise ValueError(f"unknown word {word!r} in {caption!r}; known words: {known}")
    return digit, bins
