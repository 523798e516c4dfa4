"""Import every solver module so that the registry is complete."""

from . import ddim, deis, dpm_multistep, dpm_solver, dpmpp_ancestral, euler, lcm, pndm, unipc  # noqa: F401
from .bdia import BDIADDIM  # noqa: F401  (bdia_ddim, bdia_edm)
from .interpolant import InterpolantSDE  # noqa: F401  (si_sde)
from .search import ns, usf  # noqa: F401,E402  (per-step decisions; fitted linear)
