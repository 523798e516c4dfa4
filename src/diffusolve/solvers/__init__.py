"""Solvers: stateless steps over an explicit time grid, one registry, one loop."""

from .base import REGISTRY, BoundModel, Solver, get_solver, list_solvers, register
from .loop import grid_for_nfe, sample, steps_for_nfe
from .noise import GeneratorNoise, NoiseSource, SeededNoise

__all__ = [
    "REGISTRY",
    "BoundModel",
    "Solver",
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
