"""Sample metrics against exact references (sliced Wasserstein and its noise floor, errors)."""

from .sliced import random_projections, rel_error, sliced_wasserstein, sw_noise_floor

__all__ = ["sliced_wasserstein", "sw_noise_floor", "rel_error", "random_projections"]
