"""Posterior samplers with a diffusion prior: one contract, one file per method.

Every sampler is a frozen dataclass of its options (paper defaults) that declares what it
needs from the operator and refuses others with an error naming what is missing; run one
with :meth:`PosteriorSampler.run` (see :mod:`.base`), or by name with :func:`restore`.

Example:
    >>> import torch
    >>> from diffusolve.inverse import Inpainting, PhaseRetrieval
    >>> from diffusolve.inverse.samplers import get_sampler
    >>> get_sampler("ddrm").check(PhaseRetrieval((1, 4, 4)))
    Traceback (most recent call last):
    ...
    NotImplementedError: ddrm needs an SVD, and PhaseRetrieval...
"""

from .base import SAMPLERS, PosteriorSampler, Problem, get_sampler, register
from .daps import DAPS
from .ddnm import DDNM, DDNMPlus
from .ddrm import DDRM
from .dds import DDS
from .diffpir import DiffPIR
from .dps import DPS
from .flowchef import FlowChef
from .mcgdiff import MCGdiff
from .pigdm import PiGDM
from .reddiff import REDDiff
from .repaint import RePaint
from .tds import TDS

__all__ = [
    "SAMPLERS",
    "PosteriorSampler",
    "Problem",
    "get_sampler",
    "register",
    "restore",
    "DPS",
    "PiGDM",
    "DDRM",
    "DDNM",
    "DDNMPlus",
    "DiffPIR",
    "DDS",
    "DAPS",
    "REDDiff",
    "FlowChef",
    "RePaint",
    "MCGdiff",
    "TDS",
]


def restore(model, operator, y, sigma_y=0.0, method="pigdm", *, steps=100, **kwargs):
    """Run the posterior sampler ``method`` (a name or a sampler object).

    Keyword arguments that are options of the sampler configure it; the others go to
    :meth:`PosteriorSampler.run` (``noise``, ``x``, ``grid``, ``cond``, ``dtype``,
    ``progress``, ``callback``, ``stats``).
    """
    import dataclasses

    sampler = get_sampler(method)
    fields = {f.name for f in dataclasses.fields(sampler)}
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if opts:
        sampler = sampler.replace(**opts)
    return sampler.run(model, operator, y, sigma_y, steps=steps, **kwargs)
