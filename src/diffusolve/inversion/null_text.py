"""Null-text inversion (Mokady et al., CVPR 2023) and negative-prompt inversion (Miyake et
al., 2023), and the view of a classifier-free-guidance model that the guided inverters share.

**Null-text inversion.** Plain DDIM inversion with the *conditional* model (scale 1) gives
the pivot trajectory ``z*_0 (latent) .. z*_n = x``. Then, going down the grid from
``zb_0 = z*_0``, each step optimises the null condition ``phi_i`` so that the guided DDIM
step lands on the pivot:

    min_phi || z*_(i+1) - DDIM(zb_i, x0_u(phi) + w (x0_c - x0_u(phi))) ||^2,

with ``x0_c = D(zb_i, t_i, cond)`` computed once per step and ``w`` the model's guidance
scale (guiding x0 is the same as guiding epsilon); Adam with ``lr_i = lr (1 - i / 100)``,
at most ``num_inner_steps`` updates, stopping once the loss (mean square per sample) is
below ``early_stop_epsilon + i * 2e-5``; ``phi_i`` starts from ``phi_(i-1)`` (the model's
null condition at the first step), and ``zb_(i+1)`` is the guided step with ``phi_i``.
``aux["null_conds"]`` keeps ``phi_0 .. phi_(n-1)`` (one per sample); the reconstruction
is the guided DDIM sampler with them (under another condition: an edit). A null condition
that is a dict of forward arguments has all its floating-point tensors optimised (such an
inversion is used in memory; :meth:`~diffusolve.inversion.Inversion.save` stores tensor
null conditions only).

**Negative-prompt inversion** sets ``phi_i := cond`` (no optimisation): the reconstruction
is the guided sampler with the source condition as the null condition, which for the
source condition itself is the conditional model, the inverse of the pivot inversion.

Both need a :class:`~diffusolve.guidance.ClassifierFreeGuidance` model (or a label model
around one, as ``diffusolve.load("digits", guidance=w)``); null-text inversion also needs a
null condition that holds a float tensor (an embedding): an integer class label cannot be
optimised, and is refused with an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..guidance.cfg import ClassifierFreeGuidance, concat_cond
from ..models.bundled import LabelConditioned, TokenConditioned
from ..solvers.base import BoundModel
from .base import Inversion, Inverter, register
from .fixed_point import Steps, _check_int, _check_pos, ddim_pivot, ddim_sample
from .steps import ddim_move

__all__ = [
    "NullTextInversion",
    "NegativePromptInversion",
    "GuidedParts",
    "guided_parts",
    "same_cond",
]


@dataclass
class GuidedParts:
    """A guided model taken apart: the conditional network, its scale and null condition.

    Conditions are handled in the *network's* form (:meth:`net_cond` converts the user's
    condition: int labels to a label tensor for label models, anything else unchanged).
    Every network call is counted in ``nfe`` (a guided call of both branches is one call on
    a doubled batch).

    Attributes:
        net: the conditional network, ``net(x, t, c) -> x0``.
        scale: the guidance scale (1 for an unguided model).
        null_cond: the null condition in the network's form (``None`` when unguided).
        label_model: the label wrapper whose ``labels`` converts conditions, if any.
        guided_model: whether the model is classifier-free guided at all.
        token_model: the caption wrapper whose ``embed`` converts conditions (captions,
            token ids) to the embedded tokens the network takes, if any.
    """

    net: Any
    scale: float
    null_cond: Any
    label_model: LabelConditioned | None = None
    guided_model: bool = True
    nfe: int = 0
    token_model: TokenConditioned | None = None

    def net_cond(self, cond: Any, batch: int, device: torch.device) -> Any:
        if self.label_model is not None:
            return self.label_model.labels(cond, batch, device)
        if self.token_model is not None:
            return self.token_model.embed(cond, batch, device)
        return cond

    def branch(self, x: Tensor, t: Tensor, c: Any) -> Tensor:
        """The network under one condition (no guidance)."""
        self.nfe += 1
        return self.net(x, t, c)

    def guided(
        self, x: Tensor, t: Tensor, c: Any, null: Any = None, scale: float | None = None
    ) -> Tensor:
        """``x0_u + w (x0_c - x0_u)`` in one network call (``null`` defaults to the
        model's null condition, ``scale`` to its scale)."""
        w = self.scale if scale is None else scale
        if w == 1.0 or not self.guided_model:
            return self.branch(x, t, c)
        null = self.null_cond if null is None else null
        b = x.shape[0]
        self.nfe += 1
        out = self.net(torch.cat([x, x]), t, concat_cond(c, null, b))
        x0_c, x0_u = out[:b], out[b:]
        return x0_u + w * (x0_c - x0_u)


def guided_parts(model: Any, *, method: str, required: bool) -> GuidedParts:
    """Take a classifier-free-guidance model apart (see :class:`GuidedParts`).

    Accepts a :class:`~diffusolve.guidance.ClassifierFreeGuidance`, or a
    :class:`~diffusolve.models.LabelConditioned` or caption wrapper
    (:class:`~diffusolve.models.bundled.TokenConditioned`) around one (what
    ``diffusolve.load(name, guidance=w)`` returns). Any other model is refused when ``required`` (the error says what is
    missing: the null condition) and otherwise taken as unguided (scale 1).
    """
    if isinstance(model, ClassifierFreeGuidance):
        return GuidedParts(model.model, model.scale, model.null_cond)
    if isinstance(model, LabelConditioned) and isinstance(model.model, ClassifierFreeGuidance):
        cfg = model.model
        return GuidedParts(cfg.model, cfg.scale, cfg.null_cond, label_model=model)
    if isinstance(model, TokenConditioned) and isinstance(model.model, ClassifierFreeGuidance):
        cfg = model.model  # the network guided on embedded tokens; captions converted outside
        return GuidedParts(cfg.model, cfg.scale, cfg.null_cond, token_model=model)
    if required:
        raise TypeError(
            f"{method} inversion needs a classifier-free-guidance model, and "
            f"{type(model).__name__} has no null condition (missing null condition): wrap it "
            "with diffusolve.guidance.classifier_free(model, scale, null_cond=...) or load it "
            "with diffusolve.load(name, guidance=w)."
        )
    return GuidedParts(model, 1.0, None, guided_model=False)


def same_cond(a: Any, b: Any) -> bool:
    """Whether two conditions are the same (tensors by value, dicts key by key)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            try:
                a, b = torch.as_tensor(a), torch.as_tensor(b)
            except (TypeError, ValueError, RuntimeError):
                return False
        return a.shape == b.shape and bool(torch.equal(a.to(b.device), b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(same_cond(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _tree_map(fn: Callable[[Any], Any], obj: Any) -> Any:
    """``fn`` applied to the leaves of a condition (a tensor or nested dicts of them)."""
    if isinstance(obj, Mapping):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _float_leaves(obj: Any) -> list[Tensor]:
    """The floating-point tensors of a condition (what null-text inversion optimises)."""
    if isinstance(obj, Mapping):
        return [leaf for v in obj.values() for leaf in _float_leaves(v)]
    return [obj] if isinstance(obj, Tensor) and obj.is_floating_point() else []


def _expand_null(null: Any, batch: int, device: torch.device) -> Any:
    """The null condition with one copy per sample (``[B, ...]`` leaves); refuses a
    condition without a floating-point tensor (nothing to optimise)."""
    if not _float_leaves(null):
        kind = f"{null.dtype} tensor" if isinstance(null, Tensor) else type(null).__name__
        raise TypeError(
            "null-text inversion optimises the null condition, so it must be a float tensor "
            "(an embedding, e.g. the empty prompt's) or a dict holding float tensors; this "
            f"model's null condition is a {kind}. Use a model whose condition is an "
            "embedding, or 'negative_prompt' / 'direct' inversion, which need no optimisation."
        )

    def expand(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return v
        if v.ndim == 0 or v.shape[0] not in (1, batch):
            raise ValueError(
                f"the null condition must have batch size 1 or {batch}, got shape {tuple(v.shape)}"
            )
        return v.to(device).expand((batch,) + tuple(v.shape[1:])).clone()

    return _tree_map(expand, null)


def _leaf_grad(v: Any) -> Any:
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.detach().clone().requires_grad_(True)
    return v


def _to(v: Any, like: Tensor) -> Any:
    return v.to(like.device) if isinstance(v, Tensor) else v


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, Tensor) else v


@register
@dataclass(frozen=True)
class NullTextInversion(Inverter):
    """Null-text inversion: per-step optimised null conditions that make the guided DDIM
    sampler follow the conditional DDIM inversion (see the module docstring).

    Args:
        num_inner_steps: Adam updates per step (paper: 10).
        lr: the initial learning rate; step ``i`` uses ``lr * max(0, 1 - i / 100)``
            (paper: ``1e-2``).
        early_stop_epsilon: a step stops once every sample's loss is below
            ``early_stop_epsilon + i * 2e-5`` (paper: ``1e-5``).

    The model must be a classifier-free-guidance model whose null condition is a float
    tensor; the label models (int null class) are refused with an error. The guidance scale
    is the model's (paper: 7.5).

    Example:
        >>> import torch
        >>> from diffusolve.guidance import ClassifierFreeGuidance
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import from_callable
        >>> from diffusolve.process import vp_linear
        >>> net = from_callable(lambda x, t, c: 0.5 * x + c, vp_linear(), "x0")
        >>> model = ClassifierFreeGuidance(net, 3.0, null_cond=torch.zeros(1, 2))
        >>> x = torch.tensor([[0.3, -0.2]])
        >>> inv = invert(model, x, 5, "null_text", cond=torch.tensor([[0.1, 0.1]]))
        >>> len(inv.aux["null_conds"])
        5
    """

    name: ClassVar[str] = "null_text"
    citation: ClassVar[str] = (
        "Mokady, Hertz, Aberman, Pritch, Cohen-Or. Null-text Inversion for Editing Real "
        "Images using Guided Diffusion Models. CVPR 2023."
    )
    needs_guidance: ClassVar[bool] = True

    num_inner_steps: int = 10
    lr: float = 1e-2
    early_stop_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        _check_int("num_inner_steps", self.num_inner_steps, 0)
        _check_pos("lr", self.lr, zero=True)
        _check_pos("early_stop_epsilon", self.early_stop_epsilon, zero=True)

    def invert(
        self,
        model: Any,
        x: Tensor,
        grid: Tensor,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Inversion:
        parts = guided_parts(model, method=self.name, required=True)
        if parts.label_model is not None:
            raise TypeError(
                "null-text inversion optimises the null condition, which must be a float "
                "tensor (an embedding); this is a label model whose null condition is the "
                f"integer class {parts.label_model.null}, which cannot be optimised. Use "
                "'negative_prompt' or 'direct' inversion, or a model whose condition is an "
                "embedding."
            )
        b = x.shape[0]
        phi = _expand_null(parts.null_cond, b, x.device)
        c = parts.net_cond(cond, b, x.device)
        scalars = BoundModel(model, cond, grid).scalars
        with torch.no_grad():
            pivot = ddim_pivot(lambda z, t: parts.branch(z, t, c), scalars, x.detach(), grid)
        steps = Steps(grid, up=False, desc=self.name, progress=progress, callback=callback)
        w = parts.scale
        nulls: list[Any] = []
        losses: list[float] = []
        z = pivot[0]
        for i, t, t_next in steps:
            a, s, _ = scalars(t)
            a1, s1, _ = scalars(t_next)
            target = pivot[i + 1]
            with torch.no_grad():
                x0_c = parts.branch(z, t, c)
            lr = self.lr * max(0.0, 1.0 - i / 100.0)
            threshold = self.early_stop_epsilon + i * 2e-5
            phi = _tree_map(_leaf_grad, phi)
            loss_max = math.inf
            if self.num_inner_steps > 0:
                opt = torch.optim.Adam(_float_leaves(phi), lr=lr)
                for _ in range(self.num_inner_steps):
                    with torch.enable_grad():
                        x0_u = parts.branch(z, t, phi)
                        guided = x0_u + w * (x0_c - x0_u)
                        z_rec = ddim_move(z, guided, a, s, a1, s1)
                        loss_per = (z_rec - target).reshape(b, -1).pow(2).mean(1)
                        opt.zero_grad()
                        loss_per.sum().backward()
                    opt.step()
                    loss_max = float(loss_per.detach().max())
                    if loss_max < threshold:
                        break
            phi = _tree_map(_detach, phi)
            nulls.append(phi)
            losses.append(loss_max)
            with torch.no_grad():
                z_next = ddim_move(z, parts.guided(z, t, c, null=phi), a, s, a1, s1)
            steps.report(i, z, z_next, parts.nfe, loss=loss_max)
            z = z_next
        aux = {"null_conds": nulls, "loss": torch.tensor(losses, dtype=torch.float64)}
        return Inversion(pivot[0], grid, self, cond=cond, aux=aux, nfe=parts.nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        parts = guided_parts(model, method=self.name, required=True)
        nulls = inversion.aux.get("null_conds")
        n = inversion.grid.numel() - 1
        if not isinstance(nulls, (list, tuple)) or len(nulls) != n:
            raise ValueError(
                f"this inversion has no per-step null conditions for its {n} steps "
                "(aux['null_conds']); invert with method='null_text'."
            )
        latent = inversion.latent
        c = parts.net_cond(cond, latent.shape[0], latent.device)
        scalars = BoundModel(model, cond, inversion.grid).scalars
        steps = Steps(
            inversion.grid, up=False, desc=self.name, progress=progress, callback=callback
        )
        return ddim_sample(
            lambda z, t, i: parts.guided(z, t, c, null=_tree_map(lambda v: _to(v, z), nulls[i])),
            scalars,
            latent,
            steps,
            lambda: parts.nfe,
        )


@register
@dataclass(frozen=True)
class NegativePromptInversion(Inverter):
    """Negative-prompt inversion: conditional DDIM inversion, reconstructed by the guided
    sampler with the *source* condition as the null condition (``phi_i := cond``, no
    optimisation). Works with any classifier-free-guidance model, label models included.

    An edit (``reconstruct(..., cond=target)``) guides from the source condition towards
    the target: ``x0 = x0(source) + w (x0(target) - x0(source))``.

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.inversion import invert, reconstruct
        >>> model = diffusolve.load("digits", guidance=3.0)
        >>> x = torch.zeros(1, 1, 16, 16)
        >>> with torch.no_grad():
        ...     inv = invert(model, x, 4, "negative_prompt", cond=3)
        ...     y = reconstruct(model, inv)
        >>> y.shape
        torch.Size([1, 1, 16, 16])
    """

    name: ClassVar[str] = "negative_prompt"
    citation: ClassVar[str] = (
        "Miyake, Iohara, Saito, Tanaka. Negative-prompt Inversion: Fast Image Inversion for "
        "Editing with Text-guided Diffusion Models. arXiv:2305.16807 (2023)."
    )
    needs_guidance: ClassVar[bool] = True

    def invert(
        self,
        model: Any,
        x: Tensor,
        grid: Tensor,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Inversion:
        parts = guided_parts(model, method=self.name, required=True)
        c = parts.net_cond(cond, x.shape[0], x.device)
        scalars = BoundModel(model, cond, grid).scalars
        steps = Steps(grid, up=True, desc=self.name, progress=progress, callback=callback)
        traj = ddim_pivot(
            lambda z, t: parts.branch(z, t, c), scalars, x, grid, steps, lambda: parts.nfe
        )
        return Inversion(traj[0], grid, self, cond=cond, nfe=parts.nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        parts = guided_parts(model, method=self.name, required=True)
        latent = inversion.latent
        b = latent.shape[0]
        source = parts.net_cond(inversion.cond, b, latent.device)
        if same_cond(cond, inversion.cond):
            call = lambda z, t, i: parts.branch(z, t, source)  # noqa: E731  (x0_c + w * 0)
        else:
            c = parts.net_cond(cond, b, latent.device)
            call = lambda z, t, i: parts.guided(z, t, c, null=source)  # noqa: E731
        scalars = BoundModel(model, cond, inversion.grid).scalars
        steps = Steps(
            inversion.grid, up=False, desc=self.name, progress=progress, callback=callback
        )
        return ddim_sample(call, scalars, latent, steps, lambda: parts.nfe)
