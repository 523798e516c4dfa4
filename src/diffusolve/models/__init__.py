"""Models: the Denoiser contract, adapters, analytic priors and the bundled digits model
(with its classifier, data and FD-digits)."""

from .analytic import Empirical, Gaussian, GaussianMixture
from .base import CallableDenoiser, Denoiser, DynamicThresholding, from_callable
from .bundled import LabelConditioned, TokenConditioned, load, load_classifier
from .diffusers_adapter import DiffusersDenoiser, from_diffusers, load_diffusers
from .digits_metric import digits_features, fd_digits, fd_digits_noise_floor
from .precision import NetworkPrecision, compile_network

__all__ = ["Denoiser", "CallableDenoiser", "DynamicThresholding", "from_callable", "Gaussian"]
__all__ += ["DiffusersDenoiser", "from_diffusers", "load_diffusers"]
__all__ += ["GaussianMixture", "Empirical"]
__all__ += ["load", "load_classifier", "LabelConditioned", "TokenConditioned"]
__all__ += ["fd_digits", "fd_digits_noise_floor", "digits_features"]
__all__ += ["NetworkPrecision", "compile_network"]
