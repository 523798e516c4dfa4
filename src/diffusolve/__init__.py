"""diffusolve: training-free diffusion algorithms, checked against exact references.

Example:
    >>> import torch, diffusolve
    >>> from diffusolve.models import Gaussian
    >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=diffusolve.process.ddpm())
    >>> xT = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(0))
    >>> diffusolve.sample(prior, xT, 10, "ddim").shape
    torch.Size([3, 2])
"""

from . import process
from .solvers import get_solver, grid_for_nfe, list_solvers, sample, steps_for_nfe

__version__ = "0.1.0"

__all__ = ["process", "sample", "get_solver", "list_solvers", "grid_for_nfe", "steps_for_nfe"]
