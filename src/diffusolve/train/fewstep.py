"""Shared pieces of the few-step trainings (``digits-lcm``, ``digits-lcm-lora``,
``digits-mmd``): the teacher's DDPM scalars, the v-prediction x0 estimate of a raw UNet,
EMA updates, the learning-rate schedule and the FD-digits evaluation of a few-step model.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DDPMScalars",
    "unet_x0",
    "ema_update",
    "lr_factor",
    "evaluate_fewstep",
    "evaluate_teacher",
    "base_unet",
]


class DDPMScalars:
    """``alpha(t) = sqrt(abar_t)`` and ``sigma(t) = sqrt(1 - abar_t)`` of the bundled digits
    process at integer timesteps (the diffusers ``DDPMScheduler``'s ``alphas_cumprod``).

    Example:
        >>> sc = DDPMScalars()
        >>> a, s = sc(torch.tensor([0, 999]))
        >>> bool(torch.allclose(a**2 + s**2, torch.ones(2, dtype=torch.float64)))
        True
    """

    def __init__(self, num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float64) -> None:
        betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
        self.abar = torch.cumprod(1.0 - betas, 0).to(dtype)

    def __call__(self, t: Tensor, ndim: int = 1) -> tuple[Tensor, Tensor]:
        ab = self.abar[t.long()].view(-1, *([1] * (ndim - 1)))
        return ab.sqrt(), (1.0 - ab).sqrt()


def unet_x0(unet: Any, x: Tensor, t: Tensor, y: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """The x0 estimate ``a x - s v`` of a v-prediction UNet (``t``, ``y``: ``[B]``)."""
    v = unet(x, t, class_labels=y).sample
    return a.to(x.dtype) * x - s.to(x.dtype) * v


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over the trainable parameters' names."""
    params = dict(model.named_parameters())
    for name, pe in ema.named_parameters():
        p = params[name]
        if p.requires_grad:
            pe.lerp_(p.detach(), 1.0 - decay)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def base_unet() -> Any:
    """A trainable float32 copy of the bundled ``digits`` UNet (EMA weights)."""
    import copy

    from ..models import load

    unet = copy.deepcopy(load("digits").model.unet)
    unet.requires_grad_(True).train()
    return unet


def _judge(xs: Tensor, labels: Tensor) -> dict[str, Any]:
    from ..models import fd_digits, load_classifier

    with torch.no_grad():
        pred = load_classifier()(xs, torch.tensor(0.0)).argmax(1)
    return {
        "fd_digits": round(fd_digits(xs), 4),
        "class_agreement": round(float((pred == labels).float().mean()), 4),
    }


def evaluate_fewstep(
    model: Any, steps: tuple[int, ...] = (1, 2, 4), n: int = 1000, seed: int = 0, guidance=1.0
) -> list[dict[str, Any]]:
    """FD-digits (vs the held-out split) and class agreement (bundled noise-aware classifier
    at t = 0) of ``n`` samples, labels ``i % 10``, for each step count of a few-step model
    (a name, a folder or a model loaded with its recipe)."""
    from ..models.fewstep import sample_fewstep

    if isinstance(model, str):
        from ..models import load

        model = load(model)
    labels = torch.arange(n) % 10
    rows = []
    for k in steps:
        start = time.perf_counter()
        xs = sample_fewstep(model, n, k, labels, seed=seed, guidance=guidance)
        wall = time.perf_counter() - start
        nfe = model.fewstep.nfe(k, guidance)
        rows.append({"steps": k, "nfe": nfe, "n": n, "guidance": guidance, **_judge(xs, labels)})
        rows[-1]["sampling_wall_s"] = round(wall, 2)
    return rows


def evaluate_teacher(
    solvers: tuple[str, ...] = ("dpmpp_2m", "unipc_bh2_2", "dpm_solver_3m"),
    nfes: tuple[int, ...] = (5, 10, 50),
    n: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The bundled ``digits`` teacher with each solver at each NFE (``final="denoise"``
    counted), logSNR grid, x0 clamped to [-1, 1], the same samples' labels and prior noise
    as :func:`evaluate_fewstep` (per-sample seeds ``seed + i``)."""
    from ..models import load
    from ..solvers import grid_for_nfe, sample

    model = load("digits")
    labels = torch.arange(n) % 10
    rows = []
    for nfe in nfes:
        for solver in solvers:
            grid = grid_for_nfe(model.process, solver, nfe, "logsnr", final="denoise")
            x = model.process.prior_sample((n, 1, 16, 16), noise=seed)
            stats: dict[str, Any] = {}
            with torch.no_grad():
                xs = sample(
                    model,
                    x,
                    grid,
                    solver,
                    cond=labels,
                    final="denoise",
                    x0_transform=lambda z: z.clamp(-1.0, 1.0),
                    stats=stats,
                    progress=False,
                ).clamp(-1.0, 1.0)
            rows.append({"solver": solver, "nfe": stats["nfe"], "n": n, **_judge(xs, labels)})
    return rows
