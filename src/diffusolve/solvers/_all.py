"""Import every solver module so that the registry is complete."""

from . import ddim, euler, lcm  # noqa: F401
