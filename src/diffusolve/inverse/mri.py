"""Single-coil MRI: a masked orthonormal 2-D Fourier transform of real images.

``A x = M . F x`` (complex measurements on the full ``H x W`` grid, DC at index ``[0, 0]``,
zero where the mask is 0). The adjoint for the real inner product ``Re <u, v>`` of the
measurements is ``At y = Re(F^H (conj(M) . y))`` (the real part is what makes it the adjoint
of a map from *real* images). ``A^T A = F^H diag((|M(k)|^2 + |M(-k)|^2) / 2) F``, so the
exact real SVD has singular values in ``{0, 1/sqrt(2), 1}`` for a binary mask: a frequency
sampled without its mirror image gives half of its information.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import register
from .fourier import FourierDiagonal

__all__ = ["MRI", "mri_mask"]


def mri_mask(
    shape: Sequence[int],
    acceleration: float = 4.0,
    center_fraction: float = 0.08,
    *,
    seed: int = 0,
) -> Tensor:
    """Cartesian under-sampling mask ``[H, W]`` (unshifted: DC at ``[0, 0]``): whole columns
    (phase-encoding lines), the central ``center_fraction`` of them always, the others drawn
    at random so that ``1 / acceleration`` of the columns are kept.

    Example:
        >>> from diffusolve.inverse import mri_mask
        >>> m = mri_mask((8, 16), acceleration=4, center_fraction=0.125, seed=0)
        >>> int(m[0].sum()), bool(m[:, 0].all())  # 4 of 16 lines, DC line kept
        (4, True)
    """
    h, w = (int(s) for s in shape)
    n_keep = max(1, round(w / acceleration))
    n_center = min(n_keep, max(1, round(w * center_fraction)))
    centred = torch.zeros(w, dtype=torch.bool)
    start = w // 2 - n_center // 2
    centred[start : start + n_center] = True
    g = torch.Generator().manual_seed(int(seed))
    rest = (~centred).nonzero().squeeze(1)
    pick = rest[torch.randperm(rest.numel(), generator=g)[: n_keep - n_center]]
    centred[pick] = True
    cols = torch.fft.ifftshift(centred)
    return cols[None, :].expand(h, w).to(torch.float64).clone()


@register("mri")
class MRI(FourierDiagonal):
    """Single-coil MRI with a sampling ``mask`` ``[H, W]`` (binary or non-negative weights)
    on real images ``[C, H, W]``; complex measurements ``[C, H, W]``.

    Example:
        >>> import torch
        >>> from diffusolve.inverse import MRI, mri_mask
        >>> op = MRI(mri_mask((8, 8), 2, 0.25), (1, 8, 8))
        >>> y = op(torch.randn(2, 1, 8, 8, dtype=torch.float64))
        >>> y.dtype, op.complex_output, op.dim_out
        (torch.complex128, True, 128)
    """

    complex_output = True

    def __init__(self, mask: Tensor, in_shape: Sequence[int]) -> None:
        self._init_fourier(in_shape)
        self.out_shape = self.in_shape
        mask = torch.as_tensor(mask, dtype=torch.float64)
        if tuple(mask.shape) != self.in_shape[1:]:
            raise ValueError(f"mask must be [H, W] = {self.in_shape[1:]}; got {tuple(mask.shape)}")
        if torch.any(mask < 0):
            raise ValueError("the MRI mask must be non-negative")
        self.mask = mask

    def _A(self, x: Tensor) -> Tensor:
        if x.is_complex():
            raise TypeError("MRI takes real images; the measurements are complex")
        return self._buf(self.mask, x) * torch.fft.fft2(x, norm="ortho")

    def _At(self, y: Tensor) -> Tensor:
        if not y.is_complex():
            raise TypeError("MRI measurements are complex; got a real tensor")
        return torch.fft.ifft2(self._buf(self.mask, y) * y, norm="ortho").real

    def _power(self) -> Tensor:
        return self.mask**2

    @classmethod
    def example(cls) -> MRI:
        return cls(mri_mask((6, 8), 2.0, 0.25, seed=2), (1, 6, 8))

    @classmethod
    def examples(cls) -> list[MRI]:  # a mask with unmatched mirror frequencies too
        g = torch.Generator().manual_seed(5)
        return [cls.example(), cls((torch.rand(5, 4, generator=g) < 0.5).double(), (2, 5, 4))]
