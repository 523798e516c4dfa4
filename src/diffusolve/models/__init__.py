"""Models: the Denoiser contract, adapters and analytic priors."""

from .analytic import Empirical, Gaussian, GaussianMixture
from .base import CallableDenoiser, Denoiser, DynamicThresholding, from_callable
from .bundled import load, load_classifier
from .diffusers_adapter import DiffusersDenoiser, from_diffusers, load_diffusers

__all__ = ["Denoiser", "CallableDenoiser", "DynamicThresholding", "from_callable", "Gaussian"]
__all__ += ["DiffusersDenoiser", "from_diffusers", "load_diffusers"]
__all__ += ["GaussianMixture", "Empirical"]
__all__ += ["load", "load_classifier"]
