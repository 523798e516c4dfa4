"""Searched schedules that ship with the package (``diffusolve/assets/schedules``).

Each file ``<name>.json`` is a :class:`~diffusolve.solvers.search.schedule.Schedule`
written by ``diffusolve search``; the name says the task it was searched on, its NFE and
what was searched (``usf``: timesteps and per-step decisions; a solver name: timesteps
for that solver), e.g. ``gmm-d64-vp-nfe5-usf``. ``assets/schedules/README.md`` lists the
command that produced each file and its held-out error.

Example:
    >>> from diffusolve.solvers.search import list_shipped, load_shipped
    >>> "gmm-d64-vp-nfe5-unipc" in list_shipped()
    True
    >>> load_shipped("gmm-d64-vp-nfe5-unipc").nfe
    5
"""

from __future__ import annotations

from pathlib import Path

from .schedule import Schedule

__all__ = ["list_shipped", "load_shipped", "shipped_path", "SCHEDULE_DIR"]

#: the packaged folder of searched schedules
SCHEDULE_DIR = Path(__file__).resolve().parent.parent.parent / "assets" / "schedules"


def list_shipped() -> list[str]:
    """The names of the shipped schedules, sorted."""
    if not SCHEDULE_DIR.is_dir():
        return []
    return sorted(p.stem for p in SCHEDULE_DIR.glob("*.json"))


def shipped_path(name: str) -> Path:
    """The file of shipped schedule ``name`` (``ValueError`` if there is none)."""
    names = list_shipped()
    if name not in names:
        raise ValueError(f"no shipped schedule {name!r}; available: {', '.join(names)}")
    return SCHEDULE_DIR / f"{name}.json"


def load_shipped(name: str) -> Schedule:
    """The shipped schedule ``name`` (see :func:`list_shipped`)."""
    return Schedule.load(shipped_path(name))
