"""Solver-schedule search: the per-step decision solver (USF), searched schedules and the
searches that find them (evolution over timesteps and decisions, finite-difference
refinement of the continuous parameters), scored by an honest proxy; the non-stationary
linear solver (``ns``) and the fit of its coefficients and times by autograd.

Example:
    >>> from diffusolve.solvers.search import USF, Decision, Schedule, Proxy, search
    >>> USF(decisions=(Decision("data", 1), Decision("noise", 2, 2))).order
    1
"""

from .evolve import Candidate, FDProxy, GridParam, Proxy, SearchResult, search, usf_presets
from .ns import NS, FitResult, fit, linearize
from .schedule import ProcessSpec, Schedule
from .shipped import list_shipped, load_shipped, shipped_path
from .usf import USF, Decision

__all__ = [
    "USF",
    "Decision",
    "Schedule",
    "ProcessSpec",
    "Proxy",
    "FDProxy",
    "GridParam",
    "Candidate",
    "SearchResult",
    "search",
    "usf_presets",
    "NS",
    "linearize",
    "fit",
    "FitResult",
    "list_shipped",
    "load_shipped",
    "shipped_path",
]
