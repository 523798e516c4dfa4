"""Noise processes, parameterisation conversions and time grids."""

from .base import Process, as_time
from .grids import GRIDS, check_grid, make_grid
from .param import PREDICTIONS, convert, eps_from_x0, from_x0, to_x0, x0_from_eps
from .schedules import (
    PROCESSES,
    DiscreteVP,
    ddpm,
    ddpm_betas,
    edm,
    from_scheduler_config,
    get_process,
    interpolant,
    rectified_flow,
    ve,
    vp_cosine,
    vp_linear,
)

__all__ = [
    "Process",
    "as_time",
    "GRIDS",
    "check_grid",
    "make_grid",
    "PREDICTIONS",
    "convert",
    "eps_from_x0",
    "from_x0",
    "to_x0",
    "x0_from_eps",
    "PROCESSES",
    "DiscreteVP",
    "ddpm",
    "ddpm_betas",
    "edm",
    "from_scheduler_config",
    "get_process",
    "interpolant",
    "rectified_flow",
    "ve",
    "vp_cosine",
    "vp_linear",
]
