"""Direct inversion (PnP Inversion; Ju, Zeng, Bian, Liu, Xu, ICLR 2024).

1. Plain DDIM inversion with the source condition and the *conditional* model (scale 1)
   gives the pivot trajectory ``z*_0 (latent) .. z*_n = x``.
2. Going down the grid, the guided DDIM step of the model (its own scale ``w``) from
   ``z*_i`` lands at ``z~_(i+1) = DDIM(z*_i, x0_w(z*_i, t_i))``; the offset
   ``o_i = z*_(i+1) - z~_(i+1)`` is recorded, and the source branch continues from
   ``z_(i+1) = z~_(i+1) + o_i = z*_(i+1)``.

The reconstruction (``reconstruct`` with the source condition) is the guided DDIM sampler
plus the offsets, ``z_(i+1) = DDIM(z_i, x0_w(z_i, t_i)) + o_i``: it follows the pivot and
returns ``x`` up to rounding (``exact = True``), at any guidance scale. ``aux["offsets"]``
holds ``o_0 .. o_(n-1)``.

**Editing.** The offsets are added to the *source branch only* (as the paper does); the
target branch runs the guided sampler from the same latent under the target condition
without offsets. :func:`direct_edit` returns both (an attention-control editor couples them
through the source branch); ``reconstruct(model, inv, cond=target)`` with a condition other
than the inversion's returns the target branch. A model without classifier-free guidance
is taken at scale 1 (the offsets then correct the DDIM inversion error alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..solvers.base import BoundModel
from .base import Inversion, Inverter, register
from .fixed_point import Steps, ddim_pivot, ddim_sample
from .null_text import guided_parts, same_cond
from .steps import ddim_move

__all__ = ["DirectInversion", "direct_edit"]


def _offsets(inversion: Inversion) -> list[Tensor]:
    offsets = inversion.aux.get("offsets")
    n = inversion.grid.numel() - 1
    if not isinstance(offsets, (list, tuple)) or len(offsets) != n:
        raise ValueError(
            f"this inversion has no per-step offsets for its {n} steps (aux['offsets']); "
            "invert with method='direct'."
        )
    return list(offsets)


@register
@dataclass(frozen=True)
class DirectInversion(Inverter):
    """Direct inversion: conditional DDIM inversion plus per-step offsets that make the
    guided sampler's source branch retrace it exactly (see the module docstring).

    Costs ``n`` conditional evaluations (the pivot) and ``n`` guided ones (the offsets);
    stores ``n`` offsets of the data's shape. No options.

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.inversion import invert, reconstruct
        >>> model = diffusolve.load("digits", guidance=3.0, dtype=torch.float64)
        >>> x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
        >>> with torch.no_grad():
        ...     inv = invert(model, x, 5, "direct", cond=[1, 7])
        ...     y = reconstruct(model, inv)
        >>> float((y - x).abs().max()) < 1e-10
        True
    """

    name: ClassVar[str] = "direct"
    citation: ClassVar[str] = (
        "Ju, Zeng, Bian, Liu, Xu. PnP Inversion: Boosting Diffusion-based Editing with 3 "
        "Lines of Code (Direct Inversion). ICLR 2024."
    )
    exact: ClassVar[bool] = True

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
        parts = guided_parts(model, method=self.name, required=False)
        c = parts.net_cond(cond, x.shape[0], x.device)
        scalars = BoundModel(model, cond, grid).scalars
        pivot = ddim_pivot(lambda z, t: parts.branch(z, t, c), scalars, x, grid)
        steps = Steps(grid, up=False, desc=self.name, progress=progress, callback=callback)
        offsets: list[Tensor] = []
        for i, t, t_next in steps:
            a, s, _ = scalars(t)
            a1, s1, _ = scalars(t_next)
            z = pivot[i]
            stepped = ddim_move(z, parts.guided(z, t, c), a, s, a1, s1)
            offsets.append(pivot[i + 1] - stepped)
            steps.report(i, z, pivot[i + 1], parts.nfe)
        return Inversion(pivot[0], grid, self, cond=cond, aux={"offsets": offsets}, nfe=parts.nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        if not same_cond(cond, inversion.cond):
            return direct_edit(
                model, inversion, inversion.cond, cond, progress=progress, callback=callback
            )[1]
        return _run(model, inversion, cond, _offsets(inversion), progress, callback)


def _run(
    model: Any,
    inversion: Inversion,
    cond: Any,
    offsets: list[Tensor] | None,
    progress: bool | None,
    callback: Callable[[dict[str, Any]], None] | None,
) -> Tensor:
    parts = guided_parts(model, method="direct", required=False)
    latent = inversion.latent
    c = parts.net_cond(cond, latent.shape[0], latent.device)
    scalars = BoundModel(model, cond, inversion.grid).scalars
    steps = Steps(inversion.grid, up=False, desc="direct", progress=progress, callback=callback)
    if offsets is not None:
        offsets = [o.to(device=latent.device, dtype=latent.dtype) for o in offsets]
    return ddim_sample(
        lambda z, t, i: parts.guided(z, t, c), scalars, latent, steps, lambda: parts.nfe, offsets
    )


def direct_edit(
    model: Any,
    inversion: Inversion,
    source_cond: Any,
    target_cond: Any,
    *,
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The two branches of a direct-inversion edit: ``(source, target)``.

    The source branch is the guided DDIM sampler under ``source_cond`` with the offsets
    (the input, up to rounding, when ``source_cond`` is the inversion's condition); the
    target branch the guided DDIM sampler from the same latent under ``target_cond``
    without offsets. ``callback`` sees the target branch. ``model`` is the guided model
    (its scale is the edit's).

    Example:
        >>> import torch, diffusolve
        >>> from diffusolve.inversion import invert
        >>> from diffusolve.inversion.direct import direct_edit
        >>> model = diffusolve.load("digits", guidance=3.0)
        >>> x = torch.rand(1, 1, 16, 16) * 2 - 1
        >>> with torch.no_grad():
        ...     inv = invert(model, x, 5, "direct", cond=1)
        ...     source, target = direct_edit(model, inv, 1, 7)
        >>> float((source - x).abs().max()) < 1e-4
        True
    """
    if not isinstance(inversion.method, DirectInversion):
        raise TypeError(
            f"direct_edit needs an inversion made with method='direct', got "
            f"{inversion.method.name!r}"
        )
    source = _run(model, inversion, source_cond, _offsets(inversion), False, None)
    target = _run(model, inversion, target_cond, None, progress, callback)
    return source, target
