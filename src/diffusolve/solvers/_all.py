"""Import every solver module so that the registry is complete."""

from . import ddim, deis, dpm_solver, dpmpp, euler, lcm, pndm, unipc  # noqa: F401
