"""Training of the noise-aware digits classifier ``p(y | x_t, t)``.

The network (:class:`~diffusolve.models.classifier.NoiseAwareClassifier`) and its loader
live in :mod:`diffusolve.models.classifier` and are re-exported here. The classifier is
trained on the train split noised at every level of the bundled model's process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.classifier import (
    CLASSIFIER_CONFIG,
    CLASSIFIER_FILE,
    NoiseAwareClassifier,
    load_classifier_from,
)
from ..models.data import NUM_CLASSES, load_digits

__all__ = [
    "NoiseAwareClassifier",
    "ClassifierConfig",
    "train_classifier",
    "load_classifier_from",
    "classifier_accuracy",
    "CLASSIFIER_FILE",
    "CLASSIFIER_CONFIG",
]


@dataclass
class ClassifierConfig:
    """Hyper-parameters of :func:`train_classifier` (defaults: the shipped classifier)."""

    steps: int = 2000
    seed: int = 0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    low_noise_fraction: float = 0.25  # share of each batch drawn from t in [0, low_noise_t)
    low_noise_t: int = 50
    max_shift: int = 1  # random translation by up to this many pixels (augmentation)
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64


def _process_alphas(scheduler_dir: Path | None = None) -> tuple[Tensor, dict[str, Any]]:
    """``alphas_cumprod`` (float32) of the digits process, from the shipped scheduler config
    when present, else from the training recipe."""
    from .digits import ASSET_DIR, DigitsConfig, build_scheduler

    path = (scheduler_dir or ASSET_DIR / "scheduler") / "scheduler_config.json"
    if path.is_file():
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(json.loads(path.read_text()))
    else:
        sched = build_scheduler(DigitsConfig())
    return sched.alphas_cumprod.to(torch.float32), dict(sched.config)


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    if max_shift <= 0:
        return x
    pad = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    size = x.shape[-1]
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = pad[i, :, dy : dy + size, dx : dx + size]
    return out


def classifier_accuracy(net: nn.Module, x: Tensor, y: Tensor, t: float = 0.0) -> float:
    """Top-1 accuracy of ``net`` on clean images ``x`` presented at time ``t``."""
    with torch.no_grad():
        pred = net(x, torch.tensor(float(t))).argmax(dim=1)
    return float((pred == y).float().mean())


def fit(
    net: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    batch_loss: Callable[[Tensor, Tensor], Tensor],
    cfg: Any,
    gen: torch.Generator,
    *,
    desc: str,
    progress: bool = True,
) -> tuple[float | None, float]:
    """The digits classifiers' training loop: ``cfg.steps`` AdamW steps (Loshchilov & Hutter
    2019; ``cfg.lr``, ``cfg.weight_decay``) under a one-cycle schedule peaking at ``cfg.lr``
    (Smith & Topin 2019), on minibatches of ``cfg.batch_size`` taken in order from a random
    permutation of the training set (a new one, drawn from ``gen``, when the rest is shorter
    than a batch). ``batch_loss(x, y)`` gives a minibatch's loss (it draws its own
    augmentations from ``gen``). Returns the exponential running mean of the loss (weight
    0.02) and the wall time in seconds.
    """
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    n = x_train.shape[0]
    perm, pos, run = torch.randperm(n, generator=gen), 0, None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=2.0)
    for _ in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = batch_loss(x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        li = float(loss.detach())
        run = li if run is None else 0.98 * run + 0.02 * li
        bar.set_postfix(loss=f"{run:.4f}", refresh=False)
    return run, time.perf_counter() - start


def train_classifier(
    cfg: ClassifierConfig | None = None, out: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train the noise-aware classifier on the train split, noised at all levels of the
    digits process; save ``classifier.safetensors`` + ``classifier_config.json`` in ``out``
    (default: the packaged ``assets/digits``). Returns accuracies on the held-out split.
    """
    from safetensors.torch import save_file

    from .digits import ASSET_DIR

    cfg = cfg or ClassifierConfig()
    if not 0.0 <= cfg.low_noise_fraction <= 1.0:
        raise ValueError(f"low_noise_fraction must be in [0, 1], got {cfg.low_noise_fraction}")
    out = Path(out) if out is not None else ASSET_DIR
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ac, sched_cfg = _process_alphas()
    n_t = ac.shape[0]
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("heldout")
    net = NoiseAwareClassifier(tuple(cfg.widths), cfg.feature_dim)

    def batch_loss(x: Tensor, y: Tensor) -> Tensor:
        x0 = _shift(x, cfg.max_shift, gen)
        b = len(y)
        t = torch.randint(0, n_t, (b,), generator=gen)
        n_low = int(round(cfg.low_noise_fraction * b))
        t[:n_low] = torch.randint(0, cfg.low_noise_t, (n_low,), generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1.0 - ac[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * torch.randn(x0.shape, generator=gen)
        return nn.functional.cross_entropy(net(xt, t.float()), y)

    run, wall = fit(
        net, x_train, y_train, batch_loss, cfg, gen, desc="train classifier", progress=progress
    )
    net.eval()

    acc = {"t_min": classifier_accuracy(net, x_test, y_test, 0.0)}
    with torch.no_grad():
        g = torch.Generator().manual_seed(1234)
        for tt in (100, 300, 500, 700, 900):
            a, s = float(ac[tt].sqrt()), float((1 - ac[tt]).sqrt())
            xt = a * x_test + s * torch.randn(x_test.shape, generator=g)
            acc[f"t={tt}"] = float(
                (net(xt, torch.tensor(float(tt))).argmax(1) == y_test).float().mean()
            )
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / CLASSIFIER_FILE))
    config = {
        "class": "NoiseAwareClassifier",
        "widths": list(cfg.widths),
        "feature_dim": cfg.feature_dim,
        "t_dim": net.t_dim,
        "num_classes": NUM_CLASSES,
        "time_scale": 1.0,
        "time_units": "diffusers timestep of the digits process (0..999)",
        "process": {
            k: sched_cfg[k]
            for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
        },
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "parameters": sum(p.numel() for p in net.parameters()),
        "wall_time_s": round(wall, 1),
        "final_loss": round(run or float("nan"), 5),
        "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()},
    }
    (out / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config
