"""Benchmarks against exact references: ``diffusolve bench samplers`` and ``bench overhead``.

Heavy pieces (diffusers, matplotlib, scipy references) are imported lazily by the modules
that need them; importing :mod:`diffusolve.bench` is cheap.
"""

__all__ = ["samplers", "overhead", "report", "cli", "diffusers_runner"]
