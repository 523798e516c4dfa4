"""Composition of diffusion models.

* :mod:`.superdiff`: SuperDiff OR / AND superposition with the Ito log-density estimator
  (Skreta et al., arXiv 2412.17762), for any process ``x_t = alpha x0 + sigma eps``.
* :mod:`.product`: products of experts: the naive score sum through the reverse SDE/ODE,
  and the score sum corrected by annealed MCMC (ULA, MALA, HMC; Du et al., "Reduce, reuse,
  recycle", ICML 2023, arXiv 2302.11552); :func:`product_of_mixtures`, the exact
  normalised product of two Gaussian mixtures.
"""

from ._fields import Experts, sde_coefficients
from .check import ito_density_check
from .product import HMC, KERNELS, MALA, ULA, product_of_mixtures, product_sample
from .superdiff import (
    ESTIMATORS,
    FORMS,
    MODES,
    SuperDiffInfo,
    and_kappa,
    ito_log_density_step,
    or_kappa,
    superdiff_sample,
)

__all__ = [
    "Experts",
    "sde_coefficients",
    "ito_density_check",
    "HMC",
    "KERNELS",
    "MALA",
    "ULA",
    "product_of_mixtures",
    "product_sample",
    "FORMS",
    "ESTIMATORS",
    "MODES",
    "SuperDiffInfo",
    "and_kappa",
    "ito_log_density_step",
    "or_kappa",
    "superdiff_sample",
]
