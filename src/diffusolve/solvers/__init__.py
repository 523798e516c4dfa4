"""Solvers: stateless steps over an explicit time grid, one registry, one loop."""

from .base import (
    ALIASES,
    REGISTRY,
    BoundModel,
    Solver,
    StepContext,
    get_solver,
    list_solvers,
    register,
)
from .loop import FINALS, grid_for_nfe, sample, steps_for_nfe
from .noise import GeneratorNoise, NoiseSource, SeededNoise

__all__ = [
    "ALIASES",
    "REGISTRY",
    "BoundModel",
    "Solver",
    "StepContext",
    "FINALS",
    "get_solver",
    "list_solvers",
    "register",
    "grid_for_nfe",
    "sample",
    "steps_for_nfe",
    "GeneratorNoise",
    "NoiseSource",
    "SeededNoise",
]
