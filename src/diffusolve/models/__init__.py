"""Models: the Denoiser contract, adapters and analytic priors."""

from .analytic import Gaussian
from .base import CallableDenoiser, Denoiser, DynamicThresholding, from_callable

__all__ = ["Denoiser", "CallableDenoiser", "DynamicThresholding", "from_callable", "Gaussian"]
