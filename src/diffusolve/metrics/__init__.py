"""Sample metrics against exact references (sliced Wasserstein and its noise floor, errors,
Frechet distance). Depends on torch, numpy, scipy and POT only, never on other diffusolve
modules; FD-digits is :func:`diffusolve.models.fd_digits`."""

from .fd import MOVED, FrechetTarget, fd, frechet_distance
from .sliced import random_projections, rel_error, sliced_wasserstein, sw_noise_floor

__all__ = ["sliced_wasserstein", "sw_noise_floor", "rel_error", "random_projections"]
__all__ += ["frechet_distance", "fd", "FrechetTarget"]


def __getattr__(name: str):
    if name in MOVED:
        raise ImportError(
            f"diffusolve.metrics.{name} moved to {MOVED[name]} (metrics no longer depends on "
            f"the bundled model); use `from diffusolve.models import {name}`."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
