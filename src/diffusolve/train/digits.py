"""Train the bundled class-conditional digits model (diffusers ``UNet2DModel``).

Recipe (recorded in ``assets/digits/MODEL_CARD.md`` and ``train_info.json``):

- data: :func:`diffusolve.models.data.load_digits` (train split, 16x16, [-1, 1]);
- process: DDPM, linear betas 1e-4..0.02, 1,000 training timesteps (diffusers
  ``DDPMScheduler``; :func:`diffusolve.process.from_scheduler_config` maps its config onto
  :func:`diffusolve.process.ddpm`);
- prediction: ``v`` (``v = alpha * eps - sigma * x0``), MSE loss, timesteps uniform on 0..999;
- conditioning: ``num_class_embeds=11``, classes 0-9 plus the null class 10, which replaces the
  label with probability ``label_dropout`` (classifier-free guidance);
- AdamW, linear warm-up then cosine decay, gradient clipping at 1, EMA of the weights (the EMA
  weights are what is saved).

Deterministic for a seed and a thread count: one generator drives the data order, the
timesteps, the noise and the label dropout; ``torch.manual_seed`` fixes the initial weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.data import NUM_CLASSES, load_digits

__all__ = [
    "DigitsConfig",
    "NULL_CLASS",
    "build_unet",
    "build_scheduler",
    "train_digits",
    "ASSET_DIR",
]

NULL_CLASS = NUM_CLASSES  # label 10 = "no label" for classifier-free guidance
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"


@dataclass
class DigitsConfig:
    """Hyper-parameters of :func:`train_digits` (the defaults are the shipped model's)."""

    steps: int = 1500
    seed: int = 0
    batch_size: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    prediction_type: str = "v_prediction"
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    extra: dict[str, Any] = field(default_factory=dict)


def build_unet(cfg: DigitsConfig):
    """The (untrained) class-conditional ``UNet2DModel`` of ``cfg``."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        attention_head_dim=32,
        norm_num_groups=32,
        num_class_embeds=NUM_CLASSES + 1,
    )


def build_scheduler(cfg: DigitsConfig):
    """The diffusers ``DDPMScheduler`` that defines the training process of ``cfg``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def _target(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(
        f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
    )


def _lr_factor(step: int, cfg: DigitsConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def train_digits(
    cfg: DigitsConfig | None = None,
    out: str | Path | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the digits UNet and save it as a diffusers folder under ``out``.

    Writes ``out/unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, EMA
    weights), ``out/scheduler/scheduler_config.json`` and ``out/train_info.json``. Returns the
    training record (steps, wall time, final loss, parameter count, ...).

    Example (a few steps only; the shipped model uses the defaults)::

        from diffusolve.train.digits import DigitsConfig, train_digits
        info = train_digits(DigitsConfig(steps=5, batch_size=8), out="/tmp/digits")
    """
    from tqdm.auto import tqdm

    cfg = cfg or DigitsConfig()
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {cfg.label_dropout}")
    out = Path(out) if out is not None else ASSET_DIR
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    x_train, y_train = load_digits("train")
    unet = build_unet(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_scheduler(cfg)
    ac = scheduler.alphas_cumprod.to(torch.float32)
    n_params = sum(p.numel() for p in unet.parameters())

    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    n = x_train.shape[0]
    perm = torch.randperm(n, generator=gen)
    pos = 0
    run_loss = None
    losses: list[float] = []
    start = time.perf_counter()
    unet.train()
    bar = tqdm(range(cfg.steps), desc="train digits", disable=not progress, mininterval=2.0)
    for step in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x0, y = x_train[idx], y_train[idx].clone()
        drop = torch.rand(len(y), generator=gen) < cfg.label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, cfg.num_train_timesteps, (len(y),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1.0 - ac[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        pred = unet(xt, t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, _target(x0, eps, a, s, cfg.prediction_type))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1.0 - d)
        li = float(loss.detach())
        losses.append(li)
        run_loss = li if run_loss is None else 0.98 * run_loss + 0.02 * li
        bar.set_postfix(loss=f"{run_loss:.4f}", refresh=False)
    wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    tail = losses[-200:]
    info = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "parameters": n_params,
        "train_images": n,
        "wall_time_s": round(wall, 1),
        "final_loss_mean_last_200": round(sum(tail) / len(tail), 5),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def sample_digits(
    model: Any,
    labels: Tensor,
    steps: int,
    solver: str = "ddim",
    *,
    seed: int = 0,
    batch_size: int = 500,
) -> Tensor:
    """Samples ``[N, 1, 16, 16]`` of a digits denoiser for ``labels`` ``[N]`` (prior noise from
    ``seed``; batches of ``batch_size``; a ``steps``-step logSNR grid; x0 clamped to [-1, 1])."""
    from ..solvers import sample

    x = model.process.prior_sample((len(labels), 1, 16, 16), torch.Generator().manual_seed(seed))
    out = []
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            out.append(
                sample(
                    model,
                    x[i : i + batch_size],
                    steps,
                    solver,
                    cond=labels[i : i + batch_size],
                    x0_transform=lambda z: z.clamp(-1.0, 1.0),
                    progress=False,
                )
            )
    return torch.cat(out).clamp(-1.0, 1.0)


def evaluate_digits(
    n: int = 1000,
    steps: int = 50,
    solver: str = "dpmpp_2m",
    guidance: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FD-digits (vs the held-out split) and classifier agreement of ``n`` samples of the
    bundled model, ``n / 10`` per class, with ``solver`` on a ``steps``-step logSNR grid."""
    from ..guidance import classifier_free
    from ..models import fd_digits, load, load_classifier

    model = load("digits")
    if guidance is not None:
        model = classifier_free(model, guidance)
    labels = torch.arange(n) % NUM_CLASSES
    start = time.perf_counter()
    xs = sample_digits(model, labels, steps, solver, seed=seed)
    wall = time.perf_counter() - start
    with torch.no_grad():
        pred = load_classifier()(xs, torch.tensor(0.0)).argmax(1)
    return {
        "n": n,
        "steps": steps,
        "solver": solver,
        "guidance": guidance,
        "seed": seed,
        "fd_digits": round(fd_digits(xs), 3),
        "class_agreement": round(float((pred == labels).float().mean()), 4),
        "sampling_wall_s": round(wall, 1),
    }
