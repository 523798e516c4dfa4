"""Sample metrics against exact references (sliced Wasserstein and its noise floor, errors)."""

from .fd import digits_features, fd_digits, fd_digits_noise_floor, frechet_distance
from .sliced import random_projections, rel_error, sliced_wasserstein, sw_noise_floor

__all__ = ["sliced_wasserstein", "sw_noise_floor", "rel_error", "random_projections"]
__all__ += ["frechet_distance", "fd_digits", "fd_digits_noise_floor", "digits_features"]
