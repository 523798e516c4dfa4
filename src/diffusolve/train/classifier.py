"""A small noise-aware digits classifier ``p(y | x_t, t)`` and its training.

The network sees a noised digit ``x_t = alpha(t) x0 + sigma(t) eps`` of the bundled model's
process (DDPM, linear betas, 1,000 steps; ``t`` in diffusers timestep units 0..999) and the
time ``t``. Its penultimate features at ``t = t_min`` on clean images define FD-digits
(:mod:`diffusolve.metrics.fd`); the same network can serve classifier guidance.

Architecture: three conv stages (16x16 -> 8x8 -> 4x4, widths 16/32/64) of conv + GroupNorm
+ SiLU, each modulated (FiLM scale/shift) by an MLP of a sinusoidal embedding of ``t``;
global average pooling, a linear layer to ``feature_dim`` features (+ SiLU), then the logits.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import NUM_CLASSES, load_digits

__all__ = [
    "NoiseAwareClassifier",
    "ClassifierConfig",
    "train_classifier",
    "load_classifier_from",
    "classifier_accuracy",
]

CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier_config.json"


def _time_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, t_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.film = nn.Linear(t_dim, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(h)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
        return nn.functional.silu(self.norm2(self.conv2(h)))


class NoiseAwareClassifier(nn.Module):
    """``logits = net(x_t, t)`` for ``x_t`` of shape ``[B, 1, 16, 16]`` and ``t`` of shape
    ``[B]`` or 0-d (process time, diffusers timestep units).

    :meth:`features` returns the ``feature_dim`` penultimate activations used by FD-digits.

    Example:
        >>> import torch
        >>> from diffusolve.train.classifier import NoiseAwareClassifier
        >>> net = NoiseAwareClassifier()
        >>> net(torch.zeros(2, 1, 16, 16), torch.tensor(0.0)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        feature_dim: int = 64,
        t_dim: int = 64,
        num_classes: int = NUM_CLASSES,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.time_scale = float(time_scale)
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        blocks, c = [], 1
        for i, w in enumerate(widths):
            blocks.append(_Block(c, w, 1 if i == 0 else 2, t_dim))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.Linear(c, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.t_mlp(_time_embedding(t * self.time_scale, self.t_dim))
        h = x
        for block in self.blocks:
            h = block(h, temb)
        return nn.functional.silu(self.proj(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.head(self.features(x, t))


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


def train_classifier(
    cfg: ClassifierConfig | None = None, out: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train the noise-aware classifier on the train split, noised at all levels of the
    digits process; save ``classifier.safetensors`` + ``classifier_config.json`` in ``out``
    (default: the packaged ``assets/digits``). Returns accuracies on the held-out split.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

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
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    n = x_train.shape[0]
    perm, pos, run = torch.randperm(n, generator=gen), 0, None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train classifier", disable=not progress, mininterval=2.0)
    for _ in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x0 = _shift(x_train[idx], cfg.max_shift, gen)
        y = y_train[idx]
        b = len(y)
        t = torch.randint(0, n_t, (b,), generator=gen)
        n_low = int(round(cfg.low_noise_fraction * b))
        t[:n_low] = torch.randint(0, cfg.low_noise_t, (n_low,), generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1.0 - ac[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * torch.randn(x0.shape, generator=gen)
        loss = nn.functional.cross_entropy(net(xt, t.float()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        li = float(loss.detach())
        run = li if run is None else 0.98 * run + 0.02 * li
        bar.set_postfix(loss=f"{run:.4f}", refresh=False)
    wall = time.perf_counter() - start
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


def load_classifier_from(folder: str | Path) -> NoiseAwareClassifier:
    """Load a classifier saved by :func:`train_classifier` (safetensors, never pickle), in
    eval mode with gradients disabled on its parameters."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CLASSIFIER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found; train it with `diffusolve train digits-classifier`."
        )
    cfg = json.loads(cfg_path.read_text())
    net = NoiseAwareClassifier(
        tuple(cfg["widths"]),
        cfg["feature_dim"],
        cfg["t_dim"],
        cfg["num_classes"],
        cfg["time_scale"],
    )
    net.load_state_dict(load_file(str(folder / CLASSIFIER_FILE)))
    return net.eval().requires_grad_(False)
