"""Attention control through diffusers' attention-processor API (no forked UNet code).

A diffusers ``UNet2DConditionModel`` computes every attention layer with a *processor*
(``unet.attn_processors``: layer name -> processor; ``unet.set_attn_processor`` swaps them).
:func:`controlled` installs, for the duration of a ``with`` block, one
:class:`ControlledProcessor` per layer that computes attention exactly as diffusers' default
``AttnProcessor`` does (``attn.to_q/to_k/to_v``, ``attn.head_to_batch_dim``,
``attn.get_attention_scores``, ``attn.batch_to_head_dim``, ``attn.to_out``) but hands the
attention probabilities ``P`` (shape ``[batch * heads, queries, keys]``) to a controller
before ``P @ V``. The original processors are restored on exit, even after an error.

Controllers (each a callable ``controller(name, probs, is_cross) -> probs``):

* :class:`AttentionStore` records the maps (cross, self or both), detached or not;
* :class:`PromptToPrompt` (Hertz et al. 2022) stores the source pass's maps, then in the
  target pass replaces cross-attention maps through a token alignment (word swap /
  refinement), re-weights token columns (``equalizer``), and replaces self-attention maps;
* :class:`UniformCrossAttention` (Mo et al., WACV 2025) sets every cross-attention map to
  ``1 / L`` (``L`` keys, the text length).

:func:`capture_output` records a submodule's output with a forward hook (Guide-and-Rescale's
feature term uses ``conv_norm_out``), removed on exit as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "find_unet",
    "cross_attention_layers",
    "controlled",
    "capture_output",
    "ControlledProcessor",
    "AttentionStore",
    "PromptToPrompt",
    "UniformCrossAttention",
    "token_alignment",
]

Controller = Callable[[str, Tensor, bool], Tensor]

_WRAPPER_ATTRS = ("model", "inner", "denoiser", "base")


def find_unet(model: Any) -> Any:
    """The diffusers UNet behind ``model`` (its ``.unet``, following wrappers such as
    classifier-free guidance or label conditioning through ``.model``), or ``None``."""
    seen: set[int] = set()
    obj = model
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        unet = getattr(obj, "unet", None)
        if unet is not None:
            return unet
        obj = next((getattr(obj, a) for a in _WRAPPER_ATTRS if hasattr(obj, a)), None)
    return None


def cross_attention_layers(unet: Any) -> list[str]:
    """The processor names (keys of ``unet.attn_processors``) of the cross-attention layers."""
    names = []
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False):
            names.append(f"{name}.processor")
    return names


def require_cross_attention(model: Any, method: str) -> Any:
    """``model``'s UNet if it has cross-attention layers with attention processors, else a
    ``ValueError`` naming what is missing."""
    unet = find_unet(model)
    alternatives = (
        "Use a text-conditioned model, e.g. diffusolve.models.load('digits-tokens') or "
        "from_diffusers(UNet2DConditionModel), or an inversion-based method ('direct', "
        "'edict', 'bdia', 'null_text', 'ddim')."
    )
    if unet is None:
        raise ValueError(
            f"edit method {method!r} controls attention through diffusers' attention "
            f"processors, but {type(model).__name__} has no diffusers UNet (no `.unet`). "
            + alternatives
        )
    if not hasattr(unet, "attn_processors") or not cross_attention_layers(unet):
        raise ValueError(
            f"edit method {method!r} needs cross-attention layers (attention to a text "
            f"condition) with diffusers attention processors, but the UNet of "
            f"{type(model).__name__} ({type(unet).__name__}) has none. " + alternatives
        )
    return unet


class ControlledProcessor:
    """diffusers' default attention computation with a controller on the probabilities.

    ``out = to_out(softmax(scale * Q K^T + mask) -> controller -> @ V)``; with a controller
    that returns its input unchanged this is diffusers' ``AttnProcessor`` exactly.
    """

    def __init__(self, controller: Controller, name: str) -> None:
        self.controller = controller
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        attention_mask = attn.prepare_attention_mask(
            attention_mask, context.shape[1], context.shape[0]
        )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        elif not is_cross:
            context = hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        probs = self.controller(self.name, probs, is_cross)
        out = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def controlled(unet: Any, controller: Controller) -> Iterator[Any]:
    """Install ``controller`` on every attention layer of ``unet`` inside the block; the
    original processors are restored on exit.

    Example:
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> from diffusolve.edit.attention import AttentionStore, controlled
        >>> unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        ...     cross_attention_dim=8, attention_head_dim=8,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        >>> store = AttentionStore("cross")
        >>> with controlled(unet, store):
        ...     _ = unet(torch.zeros(1, 1, 8, 8), 10, torch.zeros(1, 5, 8))
        >>> sorted({tuple(m.shape) for m in store.maps.values()})  # [heads, pixels, tokens]
        [(8, 16, 5), (8, 64, 5)]
    """
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: ControlledProcessor(controller, name) for name in original})
    try:
        yield unet
    finally:
        unet.set_attn_processor(original)


@contextmanager
def capture_output(module: Any) -> Iterator[dict[str, Tensor]]:
    """Record ``module``'s forward output in the yielded dict (key ``"out"``) inside the
    block; the hook is removed on exit."""
    box: dict[str, Tensor] = {}

    def hook(_mod: Any, _inp: Any, out: Tensor) -> None:
        box["out"] = out

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _kinds(which: str) -> tuple[bool, bool]:
    if which not in ("cross", "self", "both"):
        raise ValueError(f"which must be 'cross', 'self' or 'both', got {which!r}")
    return which in ("cross", "both"), which in ("self", "both")


class AttentionStore:
    """Records the attention maps of the last forward pass: ``maps[name]`` of shape
    ``[batch * heads, queries, keys]`` (queries = the layer's pixels, keys = text tokens for
    cross-attention, pixels for self-attention).

    Args:
        which: ``"cross"``, ``"self"`` or ``"both"``.
        detach: store detached copies (default); ``False`` keeps the autograd graph
            (Guide-and-Rescale's energy differentiates through the maps).
    """

    def __init__(self, which: str = "cross", *, detach: bool = True) -> None:
        self.cross, self.self_ = _kinds(which)
        self.detach = detach
        self.maps: dict[str, Tensor] = {}
        self.is_cross: dict[str, bool] = {}

    def __call__(self, name: str, probs: Tensor, is_cross: bool) -> Tensor:
        if (is_cross and self.cross) or (not is_cross and self.self_):
            self.maps[name] = probs.detach() if self.detach else probs
            self.is_cross[name] = is_cross
        return probs

    def clear(self) -> None:
        self.maps.clear()
        self.is_cross.clear()

    def token_maps(self, batch: int) -> Tensor:
        """The cross-attention maps of the largest resolution averaged over those layers and
        their heads: ``[batch, queries, keys]`` (reshape queries to ``[h, w]`` to show them)."""
        cross = [m for n, m in self.maps.items() if self.is_cross[n]]
        if not cross:
            raise ValueError("no cross-attention maps were recorded")
        q = max(m.shape[1] for m in cross)
        chosen = [m.reshape(batch, -1, q, m.shape[2]).mean(1) for m in cross if m.shape[1] == q]
        return torch.stack(chosen).mean(0)


class UniformCrossAttention:
    """Uniform cross-attention maps (Mo et al., Uniform Attention Maps, WACV 2025): every
    query attends equally to every text token, ``P = 1 / L``, so a cross-attention layer
    outputs the mean of its value vectors. Self-attention is left as is."""

    def __call__(self, name: str, probs: Tensor, is_cross: bool) -> Tensor:
        if not is_cross:
            return probs
        return torch.full_like(probs, 1.0 / probs.shape[-1])


def token_alignment(source: Tensor | None, target: Tensor | None, length: int) -> Tensor:
    """For each target token position, the source position whose cross-attention map it
    takes in prompt-to-prompt, or ``-1`` for a new token (it keeps its own map).

    Equal token runs map to each other; replaced runs map position by position (a word
    swap); inserted tokens get ``-1`` (refinement: P2P's ``A(j) = None``). Without token ids
    (embedding conditions) the alignment is the identity.
    """
    if source is None or target is None:
        return torch.arange(length)
    import difflib

    src = [int(v) for v in source.reshape(-1)]
    tgt = [int(v) for v in target.reshape(-1)]
    if len(tgt) != length:
        raise ValueError(f"the target has {len(tgt)} tokens but the maps have {length} keys")
    mapping = torch.full((len(tgt),), -1, dtype=torch.long)
    matcher = difflib.SequenceMatcher(a=src, b=tgt, autojunk=False)
    for op, i0, i1, j0, j1 in matcher.get_opcodes():
        if op in ("equal", "replace"):
            n = min(i1 - i0, j1 - j0)
            mapping[j0 : j0 + n] = torch.arange(i0, i0 + n)
    return mapping


class PromptToPrompt:
    """Prompt-to-prompt attention control (Hertz et al., Prompt-to-Prompt Image Editing with
    Cross Attention Control, 2022) between a *source* and a *target* forward pass.

    ``mode = "store"``: the source pass; its maps are recorded per layer.
    ``mode = "edit"``: the target pass; with ``M`` the source map and ``M'`` the target's own,
    for the controlled rows (the conditional half of a classifier-free-guided batch, as in
    P2P, or all rows):

    * cross-attention while ``cross_active``: ``M*[:, :, j] = M[:, :, A(j)]`` when token ``j``
      has a source token ``A(j) >= 0`` (:func:`token_alignment`), else ``M'[:, :, j]``; then
      ``M*[:, :, j] *= c_j`` (``equalizer``: attention re-weighting, no renormalisation);
    * self-attention while ``self_active``: ``M* = M`` for layers with at most
      ``self_max_queries`` queries (P2P: ``32 ** 2``).

    Outside the windows the target pass uses its own maps. The caller sets ``mode``,
    ``cross_active`` and ``self_active`` per step.

    Args:
        alignment: ``[B, L]`` long (one row per sample; ``[L]`` is shared by the batch).
        equalizer: ``[B, L]`` or ``[L]`` token weights, or ``None``.
        guided_rows: control only the first half of the batch (the conditional branch of
            :class:`~diffusolve.guidance.ClassifierFreeGuidance`, which stacks
            ``[cond; null]``).
    """

    def __init__(
        self,
        alignment: Tensor,
        equalizer: Tensor | None = None,
        *,
        guided_rows: bool = False,
        self_max_queries: int = 32**2,
    ) -> None:
        self.alignment = alignment if alignment.ndim == 2 else alignment[None]
        if equalizer is not None and equalizer.ndim == 1:
            equalizer = equalizer[None]
        self.equalizer = equalizer
        self.guided_rows = guided_rows
        self.self_max_queries = self_max_queries
        self.mode = "store"
        self.cross_active = True
        self.self_active = True
        self.source: dict[str, Tensor] = {}

    def __call__(self, name: str, probs: Tensor, is_cross: bool) -> Tensor:
        if self.mode == "store":
            self.source[name] = probs.detach()
            return probs
        if self.mode != "edit":
            raise ValueError(f"mode must be 'store' or 'edit', got {self.mode!r}")
        base = self.source.get(name)
        if base is None or base.shape != probs.shape:
            raise RuntimeError(
                f"prompt-to-prompt: no source map of shape {tuple(probs.shape)} for {name}; run "
                "the source pass (mode='store') on a batch of the same size first"
            )
        k = probs.shape[0] // 2 if self.guided_rows else probs.shape[0]
        if is_cross:
            if not self.cross_active:
                return probs
            new = self.edit_cross(base[:k], probs[:k])
        else:
            if not self.self_active or probs.shape[1] > self.self_max_queries:
                return probs
            new = base[:k]
        return torch.cat([new, probs[k:]]) if k < probs.shape[0] else new

    def _per_row(self, table: Tensor, rows: int) -> Tensor:
        b = table.shape[0]
        if rows % b:
            raise ValueError(f"{rows} attention rows do not split into {b} samples")
        return table.to(self.device).repeat_interleave(rows // b, dim=0)

    def edit_cross(self, base: Tensor, own: Tensor) -> Tensor:
        """The edited cross-attention maps from the source's ``base`` and the target's ``own``
        maps (both ``[rows, queries, keys]``, rows = samples x heads, sample-major)."""
        self.device = base.device
        rows, q, keys = base.shape
        idx = self._per_row(self.alignment, rows)
        if idx.shape[1] != keys:
            raise ValueError(f"the token alignment has {idx.shape[1]} tokens, the maps {keys}")
        swapped = torch.gather(base, 2, idx.clamp(min=0)[:, None, :].expand(rows, q, keys))
        out = torch.where((idx >= 0)[:, None, :], swapped, own)
        if self.equalizer is not None:
            eq = self._per_row(self.equalizer, rows).to(out.dtype)
            out = out * eq[:, None, :]
        return out
