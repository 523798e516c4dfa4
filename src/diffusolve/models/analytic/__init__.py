"""Analytic priors with exact score, denoiser, density and probability-flow references."""

from .conditional import ClassConditionalMixture
from .empirical import Empirical
from .gaussian import Gaussian
from .gmm import GaussianMixture
from .reference import pf_ode_solve, reference_accuracy

__all__ = ["ClassConditionalMixture", "Gaussian", "GaussianMixture", "Empirical"]
__all__ += ["pf_ode_solve", "reference_accuracy"]
