"""``diffusolve.load``: a model by name or folder, with classifier-free guidance if asked.

It sits above :mod:`diffusolve.models` and :mod:`diffusolve.guidance` (models never import
guidance): :func:`diffusolve.models.load` gives the plain model, this adds the guidance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load"]


def load(
    name: str | Path = "digits",
    *,
    guidance: float | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> Any:
    """The bundled model ``name`` (``"digits"``, ``"digits-tokens"``) or a local diffusers
    folder as a Denoiser.

    ``guidance=w`` wraps a class-conditional model in classifier-free guidance with its null
    class (``x0 = x0_null + w (x0_label - x0_null)``; ``w`` finite and ``>= 0``: 0 =
    unconditional, 1 = conditional, > 1 = guided, diffusers' ``guidance_scale`` above 1).
    ``cond`` is an int label, a list of labels or an int tensor ``[B]``. For a caption model
    (``"digits-tokens"``) the null input is the empty caption and ``cond`` is a caption, a
    list of captions, token ids or embedded tokens
    (:class:`~diffusolve.models.bundled.TokenConditioned`).

    ``dtype`` is the network's dtype (``torch.bfloat16`` / ``torch.float16`` for a half
    network: the solver state keeps its own dtype and the x0 conversion runs in it, see
    :mod:`diffusolve.models.precision`). ``compile=True`` runs the network through
    ``torch.compile`` (:func:`~diffusolve.models.precision.compile_network`; eager with a
    warning when no compiler works).

    Example:
        >>> import torch, diffusolve
        >>> model = diffusolve.load("digits", guidance=2.0)
        >>> x = model.process.prior_sample((4, 1, 16, 16), noise=0)
        >>> with torch.no_grad():
        ...     digits = diffusolve.sample(model, x, 20, "ddim", cond=[0, 1, 2, 3])
        >>> digits.shape
        torch.Size([4, 1, 16, 16])
    """
    from .guidance import check_scale, classifier_free
    from .models import LabelConditioned
    from .models import load as load_model
    from .models.bundled import TokenConditioned

    if guidance is not None:
        guidance = check_scale(guidance)
    model = load_model(name, dtype=dtype)
    if compile:
        from .models.precision import compile_network

        model = compile_network(model)
    if guidance is None:
        return model
    if isinstance(model, TokenConditioned):  # guided on embeddings, captions outside
        return classifier_free(model, guidance)
    if not isinstance(model, LabelConditioned):
        raise ValueError(
            f"guidance needs a class-conditional model (a UNet with num_class_embeds); {name} "
            "is not one"
        )
    return classifier_free(model, guidance)
