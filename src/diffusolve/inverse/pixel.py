"""Pixel-wise operators: denoising (identity), inpainting (any mask) and channel mixing
(colourisation: RGB to grey)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Operator, register
from .linalg import per_sample

__all__ = [
    "Identity",
    "Inpainting",
    "ChannelMix",
    "Colourisation",
    "random_pixel_mask",
    "box_mask",
]


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(s) for s in shape)
    if not out or any(s < 1 for s in out):
        raise ValueError(f"shape must be non-empty with positive sizes; got {shape}")
    return out


@register("denoising")
class Identity(Operator):
    """Denoising: ``A = I`` (``y = x + noise``).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Identity
        >>> op = Identity((3, 2, 2))
        >>> x = torch.randn(1, 3, 2, 2)
        >>> bool(torch.equal(op(x), x)), op.has_svd
        (True, True)
    """

    has_svd = True
    has_pinv = True

    def __init__(self, in_shape: Sequence[int]) -> None:
        self.in_shape = self.out_shape = _shape(in_shape)

    def _A(self, x: Tensor) -> Tensor:
        return x

    def _At(self, y: Tensor) -> Tensor:
        return y

    def pinv(self, y: Tensor) -> Tensor:
        self._check(y, self.out_shape, "y")
        return y

    def prox(self, z: Tensor, y: Tensor, gamma: float | Tensor, **_: object) -> Tensor:
        self._check(z, self.in_shape, "z")
        self._check(y, self.out_shape, "y")
        g = per_sample(gamma, z)
        return (z + g * y) / (1 + g)

    def _spectrum(self):
        def flat(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1)

        return (
            torch.ones(self.dim_in, dtype=torch.float64),
            flat,
            lambda c: c.reshape(c.shape[0], *self.in_shape),
        )

    @classmethod
    def example(cls) -> Identity:
        return cls((2, 3, 3))


@register("inpainting")
class Inpainting(Operator):
    """Inpainting: ``y = mask * x`` (measurements keep the image shape; unobserved pixels
    read 0 before noise). Any non-negative mask broadcastable to ``in_shape`` (binary, or
    soft weights).

    Args:
        mask: e.g. ``[H, W]`` (shared by the channels) or ``[C, H, W]``.
        in_shape: per-sample input shape; default ``mask.shape``.

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting, box_mask
        >>> op = Inpainting(box_mask((4, 4), (1, 1, 2, 2)), (1, 4, 4))
        >>> op(torch.ones(1, 1, 4, 4))[0, 0]
        tensor([[1., 1., 1., 1.],
                [1., 0., 0., 1.],
                [1., 0., 0., 1.],
                [1., 1., 1., 1.]])
    """

    has_svd = True
    has_pinv = True

    def __init__(self, mask: Tensor, in_shape: Sequence[int] | None = None) -> None:
        mask = torch.as_tensor(mask, dtype=torch.float64)
        shape = _shape(in_shape if in_shape is not None else mask.shape)
        try:
            mask = torch.broadcast_to(mask, shape).clone()
        except RuntimeError as e:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to {shape}"
            ) from e
        if torch.any(mask < 0):
            raise ValueError("the inpainting mask must be non-negative")
        self.mask = mask
        self.in_shape = self.out_shape = shape

    def _A(self, x: Tensor) -> Tensor:
        return self._buf(self.mask, x) * x

    def _At(self, y: Tensor) -> Tensor:
        return self._buf(self.mask, y) * y

    def pinv(self, y: Tensor) -> Tensor:
        self._check(y, self.out_shape, "y")
        m = self._buf(self.mask, y)
        return torch.where(m > 0, y / torch.where(m > 0, m, torch.ones_like(m)), 0.0)

    def prox(self, z: Tensor, y: Tensor, gamma: float | Tensor, **_: object) -> Tensor:
        self._check(z, self.in_shape, "z")
        self._check(y, self.out_shape, "y")
        g, m = per_sample(gamma, z), self._buf(self.mask, z)
        return (z + g * m * y) / (1 + g * m * m)

    def _spectrum(self):
        return (
            self.mask.flatten(),
            lambda x: x.reshape(x.shape[0], -1),
            lambda c: c.reshape(c.shape[0], *self.in_shape),
        )

    @classmethod
    def example(cls) -> Inpainting:
        return cls(random_pixel_mask((4, 4), 0.5, seed=1), (2, 4, 4))


def random_pixel_mask(shape: Sequence[int], keep: float, *, seed: int = 0) -> Tensor:
    """A binary mask keeping a random ``keep`` fraction of the pixels (exactly
    ``round(keep * numel)`` of them), reproducible from ``seed``.

    Example:
        >>> from diffusolve.inverse import random_pixel_mask
        >>> int(random_pixel_mask((4, 4), 0.5).sum())
        8
    """
    shape = _shape(shape)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1]; got {keep}")
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[: round(keep * n)]
    mask = torch.zeros(n, dtype=torch.float64)
    mask[idx] = 1.0
    return mask.reshape(shape)


def box_mask(shape: Sequence[int], box: Sequence[int]) -> Tensor:
    """A binary ``[H, W]`` mask that hides the box ``(top, left, height, width)``.

    Example:
        >>> from diffusolve.inverse import box_mask
        >>> int(box_mask((8, 8), (2, 2, 4, 4)).sum())
        48
    """
    h, w = _shape(shape)
    top, left, bh, bw = (int(v) for v in box)
    if top < 0 or left < 0 or bh < 1 or bw < 1 or top + bh > h or left + bw > w:
        raise ValueError(f"box {tuple(box)} does not fit in an image of shape {(h, w)}")
    mask = torch.ones(h, w, dtype=torch.float64)
    mask[top : top + bh, left : left + bw] = 0.0
    return mask


@register("channel_mix")
class ChannelMix(Operator):
    """The same ``[C_out, C_in]`` matrix applied to the channels of every pixel.

    The SVD comes from the small SVD ``W = U_w S V_w^T``: per pixel, ``V^T x = V_w^T x``.

    Example:
        >>> import torch
        >>> from diffusolve.inverse import ChannelMix
        >>> op = ChannelMix(torch.tensor([[1.0, -1.0]]), (2, 3, 3))
        >>> op.out_shape, op.svd().rank
        ((1, 3, 3), 9)
    """

    has_svd = True
    has_pinv = True

    def __init__(self, weights: Tensor, in_shape: Sequence[int]) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        shape = _shape(in_shape)
        if w.ndim != 2 or len(shape) < 1 or w.shape[1] != shape[0]:
            raise ValueError(
                f"weights must be [C_out, C_in] with C_in = in_shape[0] = {shape[0]}; "
                f"got {tuple(w.shape)}"
            )
        self.weights = w
        self.in_shape = shape
        self.out_shape = (w.shape[0],) + shape[1:]

    def _A(self, x: Tensor) -> Tensor:
        return torch.einsum("oc,bc...->bo...", self._buf(self.weights, x), x)

    def _At(self, y: Tensor) -> Tensor:
        return torch.einsum("oc,bo...->bc...", self._buf(self.weights, y), y)

    def _spectrum(self):
        _, s, vh = torch.linalg.svd(self.weights, full_matrices=True)
        c_in = self.in_shape[0]
        s_full = torch.zeros(c_in, dtype=torch.float64)
        s_full[: s.numel()] = s
        pixels = self.dim_in // c_in

        def to_coef(x: Tensor) -> Tensor:
            c = torch.einsum("kc,bc...->bk...", self._buf(vh, x), x)
            return c.reshape(x.shape[0], -1)

        def from_coef(c: Tensor) -> Tensor:
            c = c.reshape(c.shape[0], *self.in_shape)
            return torch.einsum("kc,bk...->bc...", self._buf(vh, c), c)

        return s_full.repeat_interleave(pixels), to_coef, from_coef

    @classmethod
    def example(cls) -> ChannelMix:
        w = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
        return cls(w, (3, 3, 2))


#: ITU-R BT.601 luma weights
LUMA = (0.299, 0.587, 0.114)


@register("colourisation")
class Colourisation(ChannelMix):
    """Colourisation: an RGB image ``[3, H, W]`` seen through its grey level ``[1, H, W]``
    (``y = 0.299 R + 0.587 G + 0.114 B`` by default).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Colourisation
        >>> op = Colourisation((3, 2, 2))
        >>> op(torch.ones(1, 3, 2, 2)).squeeze()  # grey stays grey
        tensor([[1., 1.],
                [1., 1.]])
    """

    def __init__(self, in_shape: Sequence[int], weights: Sequence[float] = LUMA) -> None:
        shape = _shape(in_shape)
        if shape[0] != len(weights):
            raise ValueError(
                f"colourisation needs {len(weights)} input channels; in_shape is {shape}"
            )
        super().__init__(torch.tensor([list(weights)], dtype=torch.float64), shape)

    @classmethod
    def example(cls) -> Colourisation:
        return cls((3, 3, 3))
