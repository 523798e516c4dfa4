"""Editing: invert an image under a source condition, regenerate it under a target.

``diffusolve.edit(model, image, source=..., target=..., method=...)`` is :func:`edit`
(this module is callable). Methods (:func:`list_methods`): the inversion-based ``ddim``,
``edict``, ``bdia``, ``null_text``, ``direct``, ``ddcm`` (through
:mod:`diffusolve.inversion`) and the attention-control ``p2p`` (prompt-to-prompt word swap,
refinement and re-weighting), ``uam`` (uniform attention maps) and ``guide_rescale``
(Guide-and-Rescale), which run on text-conditioned diffusers UNets through the
attention-processor API (:mod:`diffusolve.edit.attention`).

Example:
    >>> import diffusolve
    >>> "p2p" in diffusolve.edit.list_methods() and callable(diffusolve.edit)
    True
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .api import edit, prepare_cond
from .methods import EDIT_METHODS, EditContext, EditMethod, get_method, list_methods, register

__all__ = ["edit", "prepare_cond", "EDIT_METHODS", "EditContext", "EditMethod"]
__all__ += ["get_method", "list_methods", "register"]


class _CallableModule(types.ModuleType):
    """Makes ``diffusolve.edit(...)`` call :func:`edit` whichever way the name was reached
    (``import diffusolve.edit`` binds the module on the package)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return edit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
