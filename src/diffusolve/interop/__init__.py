"""Interoperability: our solvers behind other tools' sampler interfaces.

``diffusolve.interop.diffusers`` (re-exported as ``diffusolve.diffusers``) holds
:class:`DiffusolveScheduler`, a diffusers scheduler running any registered solver;
``replay`` holds the push-driven solve it is built on.
"""
