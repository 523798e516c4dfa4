"""``diffusolve.diffusers``: our solvers as a diffusers scheduler.

``pipe.scheduler = DiffusolveScheduler.from_config(pipe.scheduler.config, solver="unipc_bh2_2")``
(see :mod:`diffusolve.interop.diffusers` for the design). Importing this module imports
diffusers.
"""

from diffusolve.interop.diffusers import SPACINGS, DiffusolveScheduler, DiffusolveSchedulerOutput

__all__ = ["DiffusolveScheduler", "DiffusolveSchedulerOutput", "SPACINGS"]
