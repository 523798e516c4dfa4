"""Inverse problems: forward operators, noise models (and, later, posterior samplers).

See :mod:`diffusolve.inverse.base` for the operator contract (adjoint w.r.t. real inner
products, prox and SVD conventions, capability flags).

Example:
    >>> import torch
    >>> from diffusolve.inverse import GaussianNoise, SuperResolution
    >>> op = SuperResolution((1, 8, 8), 2)
    >>> x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    >>> y = GaussianNoise(0.05).sample(op(x), generator=0)
    >>> op.pinv(y).shape, sorted(op.capabilities)
    (torch.Size([4, 1, 8, 8]), ['grad', 'linear', 'pinv', 'prox', 'svd'])
"""

from .base import (
    CAPABILITIES,
    OPERATORS,
    SVD,
    Composed,
    Operator,
    compose,
    declare_needs,
    make,
    register,
)
from .blur import Blur, gaussian_kernel, motion_kernel
from .ct import CT, radon_matrix
from .fourier import FourierDiagonal
from .matrix import CompressedSensing, MatrixOperator
from .mri import MRI, mri_mask
from .noise import GaussianNoise, PoissonNoise
from .nonlinear import PhaseRetrieval, ToneCurve
from .pixel import (
    ChannelMix,
    Colourisation,
    Identity,
    Inpainting,
    box_mask,
    random_pixel_mask,
)
from .resample import Separable, SuperResolution, avgpool_matrix, bicubic_matrix

#: the denoising operator under its task name
Denoising = Identity

__all__ = [
    "CAPABILITIES",
    "OPERATORS",
    "SVD",
    "Operator",
    "Composed",
    "compose",
    "declare_needs",
    "make",
    "register",
    "FourierDiagonal",
    "Identity",
    "Denoising",
    "Inpainting",
    "random_pixel_mask",
    "box_mask",
    "ChannelMix",
    "Colourisation",
    "Separable",
    "SuperResolution",
    "avgpool_matrix",
    "bicubic_matrix",
    "Blur",
    "gaussian_kernel",
    "motion_kernel",
    "MatrixOperator",
    "CompressedSensing",
    "MRI",
    "mri_mask",
    "CT",
    "radon_matrix",
    "PhaseRetrieval",
    "ToneCurve",
    "GaussianNoise",
    "PoissonNoise",
]
