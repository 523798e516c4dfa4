"""Imports every inverter module so that each registers itself (one line per file)."""

from . import reverse  # noqa: F401
from . import edict  # noqa: F401
from . import bdia  # noqa: F401
from . import belm  # noqa: F401
from . import fixed_point  # noqa: F401
from . import renoise  # noqa: F401
from . import null_text  # noqa: F401
from . import direct  # noqa: F401
from . import ddcm  # noqa: F401
from . import rf  # noqa: F401
