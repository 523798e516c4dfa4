"""Solver-schedule search: the per-step decision solver (USF), searched schedules and the
searches that find them (evolution over timesteps and decisions, finite-difference
refinement of the timesteps), scored by an honest proxy."""

from .usf import USF, Decision

__all__ = ["USF", "Decision"]
