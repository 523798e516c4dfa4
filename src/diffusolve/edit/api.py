"""``diffusolve.edit``: invert an image under a source condition, regenerate under a target."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..guidance import check_scale
from ..inversion.base import sampling_grid
from .attention import require_cross_attention
from .methods import EditContext, EditMethod, get_method

__all__ = ["edit", "prepare_cond"]


def _is_text_model(model: Any) -> bool:
    return hasattr(model, "tokenizer") and hasattr(model, "embed")


def _is_prompt(cond: Any) -> bool:
    if isinstance(cond, str):
        return True
    return isinstance(cond, (list, tuple)) and bool(cond) and all(isinstance(c, str) for c in cond)


def _batch_ids(ids: Tensor, batch: int) -> Tensor:
    ids = ids if ids.ndim == 2 else ids.reshape(1, -1)
    if ids.shape[0] == batch:
        return ids
    if ids.shape[0] == 1:
        return ids.expand(batch, -1)
    raise ValueError(f"got {ids.shape[0]} prompts for a batch of {batch} images")


def prepare_cond(model: Any, cond: Any, batch: int) -> tuple[Any, Tensor | None]:
    """A condition ready for the model's forward pass, and its token ids ``[B, L]`` if any.

    Text models (with ``tokenizer`` and ``embed``): prompts go through
    ``tokenizer.encode`` (whose error on an unknown word passes through) and ``embed``;
    token ids through ``embed``; embeddings ``[B or 1, L, D]`` are used as given. Other
    models: tensors of batch 1 are expanded to the batch, anything else is passed as is
    (class labels).
    """
    if _is_text_model(model):
        ids = None
        if _is_prompt(cond):
            ids = model.tokenizer.encode(cond if isinstance(cond, str) else list(cond))
        elif isinstance(cond, Tensor) and not cond.is_floating_point():
            ids = cond
        if ids is not None:
            ids = _batch_ids(ids, batch)
            return model.embed(ids, batch).detach(), ids
        return model.embed(cond, batch).detach(), None
    if isinstance(cond, Tensor) and cond.ndim >= 1 and cond.shape[0] == 1 and batch > 1:
        return cond.expand((batch,) + tuple(cond.shape[1:])), None
    return cond, None


def edit(
    model: Any,
    image: Tensor,
    *,
    source: Any,
    target: Any,
    method: str | EditMethod = "direct",
    steps: int | Tensor = 50,
    guidance: float | None = None,
    seed: int = 0,
    null_cond: Any = None,
    t_start: float | None = None,
    **options: Any,
) -> Tensor:
    """Edit ``image`` from the ``source`` condition to the ``target`` condition.

    Args:
        model: a conditional denoiser: a text model (``diffusolve.models.load("digits-tokens")``
            or any denoiser with ``tokenizer``/``embed``/``null_cond``), a class-conditional
            one (``diffusolve.load("digits")``; inversion-based methods only) or a diffusers
            UNet with embedding conditions (:func:`~diffusolve.models.from_diffusers`, with
            ``null_cond``).
        image: the batch to edit (data at the clean end of the grid; latents for a latent
            model); not modified.
        source, target: the conditions (prompts, token ids, embeddings or labels).
        method: an edit method name (``diffusolve.edit.list_methods()``) or object.
        steps: the number of steps (or a decreasing sampling grid).
        guidance: the classifier-free guidance scale of the regeneration; default: the
            method's paper value (``type(method).default_guidance``).
        seed: kept for stochastic methods; every method here is deterministic, so it does
            not change the result.
        null_cond: the unconditional input for guidance (text models use their empty
            prompt; class models their null class).
        t_start: invert only up to this time (an editing strength), default ``t_max``.
        **options: the method's options (e.g. ``cross_replace_steps=0.6`` for ``p2p``,
            ``equalizer={"thick": 2.0}``; an inverter's options for inversion-based methods).

    Returns:
        The edited batch, the state at the clean end of the grid.

    Example:
        >>> import torch, diffusolve
        >>> model = diffusolve.load("digits")
        >>> x = torch.zeros(1, 1, 16, 16)
        >>> with torch.no_grad():
        ...     y = diffusolve.edit(model, x, source=3, target=8, method="p2p")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: edit method 'p2p' needs cross-attention layers ...
    """
    del seed  # deterministic methods only (see the docstring)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim < 2:
        raise ValueError("image must be a batch [B, ...]")
    m = get_method(method, **options)
    if m.needs_attention:
        require_cross_attention(model, m.name)
    w = check_scale(type(m).default_guidance if guidance is None else guidance)
    b = image.shape[0]
    src, src_ids = prepare_cond(model, source, b)
    tgt, tgt_ids = prepare_cond(model, target, b)
    null = null_cond
    if null is None and _is_text_model(model):
        null = getattr(model, "null_cond", "")
    if null is not None:
        null, _ = prepare_cond(model, null, b)
    ctx = EditContext(
        model=model,
        source=src,
        target=tgt,
        null=null,
        guidance=w,
        source_ids=src_ids,
        target_ids=tgt_ids,
        tokenizer=getattr(model, "tokenizer", None),
    )
    grid = sampling_grid(model, steps, "time_uniform", t_start)
    return m.run(ctx, image, grid)
