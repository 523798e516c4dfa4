"""Analytic priors with exact score, denoiser, density and probability-flow references."""

from .gaussian import Gaussian

__all__ = ["Gaussian"]
