"""Calibrated guidance with an off-the-shelf clean classifier: EluCD (Ma, Zhang, Xie, Li,
Liu & Huang, "Elucidating the Design Space of Classifier-Guided Diffusion Generation",
ICLR 2024).

The recipe (paper defaults):

1. the classifier is any classifier of *clean* images, with every ReLU replaced by
   ``Softplus(beta=3)`` (smoother input gradients; :func:`softplus_relu`);
2. it sees the denoiser's x0 estimate, never ``x_t``;
3. calibrated log-likelihood with a joint and a marginal temperature,
   ``log p~(y | x0) = tau1 f_y(x0) - logsumexp(tau2 f(x0))``, ``tau1 = 1``, ``tau2 = 0.5 tau1``;
4. ``g = s grad_{x0} log p~(y | x0_hat)`` (no backpropagation through the denoiser);
5. the DDPM step's mean moves by ``(Sigma_t + gamma sin(pi t / T) max_t Sigma_t) g``,
   ``gamma = 0.3``.

Translation to the x0 contract (exact for the DDPM ancestral step). A DDPM ancestral step
``t -> t'`` of any process ``x = alpha x0 + sigma eps`` (``solver="ddpm"``, i.e. DDIM with
``eta = 1``, on the grid) draws from ``q(x_t' | x_t, x0_hat)``: mean
``mu = c0 x0_hat + (...) x_t`` and variance ``Sigma = sigma'^2 (1 - e^{-2h})``,
``h = lambda' - lambda``, with

    c0 = (alpha'^2 sigma^2 - sigma'^2 alpha^2) / (alpha' sigma^2),
    Sigma = sigma'^2 (alpha'^2 sigma^2 - sigma'^2 alpha^2) / (alpha'^2 sigma^2)

(for a VP process ``c0 = alpha' beta / sigma^2`` and ``Sigma = sigma'^2 beta / sigma^2`` with the
respaced ``beta = 1 - alpha^2 / alpha'^2``: DDPM's posterior). Moving ``mu`` by ``Delta`` is
moving ``x0_hat`` by ``Delta / c0``, so EluCD is the x0 shift

    Delta x0 = s * (sigma'^2 / alpha' + gamma sin(pi u) Sigma_max / c0) * grad_{x0} log p~,

(``Sigma / c0 = sigma'^2 / alpha'`` for every process), with ``t'`` the next time of the sampling
grid (like CFG++, the wrapper needs the grid), ``Sigma_max`` the largest step variance on that
grid and ``u = (t - t_min) / (t_max - t_min)`` the normalised time (``t / T``). With
``solver="ddpm"`` on that grid this reproduces EluCD's mean update exactly (tested); other
solvers receive the same x0 shift (a deterministic solver then follows the guided x0 rather
than EluCD's guided mean; the shift per step is the same). At or below the grid's last time
(the final denoising evaluation) there is no step and no shift.

The scale ``s`` has no universal default (it depends on the classifier's logit scale).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ._labels import net_dtype, target_labels
from .base import Evaluation, GuidanceTerm, Guided, as_scale, next_grid_time, per_sample

__all__ = ["softplus_relu", "EluCDTerm", "EluCD", "calibrated_log_prob", "ddpm_step_coefficients"]


def softplus_relu(module: nn.Module, beta: float = 3.0) -> nn.Module:
    """A deep copy of ``module`` with every ``nn.ReLU`` submodule replaced by
    ``nn.Softplus(beta)`` (the original is untouched). Only ReLU *modules* are found: a
    network that calls ``torch.relu`` / ``F.relu`` in ``forward`` is refused (nothing to
    replace), so declare activations as modules.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> softplus_relu(net)[1], net[1]
        (Softplus(beta=3.0, threshold=20.0), ReLU())
    """
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    out = copy.deepcopy(module)
    found = 0
    for parent in out.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=float(beta)))
                found += 1
    if found == 0:
        raise ValueError(
            f"{type(module).__name__} has no nn.ReLU submodule to replace (functional relu calls "
            "cannot be swapped); pass beta=None to use the classifier as it is"
        )
    return out


def calibrated_log_prob(logits: Tensor, y: Tensor, tau1: float, tau2: float) -> Tensor:
    """``tau1 f_y - logsumexp(tau2 f)`` per sample (EluCD's calibrated log-likelihood)."""
    return tau1 * logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(tau2 * logits, dim=1)


def ddpm_step_coefficients(process: Any, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
    """``(c0, Sigma)``: the x0 coefficient of the mean and the variance of the ancestral
    step ``t -> t_next`` (``q(x_t' | x_t, x0)``; see the module docstring). Float64."""
    a, s = process.alpha(t), process.sigma(t)
    a1, s1 = process.alpha(t_next), process.sigma(t_next)
    gap = a1 * a1 * s * s - s1 * s1 * a * a
    return gap / (a1 * s * s), s1 * s1 * gap / (a1 * a1 * s * s)


class EluCDTerm(GuidanceTerm):
    """EluCD's x0 shift for the sampling ``grid`` (see the module docstring).

    Args:
        classifier: a clean-image classifier ``classifier(x0) -> logits``.
        scale: ``s >= 0`` (float or per sample ``[B]``).
        grid: the decreasing sampling grid.
        tau1, tau2: the joint and marginal temperatures (paper: 1 and ``0.5 tau1``;
            ``tau2=None`` means ``0.5 tau1``).
        gamma: the sine boost (paper: 0.3).
        beta: Softplus ``beta`` replacing the classifier's ReLUs (paper: 3); ``None`` keeps
            the classifier as it is.
        target: the labels (default: the evaluation's ``cond``).
    """

    def __init__(
        self,
        classifier: nn.Module,
        scale: Any,
        grid: Tensor,
        *,
        tau1: float = 1.0,
        tau2: float | None = None,
        gamma: float = 0.3,
        beta: float | None = 3.0,
        target: Any = None,
    ) -> None:
        self.classifier = classifier if beta is None else softplus_relu(classifier, beta)
        self.scale = as_scale(scale)
        self.tau1 = as_scale(tau1, name="tau1")
        self.tau2 = 0.5 * self.tau1 if tau2 is None else as_scale(tau2, name="tau2")
        self.gamma = as_scale(gamma, name="gamma")
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("grid must be the decreasing sampling grid (at least 2 times)")
        self.grid = grid
        self.target = target
        self._sigma_max: dict[int, float] = {}

    def sigma_max(self, process: Any) -> float:
        """The largest ancestral-step variance on the grid."""
        key = id(process)
        if key not in self._sigma_max:
            _, var = ddpm_step_coefficients(process, self.grid[:-1], self.grid[1:])
            self._sigma_max[key] = float(var.max())
        return self._sigma_max[key]

    def coefficient(self, process: Any, t: Tensor) -> Tensor:
        """The x0-shift coefficient per unit of ``s grad log p~`` at ``t`` (float64,
        the shape of ``t``; 0 where ``t`` has no next grid time)."""
        t_next, has = next_grid_time(self.grid, t)
        t1 = torch.where(has, t_next, t - 1.0)  # any valid time below t; masked out
        t1 = torch.clamp(t1, min=process.t_min)
        c0, _ = ddpm_step_coefficients(process, t, t1)
        u = (t - process.t_min) / (process.t_max - process.t_min)
        boost = self.gamma * torch.sin(math.pi * u) * self.sigma_max(process)
        coef = process.sigma(t1) ** 2 / process.alpha(t1) + boost / c0
        return torch.where(has, coef, torch.zeros_like(coef))

    def shift(self, ev: Evaluation) -> Tensor:
        b = ev.batch
        y = target_labels(ev.cond, self.target, b, ev.x.device)
        x0 = ev.x0.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.classifier(x0.to(net_dtype(self.classifier, x0)))
            logp = calibrated_log_prob(logits, y.to(logits.device), self.tau1, self.tau2)
            (grad,) = torch.autograd.grad(logp.sum(), x0)
        coef = per_sample(self.coefficient(ev.process, ev.t), b)
        return ev.rows(per_sample(self.scale, b) * coef) * grad.to(ev.x.dtype)

    def __repr__(self) -> str:
        return f"EluCDTerm(scale={self.scale}, tau=({self.tau1}, {self.tau2}), gamma={self.gamma})"


class EluCD(Guided):
    """EluCD (Ma et al., ICLR 2024): an off-the-shelf clean classifier guiding ``model`` on
    the sampling ``grid``; see the module docstring.

    Args:
        model: the base denoiser; ``cfg`` its CFG scale (1: conditional, 0: unconditional,
            the paper's setting).
        classifier: a clean-image classifier ``classifier(x0) -> logits`` (its ReLUs are
            replaced by ``Softplus(beta)`` in a copy).
        scale, grid, tau1, tau2, gamma, beta, target: see :class:`EluCDTerm`.

    Example:
        >>> import torch
        >>> from diffusolve.guidance import EluCD
        >>> from diffusolve.models import load
        >>> from diffusolve.models.clean_classifier import load_clean_classifier
        >>> from diffusolve.process import make_grid
        >>> model = load("digits")
        >>> grid = make_grid(model.process, 10, "time_uniform")
        >>> g = EluCD(model, load_clean_classifier("digits"), 1.0, grid=grid)
        >>> g(torch.zeros(2, 1, 16, 16), 500.0, [3, 7]).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        model: Any,
        classifier: nn.Module,
        scale: Any,
        *,
        grid: Tensor,
        tau1: float = 1.0,
        tau2: float | None = None,
        gamma: float = 0.3,
        beta: float | None = 3.0,
        target: Any = None,
        cfg: Any = 1.0,
        null_cond: Any = None,
    ) -> None:
        term = EluCDTerm(
            classifier, scale, grid, tau1=tau1, tau2=tau2, gamma=gamma, beta=beta, target=target
        )
        super().__init__(model, cfg, [term], null_cond=null_cond)
