"""Analysis tools: likelihoods by the probability-flow ODE, intrinsic dimension from the
score, conservativity of a learned score (issue 11).

Everything works on the denoiser contract (``model(x, t, cond) -> x0`` with its
``process``), in the scaled frame ``y = x / alpha``, ``s = sigma / alpha``
(:mod:`._field`), so every process and every model (analytic or network) is handled alike.
"""

from .conservativity import asymmetry
from .intrinsic_dim import (
    component_samples,
    flipd_id,
    flow_jacobian_id,
    low_rank_mixture,
    stanczuk_id,
)
from .likelihood import bits_per_dim, gaussian_prior, log_likelihood

__all__ = ["log_likelihood", "bits_per_dim", "gaussian_prior"]
__all__ += ["stanczuk_id", "flipd_id", "flow_jacobian_id", "low_rank_mixture"]
__all__ += ["component_samples", "asymmetry"]
