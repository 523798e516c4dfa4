"""Fixed-point inversions: solve the implicit DDIM inversion step instead of approximating it.

A deterministic DDIM step from ``z_i`` (time ``t_i``, level ``(a, s)``) down to ``t_(i+1)``
(level ``(a1, s1)``) with ``eps = eps(z_i, t_i)`` is

    z_(i+1) = a1 (z_i - s eps) / a + s1 eps.

Given ``z_(i+1)``, the state ``z_i`` that this step maps onto it is the solution of

    z = f(z) = (a / a1) z_(i+1) + (s - a s1 / a1) eps(z, t_i),

the equation of SPDInv (Li et al., ECCV 2024) and of fixed-point / AIDI inversion (Pan et
al., ICCV 2023). Plain DDIM inversion replaces ``eps(z, t_i)`` by ``eps(z_(i+1), t_(i+1))``;
the methods here solve the equation per step (started from that plain DDIM step), so that
the plain DDIM sampler regenerates the input up to the solver tolerance. The map is a
contraction for small steps: its Jacobian is ``(1 - exp(-h)) (I - a dD/dz)``, with ``h``
the log-SNR step and ``D`` the x0 estimate.

* ``"fixed_point"``: the plain iteration ``z <- f(z)`` (gradient-free), or with
  ``accel="anderson"`` Anderson acceleration over the last ``window`` iterates;
* ``"anderson"``: the same with Anderson acceleration by default;
* ``"spdinv"``: SPDInv, AdamW on ``||z - f(z)||^2`` with the gradient through the network.

Reconstruction is the plain DDIM sampler on the same grid. The module also holds the small
pieces the other accurate inverters share (the step walk, progress and callback reports, and
the plain DDIM pivot and sampler).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..solvers.base import BoundModel
from .base import Inversion, Inverter, register
from .steps import ddim_move

__all__ = [
    "FixedPointInversion",
    "AndersonInversion",
    "SPDInversion",
    "ImplicitDDIMInverter",
    "Steps",
    "inv_step",
    "ddim_pivot",
    "ddim_sample",
]


# ---------------------------------------------------------------------------- shared pieces
def inv_step(z1: Tensor, eps: Tensor, a1: float, s1: float, a: float, s: float) -> Tensor:
    """The DDIM step from level ``(a1, s1)`` to ``(a, s)`` with a *fixed noise* ``eps``:
    ``a (z1 - s1 eps) / a1 + s eps`` (up or down alike)."""
    return ddim_move(z1, (z1 - s1 * eps) / a1, a1, s1, a, s)


class Steps:
    """Walks a decreasing sampling grid up (inversion) or down (reconstruction), with an
    optional tqdm bar and the per-step callback of the inverter contract.

    Iterating yields ``(i, t, t_next)`` (0-d float64 tensors); call :meth:`report` after
    each step with the step's input and output.
    """

    def __init__(
        self,
        grid: Tensor,
        *,
        up: bool,
        desc: str,
        progress: bool | None,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        times = grid.unbind()
        n = len(times) - 1
        if up:
            self.pairs = [(times[n - k], times[n - k - 1]) for k in range(n)]
        else:
            self.pairs = [(times[k], times[k + 1]) for k in range(n)]
        self.callback = callback
        show = sys.stderr.isatty() if progress is None else bool(progress)
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, desc=desc, unit="step", leave=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        try:
            for i, (t, t_next) in enumerate(self.pairs):
                yield i, t, t_next
        finally:
            if self.bar is not None:
                self.bar.close()

    def report(self, i: int, x: Tensor, x_next: Tensor, nfe: int, **extra: Any) -> None:
        t, t_next = self.pairs[i]
        if self.callback is not None:
            info = {"i": i, "t": t, "t_next": t_next, "x": x, "x_next": x_next, "nfe": nfe}
            info.update(extra)
            self.callback(info)
        if self.bar is not None:
            self.bar.set_postfix(nfe=nfe)
            self.bar.update(1)


def ddim_pivot(
    call: Callable[[Tensor, Tensor], Tensor],
    scalars: Callable[[Tensor], tuple[float, float, float]],
    x: Tensor,
    grid: Tensor,
    steps: Steps | None = None,
    nfe: Callable[[], int] = lambda: 0,
) -> list[Tensor]:
    """Plain DDIM inversion with the x0 predictor ``call(x, t)``: the trajectory
    ``[z_0, ..., z_n]`` in *sampling* order (``z_n = x``, ``z_0`` the latent).

    Each step uses the estimate at the lower point and its own time:
    ``z_i = ddim_move(z_(i+1), D(z_(i+1), t_(i+1)), a_(i+1), s_(i+1), a_i, s_i)``.
    """
    times = grid.unbind()
    n = len(times) - 1
    traj = [x]
    z = x
    for k in range(n):
        t1, t = times[n - k], times[n - k - 1]
        a1, s1, _ = scalars(t1)
        a, s, _ = scalars(t)
        z_up = ddim_move(z, call(z, t1), a1, s1, a, s)
        if steps is not None:
            steps.report(k, z, z_up, nfe())
        traj.append(z_up)
        z = z_up
    return traj[::-1]


def ddim_sample(
    call: Callable[[Tensor, Tensor, int], Tensor],
    scalars: Callable[[Tensor], tuple[float, float, float]],
    latent: Tensor,
    steps: Steps,
    nfe: Callable[[], int] = lambda: 0,
    offsets: list[Tensor] | None = None,
) -> Tensor:
    """The plain DDIM sampler from ``latent`` down the grid of ``steps``, with the x0
    predictor ``call(x, t, i)`` (``i`` the step index) and optional per-step offsets added
    after each step (direct inversion). No final denoising."""
    z = latent
    for i, t, t_next in steps:
        a, s, _ = scalars(t)
        a1, s1, _ = scalars(t_next)
        z_next = ddim_move(z, call(z, t, i), a, s, a1, s1)
        if offsets is not None:
            z_next = z_next + offsets[i]
        steps.report(i, z, z_next, nfe())
        z = z_next
    return z


def _rms(v: Tensor) -> Tensor:
    """Per-sample root-mean-square (float64), ``[B]``."""
    return v.reshape(v.shape[0], -1).to(torch.float64).pow(2).mean(1).sqrt()


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_pos(name: str, value: Any, *, zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")


@dataclass(frozen=True)
class ImplicitDDIMInverter(Inverter):
    """Base of the inverters that solve (or approximate) the implicit DDIM inversion step
    per step; reconstruction is the plain DDIM sampler. Subclasses implement
    :meth:`solve_step`."""

    def solve_step(
        self, bound: BoundModel, z1: Tensor, t1: Tensor, t: Tensor, index: int, n: int
    ) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

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
        bound = BoundModel(model, cond, grid)
        steps = Steps(grid, up=True, desc=self.name, progress=progress, callback=callback)
        z = x
        residual, evals = [], []
        for i, t1, t in steps:
            before = bound.nfe
            z_up, info = self.solve_step(bound, z, t1, t, i, len(steps))
            residual.append(float(info.get("residual", float("nan"))))
            evals.append(bound.nfe - before)
            steps.report(i, z, z_up, bound.nfe, **info)
            z = z_up
        aux = {
            "residual": torch.tensor(residual, dtype=torch.float64),
            "evals": torch.tensor(evals, dtype=torch.int64),
        }
        return Inversion(z, grid, self, cond=cond, aux=aux, nfe=bound.nfe)

    def reconstruct(
        self,
        model: Any,
        inversion: Inversion,
        *,
        cond: Any = None,
        progress: bool | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Tensor:
        bound = BoundModel(model, cond, inversion.grid)
        steps = Steps(
            inversion.grid, up=False, desc=self.name, progress=progress, callback=callback
        )
        return ddim_sample(
            lambda z, t, i: bound(z, t), bound.scalars, inversion.latent, steps, lambda: bound.nfe
        )


def _eps_of(bound: BoundModel, z: Tensor, t: Tensor, a: float, s: float) -> Tensor:
    return (z - a * bound(z, t)) / s


# ---------------------------------------------------------------------------- fixed point
@register
@dataclass(frozen=True)
class FixedPointInversion(ImplicitDDIMInverter):
    """Fixed-point DDIM inversion (AIDI, Pan et al. 2023; the implicit step of SPDInv).

    Per step, solves ``z = f(z) = (a/a1) z1 + (s - a s1/a1) eps(z, t)`` (see the module
    docstring) from the plain DDIM inversion step, by the iteration ``z <- f(z)`` or, with
    ``accel="anderson"``, by Anderson acceleration (type II, per sample, over the last
    ``window`` residual differences):

        gamma = argmin || F_k - dF gamma ||,   z_(k+1) = f(z_k) - dG gamma,

    with ``F = f(z) - z`` and ``dF``, ``dG`` the differences of the last residuals and
    maps. A step stops when the per-sample RMS residual ``||f(z) - z||`` is below ``tol``
    for every sample or after ``max_iter`` evaluations of ``f``; each sample then gets its
    iterate with the smallest measured residual (where the map does not contract, as under
    strong guidance, the iteration can wander off: the step never does worse than the
    plain DDIM step it started from). Reconstruction is plain DDIM.

    ``aux["residual"]`` holds each step's final residual (max over the batch) and
    ``aux["evals"]`` each step's model evaluations (1 for the start plus one per ``f``).

    Args:
        accel: ``"none"`` (plain iteration) or ``"anderson"``.
        max_iter: at most this many evaluations of ``f`` per step.
        tol: the RMS residual at which a step stops.
        window: the Anderson history ``m`` (3-5 is usual).

    The defaults are ours (the AIDI paper has no public code): ``tol=1e-5`` suits float64
    and float32 data of unit scale.

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> prior = Gaussian(torch.zeros(2), torch.tensor([0.3, 2.0]), process=vp_linear())
        >>> x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
        >>> inv = invert(prior, x, 10, "fixed_point", tol=1e-10, max_iter=200)
        >>> float((reconstruct(prior, inv) - x).abs().max()) < 1e-8
        True
    """

    name: ClassVar[str] = "fixed_point"
    citation: ClassVar[str] = (
        "Pan, Gherardi, Xie, Huang. Effective Real Image Editing with Accelerated Iterative "
        "Diffusion Inversion. ICCV 2023 (arXiv:2309.04907)."
    )

    accel: str = "none"
    max_iter: int = 50
    tol: float = 1e-5
    window: int = 5

    def __post_init__(self) -> None:
        if self.accel not in ("none", "anderson"):
            raise ValueError(f"accel must be 'none' or 'anderson', got {self.accel!r}")
        _check_int("max_iter", self.max_iter, 1)
        _check_pos("tol", self.tol)
        _check_int("window", self.window, 1)

    def solve_step(
        self, bound: BoundModel, z1: Tensor, t1: Tensor, t: Tensor, index: int, n: int
    ) -> tuple[Tensor, dict[str, Any]]:
        a1, s1, _ = bound.scalars(t1)
        a, s, _ = bound.scalars(t)
        base, coef = (a / a1) * z1, s - a * s1 / a1

        def f(z: Tensor) -> Tensor:
            return base + coef * _eps_of(bound, z, t, a, s)

        z = ddim_move(z1, bound(z1, t1), a1, s1, a, s)  # the plain DDIM inversion step
        g = f(z)
        r = g - z
        res = _rms(r)
        hist_f: list[Tensor] = []
        hist_g: list[Tensor] = []
        iters = 1
        # per sample, the iterate with the smallest residual so far: where the map does not
        # contract (strong guidance), the iteration may wander off, and the step then
        # returns its best iterate (at worst the plain DDIM step it started from)
        z_best, res_best = z, res
        while float(res.max()) >= self.tol and iters < self.max_iter:
            corr = _anderson_correction(r, hist_f, hist_g) if hist_f else None
            z_new = g if corr is None else g - corr
            g_new = f(z_new)
            r_new = g_new - z_new
            res_new = _rms(r_new)
            iters += 1
            if self.accel == "anderson":
                if corr is not None:
                    # safeguard: an extrapolated iterate whose residual grew is dropped for
                    # that sample, whose history restarts (its next step is a plain one)
                    reject = (_rms(corr) > 0) & (res_new > res)
                    if bool(reject.any()):
                        keep = reject.reshape((-1,) + (1,) * (z.ndim - 1))
                        z_new = torch.where(keep, z, z_new)
                        g_new = torch.where(keep, g, g_new)
                        r_new = torch.where(keep, r, r_new)
                        res_new = torch.where(reject, res, res_new)
                        hist_f = [torch.where(keep, 0.0, h) for h in hist_f]
                        hist_g = [torch.where(keep, 0.0, h) for h in hist_g]
                hist_f.append(r_new - r)
                hist_g.append(g_new - g)
                if len(hist_f) > self.window:
                    hist_f.pop(0)
                    hist_g.pop(0)
            z, g, r, res = z_new, g_new, r_new, res_new
            better = res < res_best
            if bool(better.any()):
                z_best = torch.where(better.reshape((-1,) + (1,) * (z.ndim - 1)), z, z_best)
                res_best = torch.minimum(res, res_best)
        return z_best, {"residual": float(res_best.max()), "iterations": iters}


def _anderson_correction(r: Tensor, hist_f: list[Tensor], hist_g: list[Tensor]) -> Tensor:
    """``dG gamma`` with ``gamma = argmin ||r - dF gamma||`` per sample (regularised normal
    equations, computed in float64)."""
    b = r.shape[0]
    dtype = torch.float64
    df = torch.stack([h.reshape(b, -1).to(dtype) for h in hist_f], dim=2)  # [B, D, m]
    dg = torch.stack([h.reshape(b, -1).to(dtype) for h in hist_g], dim=2)
    rf = r.reshape(b, -1, 1).to(dtype)
    gram = df.transpose(1, 2) @ df  # [B, m, m]
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=dtype, device=r.device)
    diag = gram.diagonal(dim1=1, dim2=2)  # [B, m]
    scale = diag.mean(1)
    # Tikhonov regularisation relative to the history's scale; a zeroed (restarted)
    # difference gets a unit diagonal and so a zero coefficient
    gram = gram + (1e-10 * scale)[:, None, None] * eye + torch.diag_embed((diag == 0).to(dtype))
    gamma = torch.linalg.solve(gram, df.transpose(1, 2) @ rf)  # [B, m, 1]
    return (dg @ gamma).reshape(r.shape).to(r.dtype)


@register
@dataclass(frozen=True)
class AndersonInversion(FixedPointInversion):
    """Fixed-point DDIM inversion with Anderson acceleration (window ``m = 5``) by default:
    :class:`FixedPointInversion` with ``accel="anderson"``. Fewer evaluations than the plain
    iteration for the same residual.

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> prior = Gaussian(torch.zeros(2), torch.tensor([0.3, 2.0]), process=vp_linear())
        >>> x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
        >>> inv = invert(prior, x, 10, "anderson", tol=1e-10)
        >>> float((reconstruct(prior, inv) - x).abs().max()) < 1e-8
        True
    """

    name: ClassVar[str] = "anderson"
    accel: str = "anderson"


# ---------------------------------------------------------------------------- SPDInv
@register
@dataclass(frozen=True)
class SPDInversion(ImplicitDDIMInverter):
    """SPDInv (Li, Li, Zhang, ECCV 2024): per step, AdamW on the fixed-point residual
    ``||z - f(z)||^2`` (mean over elements, per sample) with the gradient through the
    network, started from the plain DDIM inversion step; the loop stops after ``k_round``
    updates or once every sample's loss is below ``delta``. Reconstruction is plain DDIM.

    ``f`` is the map of :class:`FixedPointInversion`. The paper's defaults: ``k_round=25``,
    ``lr=1e-3``, ``delta=5e-6``; AdamW with torch's default weight decay (0.01), as in the
    official code. The model must be differentiable in ``x`` (the network's parameters
    need not be). ``aux["residual"]`` holds each step's final RMS residual.

    Example:
        >>> import torch
        >>> from diffusolve.inversion import invert, reconstruct
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import vp_linear
        >>> prior = Gaussian(torch.zeros(2), torch.tensor([0.3, 2.0]), process=vp_linear())
        >>> x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
        >>> inv = invert(prior, x, 10, "spdinv")
        >>> inv.latent.shape
        torch.Size([1, 2])
    """

    name: ClassVar[str] = "spdinv"
    citation: ClassVar[str] = (
        "Li, Li, Zhang. Source Prompt Disentangled Inversion for Boosting Image Editability "
        "with Diffusion Models. ECCV 2024."
    )

    k_round: int = 25
    lr: float = 1e-3
    delta: float = 5e-6
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        _check_int("k_round", self.k_round, 0)
        _check_pos("lr", self.lr)
        _check_pos("delta", self.delta, zero=True)
        _check_pos("weight_decay", self.weight_decay, zero=True)

    def solve_step(
        self, bound: BoundModel, z1: Tensor, t1: Tensor, t: Tensor, index: int, n: int
    ) -> tuple[Tensor, dict[str, Any]]:
        a1, s1, _ = bound.scalars(t1)
        a, s, _ = bound.scalars(t)
        z1 = z1.detach()
        base, coef = (a / a1) * z1, s - a * s1 / a1
        z0 = ddim_move(z1, bound(z1, t1), a1, s1, a, s).detach()
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([z], lr=self.lr, weight_decay=self.weight_decay)
        loss_per = None
        rounds = 0
        with torch.enable_grad():
            for _ in range(self.k_round + 1):
                g = base + coef * _eps_of(bound, z, t, a, s)
                loss_per = (z - g).reshape(z.shape[0], -1).pow(2).mean(1)
                if float(loss_per.detach().max()) < self.delta or rounds == self.k_round:
                    break
                opt.zero_grad()
                loss_per.sum().backward()
                opt.step()
                rounds += 1
        assert loss_per is not None
        res = float(loss_per.detach().max().sqrt())
        return z.detach(), {"residual": res, "iterations": rounds}
