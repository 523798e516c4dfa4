"""Benchmarks against exact references: ``diffusolve bench samplers`` and ``bench overhead``.

``tasks`` (the task catalogue and references), ``settings`` (the settings search),
``runner`` (resumable jobs, one JSONL record each), ``report`` (tables and plots) and
``samplers`` (the samplers bench built from them). Heavy pieces (diffusers, matplotlib,
scipy references) are imported lazily by the modules that need them; importing
:mod:`diffusolve.bench` is cheap.
"""

__all__ = [
    "tasks",
    "settings",
    "runner",
    "samplers",
    "overhead",
    "report",
    "cli",
    "diffusers_runner",
]
