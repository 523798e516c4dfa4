"""diffusolve: training-free diffusion algorithms, checked against exact references.

Example:
    >>> import torch, diffusolve
    >>> from diffusolve.models import Gaussian
    >>> prior = Gaussian(torch.zeros(2), torch.eye(2), process=diffusolve.process.ddpm())
    >>> xT = prior.process.prior_sample((3, 2), torch.Generator().manual_seed(0))
    >>> diffusolve.sample(prior, xT, 10, "ddim").shape
    torch.Size([3, 2])

The names below are imported on first use, so that ``import diffusolve`` (and
``diffusolve --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "process": "diffusolve.process",
    "sample": "diffusolve.solvers",
    "get_solver": "diffusolve.solvers",
    "list_solvers": "diffusolve.solvers",
    "grid_for_nfe": "diffusolve.solvers",
    "steps_for_nfe": "diffusolve.solvers",
    "load": "diffusolve.loading",
    "edit": "diffusolve.edit",  # a callable module: diffusolve.edit(model, image, ...)
}

__all__ = ["process", "sample", "get_solver", "list_solvers", "grid_for_nfe", "steps_for_nfe"]
__all__ += ["load", "edit"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffusolve' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"diffusolve.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
