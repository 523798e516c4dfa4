"""Imports every inverter module so that each registers itself (one line per file)."""

from . import (
    bdia,  # noqa: F401
    belm,  # noqa: F401
    ddcm,  # noqa: F401
    direct,  # noqa: F401
    edict,  # noqa: F401
    fixed_point,  # noqa: F401
    null_text,  # noqa: F401
    renoise,  # noqa: F401
    reverse,  # noqa: F401
    rf,  # noqa: F401
)
