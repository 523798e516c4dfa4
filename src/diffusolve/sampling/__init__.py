"""Whole-trajectory samplers from the literature that end with a registered solver.

They do not fit the one-step solver contract (:mod:`diffusolve.solvers`): each runs its own
algorithm over the whole trajectory (a Markov chain on data and noise level, an optimal
transport map to a late noise level) and then hands the samples to ``diffusolve.sample``
with any registered solver for the rest of the way.

- :func:`dmcmc_sample`: Denoising Langevin Gibbs (Kim & Ye, ICML 2023), see :mod:`.dmcmc`.
- :func:`fit_dpm_ot` / :func:`dpm_ot_sample`: DPM-OT (Li et al., ICCV 2023), semi-discrete
  optimal transport from the prior noise to data noised to a late level, see :mod:`.dpm_ot`.
"""

from .dmcmc import (
    Chain,
    ExactNoisePosterior,
    NoiseLevelNet,
    default_levels,
    dmcmc_sample,
    load_noise_estimator,
    noise_estimator_accuracy,
    save_noise_estimator,
    train_noise_estimator,
)
from .dpm_ot import (
    MemorisationRow,
    OTMap,
    distinct_fraction,
    dpm_ot_sample,
    fit_dpm_ot,
    format_memorisation_table,
    memorisation_table,
    nn_distances,
    select_t_late,
)

__all__ = [
    "select_t_late",
    "distinct_fraction",
    "Chain",
    "ExactNoisePosterior",
    "NoiseLevelNet",
    "default_levels",
    "dmcmc_sample",
    "load_noise_estimator",
    "noise_estimator_accuracy",
    "save_noise_estimator",
    "train_noise_estimator",
    "MemorisationRow",
    "OTMap",
    "dpm_ot_sample",
    "fit_dpm_ot",
    "format_memorisation_table",
    "memorisation_table",
    "nn_distances",
]
