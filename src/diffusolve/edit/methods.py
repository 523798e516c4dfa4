"""Edit methods: frozen dataclasses whose fields are their options (paper defaults).

Two families:

* **inversion-based** (``ddim``, ``edict``, ``bdia``, ``null_text``, ``direct``, ``ddcm``):
  invert the image under the source condition with :func:`diffusolve.inversion.invert`,
  regenerate under the target with :func:`diffusolve.inversion.reconstruct` (for
  ``direct``: the target branch of ``direct_edit``, the offsets kept on the source branch;
  with the target equal to the source, the exact reconstruction). Alone, ``direct``'s target
  branch is the guided DDIM regeneration from the unguided DDIM latent, i.e. the same edit as
  ``ddim`` (measured identical in ``bench inversion``): the offsets pay off when the target
  branch reads the exactly reproduced source branch, which is what ``p2p``, ``uam`` and
  ``guide_rescale`` do (Direct Inversion + P2P is the paper's pairing). What is preserved is
  what each inverter keeps
  (EDICT's coupled sequences, BDIA's previous state, per-step null embeddings, direct
  inversion's offsets). ``ddim`` inverts without guidance (as P2P / null-text do) and
  regenerates with it. Options are the inverter's (``edit(..., method="edict", p=0.9)``).
* **attention control** (``p2p``, ``uam``, ``guide_rescale``), which need a UNet with
  cross-attention (see :mod:`diffusolve.edit.attention`). Each starts from the source
  branch of direct inversion: the unguided DDIM-inversion trajectory ``z*_i`` of the image
  under the source condition (:func:`ddim_trajectory`), which the source branch follows
  exactly, and runs a DDIM target branch from ``z*_0``.

An :class:`EditContext` carries the model and the prepared conditions (token ids turned
into embeddings for text models) to :meth:`EditMethod.run`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..guidance import ClassifierFreeGuidance, classifier_free, concat_cond
from ..inversion.steps import ddim_move, eps_from
from ..models import LabelConditioned
from .attention import (
    AttentionStore,
    PromptToPrompt,
    UniformCrossAttention,
    capture_output,
    controlled,
    require_cross_attention,
    token_alignment,
)

__all__ = [
    "EDIT_METHODS",
    "EditMethod",
    "EditContext",
    "register",
    "get_method",
    "list_methods",
    "ddim_trajectory",
    "PromptToPromptEdit",
    "UniformAttentionEdit",
    "GuideAndRescale",
    "rescale_guidance",
]

#: registered edit methods, by name
EDIT_METHODS: dict[str, type[EditMethod]] = {}


def register(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator: add an edit method to :data:`EDIT_METHODS` under ``cls.name``."""
    if cls.name in EDIT_METHODS:
        raise ValueError(f"an edit method named {cls.name!r} is already registered")
    EDIT_METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """The registered edit method names (sorted)."""
    return sorted(EDIT_METHODS)


def get_method(method: str | EditMethod, **options: Any) -> EditMethod:
    """An edit method by name with ``options`` (or the given one with options replaced)."""
    if isinstance(method, EditMethod):
        return method.replace(**options) if options else method
    if method not in EDIT_METHODS:
        raise ValueError(f"unknown edit method {method!r}; choose one of {list_methods()}")
    return EDIT_METHODS[method].from_options(**options)


@dataclass
class EditContext:
    """What an edit method gets: the plain conditional ``model``, the batch-sized source /
    target / null conditions, the source and target token ids (text models; ``None``
    otherwise) and the guidance scale."""

    model: Any
    source: Any
    target: Any
    null: Any
    guidance: float
    source_ids: Tensor | None = None
    target_ids: Tensor | None = None
    tokenizer: Any = None

    def guided(self) -> Any:
        """The classifier-free-guided model at ``guidance`` (the model itself at 1)."""
        if self.guidance == 1.0:
            return self.model
        if isinstance(self.model, LabelConditioned):
            return classifier_free(self.model, self.guidance)
        if self.null is None:
            raise ValueError(
                f"guidance {self.guidance:g} needs the unconditional input: pass "
                "null_cond=... (e.g. the empty prompt's embedding) or guidance=1"
            )
        return ClassifierFreeGuidance(self.model, self.guidance, null_cond=self.null)


@dataclass(frozen=True)
class EditMethod:
    """Base class: a frozen dataclass whose fields are the method's options.

    Class variables: ``name``, ``citation``, ``needs_attention`` (needs a UNet with
    cross-attention processors) and ``default_guidance`` (the paper's scale).
    """

    name: ClassVar[str] = "?"
    citation: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False
    default_guidance: ClassVar[float] = 7.5

    @classmethod
    def from_options(cls, **options: Any) -> EditMethod:
        return cls(**options)

    def run(self, ctx: EditContext, x: Tensor, grid: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> EditMethod:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})"


# ---------------------------------------------------------------------------------------
# inversion-based methods


@dataclass(frozen=True)
class InversionEdit(EditMethod):
    """Invert under the source condition, regenerate under the target (see module doc).

    ``inverter_options`` are passed to the inverter (sorted ``(name, value)`` pairs;
    ``edit(..., p=0.9)`` puts ``p`` there).
    """

    inverter_options: tuple[tuple[str, Any], ...] = ()

    #: invert with the unguided model (DDIM inversion with the source prompt, as in P2P)
    invert_unguided: ClassVar[bool] = False

    @classmethod
    def from_options(cls, **options: Any) -> EditMethod:
        return cls(inverter_options=tuple(sorted(options.items())))

    def run(self, ctx: EditContext, x: Tensor, grid: Tensor) -> Tensor:
        from ..inversion import invert, reconstruct

        guided = ctx.guided()
        inverting = ctx.model if self.invert_unguided else guided
        opts = dict(self.inverter_options)
        inv = invert(inverting, x, grid, self.name, cond=ctx.source, **opts)
        return reconstruct(guided, inv, cond=ctx.target)


def _inversion_method(
    name: str, guidance: float, citation: str, unguided: bool = False
) -> type[EditMethod]:
    cls = type(
        f"{name.title().replace('_', '')}Edit",
        (InversionEdit,),
        {
            "name": name,
            "default_guidance": guidance,
            "citation": citation,
            "invert_unguided": unguided,
            "__doc__": f"Inversion-based editing with the {name!r} inverter "
            f"(default guidance {guidance:g}). {citation}",
            "__module__": __name__,
        },
    )
    return register(dataclass(frozen=True)(cls))


_inversion_method("ddim", 7.5, "DDIM inversion (Song et al. 2021; P2P's setting).", True)
_inversion_method("edict", 3.0, "Wallace et al., EDICT, CVPR 2023.")
_inversion_method("bdia", 3.0, "Zhang, Lewis & Kleijn, BDIA, arXiv 2307.10829 (2023).")
_inversion_method("null_text", 7.5, "Mokady et al., Null-text Inversion, CVPR 2023.")
_inversion_method("direct", 7.5, "Ju et al., PnP / Direct Inversion, ICLR 2024.")
_inversion_method("ddcm", 2.3, "Xu et al., InfEdit (DDCM virtual inversion), CVPR 2024.")


# ---------------------------------------------------------------------------------------
# attention-control methods


def _ab(model: Any, t: Tensor) -> tuple[float, float]:
    p = model.process
    return float(p.alpha(t)), float(p.sigma(t))


def ddim_trajectory(model: Any, x: Tensor, grid: Tensor, cond: Any) -> list[Tensor]:
    """Unguided DDIM inversion of ``x`` under ``cond``: the states ``z*_i`` at ``grid[i]``
    (``z*_n = x``). Each upward step is the inversion package's DDIM step
    (:func:`~diffusolve.inversion.reverse.ddim_up`, the model at the lower time), so
    ``z*_0`` is ``invert(model, x, grid, "ddim", cond=cond).latent``."""
    from ..inversion.reverse import ddim_up
    from ..inversion.steps import bind

    bound = bind(model, cond)
    n = grid.numel() - 1
    states = [x]
    z = x
    for i in range(n, 0, -1):
        z = ddim_up(bound, z, grid[i], grid[i - 1], "current")
        states.append(z)
    return states[::-1]


def _window(fraction: float, i: int, n: int) -> bool:
    return i < int(fraction * n)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value}")


@register
@dataclass(frozen=True)
class PromptToPromptEdit(EditMethod):
    """Prompt-to-prompt (Hertz et al., Prompt-to-Prompt Image Editing with Cross Attention
    Control, 2022) on direct inversion's source branch (Ju et al., ICLR 2024).

    Per step ``i`` of ``n`` (grid ``t_0 > ... > t_n``): the source pass runs the guided model
    at ``z*_i`` (the source trajectory, :func:`ddim_trajectory`) and stores its maps; the
    target pass at ``z_i`` (``z_0 = z*_0``) replaces, on the conditional rows, its
    cross-attention maps by the source's through the token alignment while
    ``i < cross_replace_steps * n`` and its self-attention maps while
    ``i < self_replace_steps * n`` (:class:`~diffusolve.edit.attention.PromptToPrompt`);
    then ``z_(i+1) = ddim_move(z_i, x0_target)``. Word swap when the prompts have the same
    token count, refinement when words are added (new tokens keep their own maps).

    ``equalizer``: ``{word: scale}`` (``{token position: scale}`` without a tokenizer)
    multiplies the target's map columns of those tokens (attention re-weighting).

    ``blend_words``: P2P's local blending. From step ``blend_start * n`` on, the target
    state is kept equal to the source trajectory outside a mask: the cross-attention of the
    blend words' tokens (source and target prompts, largest attention resolution), max-pooled
    over 3x3, resized to the image, divided by its maximum and cut at ``blend_threshold``
    (union of the source's and the target's masks):
    ``z_(i+1) <- z*_(i+1) + mask (z_(i+1) - z*_(i+1))``.

    Defaults (P2P): ``cross_replace_steps=0.8``, ``self_replace_steps=0.4``, self-attention
    replaced in layers with at most ``32 ** 2`` queries, guidance 7.5; local blend off,
    ``blend_threshold=0.3``, ``blend_start=0.2`` when on.
    """

    name: ClassVar[str] = "p2p"
    citation: ClassVar[str] = "Hertz et al., Prompt-to-Prompt Image Editing, arXiv 2208.01626"
    needs_attention: ClassVar[bool] = True

    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    equalizer: tuple[tuple[Any, float], ...] = ()
    self_max_queries: int = 32**2
    blend_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2

    @classmethod
    def from_options(cls, **options: Any) -> EditMethod:
        eq = options.pop("equalizer", None) or {}
        pairs = tuple(eq.items()) if isinstance(eq, dict) else tuple(eq)
        words = options.pop("blend_words", None) or ()
        words = (words,) if isinstance(words, str) else tuple(words)
        return cls(equalizer=pairs, blend_words=words, **options)

    def __post_init__(self) -> None:
        _check_fraction("cross_replace_steps", self.cross_replace_steps)
        _check_fraction("self_replace_steps", self.self_replace_steps)
        _check_fraction("blend_threshold", self.blend_threshold)
        _check_fraction("blend_start", self.blend_start)

    def _blend_positions(self, ctx: EditContext) -> tuple[Tensor, Tensor] | None:
        """``[B, L]`` masks of the blend words' tokens in the source and target prompts."""
        if not self.blend_words:
            return None
        if ctx.tokenizer is None or ctx.source_ids is None or ctx.target_ids is None:
            raise ValueError("blend_words need a text model with a tokenizer (prompts)")
        empty = set(ctx.tokenizer.encode("").reshape(-1).tolist())
        ids = set()
        for word in self.blend_words:
            ids |= set(ctx.tokenizer.encode(str(word)).reshape(-1).tolist()) - empty
        ids_t = torch.tensor(sorted(ids))
        src = torch.isin(ctx.source_ids.cpu(), ids_t)
        tgt = torch.isin(ctx.target_ids.cpu(), ids_t)
        if not bool((src.any(1) | tgt.any(1)).all()):
            raise ValueError(
                f"blend_words {list(self.blend_words)} appear in neither prompt of a sample"
            )
        return src, tgt

    def _equalizer(self, ctx: EditContext, length: int, batch: int) -> Tensor | None:
        if not self.equalizer:
            return None
        eq = torch.ones(batch, length)
        for key, scale in self.equalizer:
            if isinstance(key, int):
                if not 0 <= key < length:
                    raise ValueError(f"equalizer token position {key} is outside 0..{length - 1}")
                eq[:, key] = float(scale)
                continue
            if ctx.tokenizer is None or ctx.target_ids is None:
                raise ValueError(
                    "equalizer words need a text model with a tokenizer; with embedding "
                    "conditions give token positions ({position: scale})"
                )
            word_ids = set(ctx.tokenizer.encode(str(key)).reshape(-1).tolist())
            word_ids -= set(ctx.tokenizer.encode("").reshape(-1).tolist())
            hits = torch.isin(ctx.target_ids, torch.tensor(sorted(word_ids)))
            if not word_ids or not bool(hits.any()):
                raise ValueError(f"equalizer word {key!r} is not in the target prompt")
            eq = torch.where(hits.cpu(), torch.full_like(eq, float(scale)), eq)
        return eq

    def run(self, ctx: EditContext, x: Tensor, grid: Tensor) -> Tensor:
        unet = require_cross_attention(ctx.model, self.name)
        model, guided = ctx.model, ctx.guided()
        b = x.shape[0]
        traj = ddim_trajectory(model, x, grid, ctx.source)
        length = _text_length(ctx)
        if ctx.source_ids is not None and ctx.target_ids is not None:
            align = torch.stack(
                [
                    token_alignment(s, t, length)
                    for s, t in zip(ctx.source_ids, ctx.target_ids, strict=True)
                ]
            )
        else:
            align = token_alignment(None, None, length)[None].expand(b, -1)
        control = PromptToPrompt(
            align,
            self._equalizer(ctx, length, b),
            guided_rows=guided is not model,
            self_max_queries=self.self_max_queries,
        )
        n = grid.numel() - 1
        z = traj[0]
        words = self._blend_positions(ctx)
        store = AttentionStore("cross")
        rows = 2 * b if guided is not model else b

        def hook(name: str, probs: Tensor, is_cross: bool) -> Tensor:
            return store(name, control(name, probs, is_cross), is_cross)

        with controlled(unet, hook if words is not None else control):
            for i in range(n):
                t, t1 = grid[i], grid[i + 1]
                control.mode = "store"
                guided(traj[i], t, ctx.source)
                src_maps = store.token_maps(rows)[:b] if words is not None else None
                control.mode = "edit"
                control.cross_active = _window(self.cross_replace_steps, i, n)
                control.self_active = _window(self.self_replace_steps, i, n)
                x0 = guided(z, t, ctx.target)
                z = ddim_move(z, x0, *_ab(model, t), *_ab(model, t1))
                if words is not None and i >= int(self.blend_start * n):
                    tgt_maps = store.token_maps(rows)[:b]
                    th = self.blend_threshold
                    mask = _blend_mask(src_maps, words[0], x.shape, th)
                    mask = mask | _blend_mask(tgt_maps, words[1], x.shape, th)
                    z = traj[i + 1] + mask.to(z.dtype) * (z - traj[i + 1])
        return z


def _blend_mask(
    maps: Tensor, positions: Tensor, shape: torch.Size, threshold: float = 0.3
) -> Tensor:
    """Prompt-to-prompt's local-blend mask: the cross-attention of the blend words' tokens
    (``maps`` ``[B, queries, L]``, ``positions`` ``[B, L]`` bool) summed over those tokens,
    max-pooled over 3x3, resized to the image, divided by its maximum per sample and cut at
    ``threshold``: ``[B, 1 or C, H, W]`` bool (True = the edit may change the pixel)."""
    b, q, _ = maps.shape
    side = int(round(q**0.5))
    m = (maps * positions.to(maps.device, maps.dtype)[:, None, :]).sum(-1)
    m = m.reshape(b, 1, side, side).float()
    m = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    m = torch.nn.functional.interpolate(m, size=tuple(shape[-2:]), mode="bilinear")
    m = m / m.flatten(1).amax(1).clamp_min(1e-12).reshape(b, 1, 1, 1)
    return m > threshold


def _text_length(ctx: EditContext) -> int:
    if ctx.target_ids is not None:
        return int(ctx.target_ids.shape[-1])
    target = ctx.target
    if isinstance(target, dict):
        target = target["encoder_hidden_states"]
    if not isinstance(target, Tensor) or target.ndim != 3:
        raise ValueError(
            "attention-control methods need text conditions: prompts (text models) or "
            "embeddings [B, L, D]"
        )
    return int(target.shape[1])


@register
@dataclass(frozen=True)
class UniformAttentionEdit(EditMethod):
    """Uniform Attention Maps (Mo et al., WACV 2025).

    A *UAM branch* inverts the image with every cross-attention map set to ``1 / L`` and the
    null condition (so the text cannot distort the inversion), and regenerates the same way
    from that latent ``u_0``: it tracks a reconstruction of the input. The source branch
    follows the source trajectory ``z*_i`` (:func:`ddim_trajectory`), the target branch
    ``z_i`` runs from ``z*_0``, both guided. For steps with ``t < recon_t * t_max`` (the
    paper's ``recon_t = 200`` of 1000), with ``d = x0_source - x0_target`` and the threshold
    ``q`` the ``quantile * i / (n - 1)`` quantile of ``|d|`` (per sample), the edit mask is
    ``m = |d| - clamp(|d|, q) > q`` (i.e. ``|d| > 2q``, as in the official code); then
    ``x0_target <- m x0_target + (1 - m) x0_uam`` and every branch steps by DDIM with its own
    network noise: ``z_(i+1) = a_(i+1) x0 + s_(i+1) eps``. Outside the mask the target takes
    the reconstruction's content. Defaults: ``quantile=0.5``, ``recon_t=0.2``, guidance 7.5.
    """

    name: ClassVar[str] = "uam"
    citation: ClassVar[str] = "Mo et al., Uniform Attention Maps, WACV 2025"
    needs_attention: ClassVar[bool] = True

    quantile: float = 0.5
    recon_t: float = 0.2

    def __post_init__(self) -> None:
        _check_fraction("quantile", self.quantile)
        _check_fraction("recon_t", self.recon_t)

    def run(self, ctx: EditContext, x: Tensor, grid: Tensor) -> Tensor:
        unet = require_cross_attention(ctx.model, self.name)
        model, guided = ctx.model, ctx.guided()
        null = ctx.null if ctx.null is not None else ctx.source
        traj = ddim_trajectory(model, x, grid, ctx.source)
        with controlled(unet, UniformCrossAttention()):
            u = ddim_trajectory(model, x, grid, null)[0]
        n = grid.numel() - 1
        t_cut = self.recon_t * model.process.t_max
        z = traj[0]
        b = x.shape[0]
        for i in range(n):
            t, t1 = grid[i], grid[i + 1]
            a, s = _ab(model, t)
            a1, s1 = _ab(model, t1)
            x0_t = guided(z, t, ctx.target)
            with controlled(unet, UniformCrossAttention()):
                x0_u = model(u, t, null)
            eps_t, eps_u = eps_from(z, x0_t, a, s), eps_from(u, x0_u, a, s)
            if float(t) < t_cut:
                x0_s = guided(traj[i], t, ctx.source)
                d = (x0_s - x0_t).reshape(b, -1)
                q = self.quantile * i / max(n - 1, 1)
                thr = torch.quantile(d.abs().float(), q, dim=1, keepdim=True).to(d.dtype)
                mask = ((d.abs() - d.abs().clamp(max=thr)) > thr).to(x.dtype)
                mask = mask.reshape(x0_t.shape)
                x0_t = mask * x0_t + (1 - mask) * x0_u
            z = a1 * x0_t + s1 * eps_t
            u = a1 * x0_u + s1 * eps_u
        return z


def rescale_guidance(g: Tensor, g_cfg: Tensor, lo: float, hi: float) -> Tensor:
    """Guide-and-Rescale's noise rescaling, per sample: ``g * clip(r, lo, hi) / r`` with
    ``r = |g| / |g_cfg|``, so that ``|g| / |g_cfg|`` ends in ``[lo, hi]`` (``g`` is kept
    when it or ``g_cfg`` is zero)."""
    b = g.shape[0]
    gn = g.reshape(b, -1).norm(dim=1)
    cn = g_cfg.reshape(b, -1).norm(dim=1)
    ok = (gn > 0) & (cn > 0)
    r = gn / torch.where(ok, cn, torch.ones_like(cn))
    scale = torch.where(ok, r.clamp(lo, hi) / torch.where(ok, r, torch.ones_like(r)), 1.0)
    return scale.reshape((b,) + (1,) * (g.ndim - 1)) * g


@register
@dataclass(frozen=True)
class GuideAndRescale(EditMethod):
    """Guide-and-Rescale (Titov et al., ECCV 2024): DDIM inversion, then guided regeneration
    with an energy that keeps the source's structure and appearance, rescaled against CFG.

    With ``z*_i`` the source trajectory (:func:`ddim_trajectory`) and ``z_i`` the edit
    (``z_0 = z*_0``), per step: ``g_cfg = w (eps(z, target) - eps(z, null))``; for the first
    ``guide_steps * n`` steps the energy

        ``E(z) = self_attn_scale * sum_l mean((A_l(z, source) - A_l(z*_i, source))^2)
        + feature_scale * mean(|F(z, source) - F(z*_i, source)|)``

    (``A_l``: self-attention maps of every layer; ``F``: the output of ``feature_module``,
    ``conv_norm_out`` as in the paper) gives ``g = grad_z E``, rescaled per sample to
    ``g * clip(r, lo, hi) / r`` with ``r = |g| / |g_cfg|`` (noise rescaling,
    ``rescale=(lo, hi)``); then ``eps = eps(z, null) + g_cfg + g`` and
    ``z_(i+1) = a_(i+1) x0 + s_(i+1) eps`` with ``x0 = (z - s_i eps) / a_i``.
    Defaults (the paper's best non-style config): ``self_attn_scale=300000``,
    ``feature_scale=500``, guidance over the first 30 of 50 steps (``guide_steps=0.6``),
    ``rescale=(0.33, 3.0)``, CFG 7.5. Costs 4 forward passes and one backward per guided step.
    """

    name: ClassVar[str] = "guide_rescale"
    citation: ClassVar[str] = "Titov et al., Guide-and-Rescale, ECCV 2024"
    needs_attention: ClassVar[bool] = True

    self_attn_scale: float = 300000.0
    feature_scale: float = 500.0
    guide_steps: float = 0.6
    rescale: tuple[float, float] = (0.33, 3.0)
    feature_module: str = "conv_norm_out"

    def __post_init__(self) -> None:
        _check_fraction("guide_steps", self.guide_steps)
        lo, hi = self.rescale
        if not 0 < lo <= hi:
            raise ValueError(f"rescale must be (lo, hi) with 0 < lo <= hi, got {self.rescale}")

    def _energy_grad(
        self, ctx: EditContext, unet: Any, z: Tensor, ref: Tensor, t: Tensor
    ) -> Tensor:
        module = dict(unet.named_modules()).get(self.feature_module)
        if module is None:
            raise ValueError(f"the UNet has no module {self.feature_module!r}")
        ref_store = AttentionStore("self")
        with controlled(unet, ref_store), capture_output(module) as ref_feat, torch.no_grad():
            ctx.model(ref, t, ctx.source)
        store = AttentionStore("self", detach=False)
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            with controlled(unet, store), capture_output(module) as feat:
                ctx.model(zg, t, ctx.source)
            energy = zg.new_zeros(())
            for name, m in store.maps.items():
                energy = energy + self.self_attn_scale * (m - ref_store.maps[name]).pow(2).mean()
            f, f_ref = feat["out"], ref_feat["out"]
            energy = energy + self.feature_scale * (f - f_ref).abs().mean().to(energy.dtype)
            (grad,) = torch.autograd.grad(energy, zg)
        return grad

    def run(self, ctx: EditContext, x: Tensor, grid: Tensor) -> Tensor:
        unet = require_cross_attention(ctx.model, self.name)
        if ctx.null is None:
            raise ValueError("guide_rescale needs the null condition (null_cond=...)")
        model, w = ctx.model, ctx.guidance
        traj = ddim_trajectory(model, x, grid, ctx.source)
        n = grid.numel() - 1
        b = x.shape[0]
        lo, hi = self.rescale
        z = traj[0]
        for i in range(n):
            t, t1 = grid[i], grid[i + 1]
            a, s = _ab(model, t)
            a1, s1 = _ab(model, t1)
            both = model(torch.cat([z, z]), t, concat_cond(ctx.target, ctx.null, b))
            eps_c, eps_n = eps_from(z, both[:b], a, s), eps_from(z, both[b:], a, s)
            g_cfg = w * (eps_c - eps_n)
            eps = eps_n + g_cfg
            if _window(self.guide_steps, i, n):
                g = self._energy_grad(ctx, unet, z, traj[i], t).to(eps.dtype)
                eps = eps + rescale_guidance(g, g_cfg, lo, hi)
            x0 = (z - s * eps) / a
            z = a1 * x0 + s1 * eps
        return z.detach()
