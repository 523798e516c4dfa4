"""Imports every inverter module so that each registers itself (one line per file)."""

from . import reverse  # noqa: F401
from . import edict  # noqa: F401
from . import bdia  # noqa: F401
from . import belm  # noqa: F401
