"""Named restoration tasks on images: the operators of ``diffusolve restore`` and of the
image part of ``diffusolve bench inverse``.

Each task builds a linear operator for an image shape ``(C, H, W)``; the measurement noise
is Gaussian with the std chosen by the caller (``sigma_y``).

Example:
    >>> from diffusolve.inverse.tasks import IMAGE_TASKS, make_task
    >>> sorted(IMAGE_TASKS)
    ['cs25', 'deblur', 'inpaint-box', 'inpaint-random', 'sr4']
    >>> make_task("sr4", (1, 16, 16)).out_shape
    (1, 4, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Operator
from .blur import Blur, gaussian_kernel
from .matrix import CompressedSensing
from .pixel import Inpainting, box_mask, random_pixel_mask
from .resample import SuperResolution

__all__ = ["IMAGE_TASKS", "make_task"]


def _box(shape: tuple[int, ...], seed: int) -> Operator:
    c, h, w = shape
    bh, bw = max(1, h * 3 // 8), max(1, w * 3 // 8)  # a centred box, 6x6 on 16x16
    mask = box_mask((h, w), ((h - bh) // 2, (w - bw) // 2, bh, bw))
    return Inpainting(mask.expand(c, h, w).clone(), shape)


def _random(shape: tuple[int, ...], seed: int) -> Operator:
    c, h, w = shape
    mask = random_pixel_mask((h, w), 0.5, seed=seed)  # the same pixels in every channel
    return Inpainting(mask.expand(c, h, w).clone(), shape)


def _sr4(shape: tuple[int, ...], seed: int) -> Operator:
    return SuperResolution(shape, 4, "avg")


def _deblur(shape: tuple[int, ...], seed: int) -> Operator:
    return Blur(gaussian_kernel(1.0, size=5), shape)


def _cs25(shape: tuple[int, ...], seed: int) -> Operator:
    return CompressedSensing(shape, ratio=0.25, seed=seed)


#: task name -> (description, builder(shape, seed) -> operator)
IMAGE_TASKS: dict[str, tuple[str, Callable[[tuple[int, ...], int], Operator]]] = {
    "inpaint-box": ("box inpainting (a centred box of 3/8 of each side hidden)", _box),
    "inpaint-random": ("random-pixel inpainting (50% of the pixels kept)", _random),
    "sr4": ("4x super-resolution (average pooling)", _sr4),
    "deblur": ("Gaussian deblurring (std 1 pixel, 5x5 kernel, circular)", _deblur),
    "cs25": ("compressed sensing (25% random Gaussian measurements)", _cs25),
}


def make_task(name: str, shape: Sequence[int], seed: int = 0) -> Operator:
    """The operator of task ``name`` for images of ``shape`` ``(C, H, W)``.

    ``seed`` fixes the random parts (the random-pixel mask, the sensing matrix).
    """
    if name not in IMAGE_TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(IMAGE_TASKS))}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"image tasks need a (C, H, W) shape; got {shape}")
    if name == "sr4" and (shape[1] % 4 or shape[2] % 4):
        raise ValueError(f"sr4 needs a height and width divisible by 4; got {shape[1:]}")
    return IMAGE_TASKS[name][1](shape, int(seed))
