"""Consistency distillation of the bundled digits model: ``digits-lcm`` and, as a LoRA,
``digits-lcm-lora``.

Latent Consistency Distillation (Luo, Tan, Huang, Li & Zhao 2023, Algorithm 1) in pixel
space, i.e. consistency distillation (Song, Dhariwal, Chen & Sutskever, ICML 2023, Alg. 2)
with LCM's skipping-step schedule and boundary scalings:

1. draw clean digits ``x0`` (train split) with labels ``y`` (replaced by the null class 10
   with probability 0.1, as in the teacher's training, so that classifier-free guidance
   keeps working), an index ``n`` uniform on ``0 .. 49`` and noise: ``t = k (n + 1) - 1``
   on the skipping grid ``{k i - 1}``, ``k = 1000 / 50 = 20``, and
   ``x_t = alpha_t x0 + sigma_t eps``;
2. teacher step: one DDIM step of the teacher (the bundled ``digits``, conditional) from
   ``t`` to ``t' = max(t - k, 0)``: ``x_t' = alpha_t' x0_T + sigma_t' (x_t - alpha_t x0_T) /
   sigma_t`` (the solver core's ``ddim`` step with per-sample times;
   ``tests/test_fewstep.py`` checks it against ``diffusolve.sample(..., "ddim")``);
3. loss ``d(f_theta(x_t, t), f_theta-(x_t', t'))`` with the student ``f_theta`` and the
   target ``f_theta-``, an EMA of the student (decay ``mu = 0.95``, LCM's value), no
   gradient through the target;
4. ``f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)`` with LCM's scalings
   (``sigma_data = 0.5``, ``s = 10 t``; :mod:`diffusolve.models.consistency`), so
   ``f(x, 0) = x`` exactly: at ``n = 0`` the target is the teacher's DDIM estimate at
   ``t' = 0`` itself, the boundary condition that anchors the chain.

Distance: the pseudo-Huber metric ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054
sqrt(d)`` (d = 256 pixels), the choice of improved consistency training (Song & Dhariwal
2023, "Improved Techniques for Training Consistency Models") for pixel-space models, where
no LPIPS exists for digits: it behaves like L2 for small errors and like L1 for the large
errors of a few samples, which keeps their gradients from dominating a small batch.

The students start from the teacher's weights. ``lora=True`` trains only a rank-``r`` LoRA
(peft) on the UNet's attention projections, ResNet and resampling convolutions and time
projections (Luo et al. 2023, LCM-LoRA); only the adapter is saved and
:func:`diffusolve.models.load` merges it into ``digits``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.consistency import BoundaryScalings
from ..models.data import NUM_CLASSES, load_digits
from ..models.fewstep import FewStepRecipe, skipping_timesteps
from .fewstep import DDPMScalars, base_unet, ema_update, lr_factor, unet_x0

__all__ = [
    "LCMConfig",
    "train_lcm",
    "ddim_step",
    "pseudo_huber",
    "cd_loss",
    "consistency_fn",
    "teacher_ddim_fn",
    "outputs",
    "ASSET_DIRS",
]

NULL_CLASS = NUM_CLASSES
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
ASSET_DIRS = {False: _ASSETS / "digits-lcm", True: _ASSETS / "digits-lcm-lora"}


def outputs(lora: bool) -> tuple[str, ...]:
    """The files/folders ``train_lcm`` writes (what ``--force`` guards)."""
    weights = ("lora",) if lora else ("unet", "scheduler")
    return weights + ("consistency.json", "fewstep.json", "train_info.json")


@dataclass
class LCMConfig:
    """Hyper-parameters of :func:`train_lcm` (defaults: the shipped ``digits-lcm``)."""

    steps: int = 1000
    seed: int = 0
    batch_size: int = 64
    lora: bool = False
    rank: int = 8
    lr: float = 1e-4
    lora_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    target_decay: float = 0.95
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    origin_steps: int = 50
    loss: str = "huber"
    huber_c: float = 0.00054 * 16.0  # 0.00054 sqrt(d), d = 16 * 16
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    #: continue from an earlier full ``digits-lcm`` folder (student and target start from its
    #: weights; the teacher stays ``digits``)
    init: str | None = None

    def __post_init__(self) -> None:
        if self.init is not None and self.lora:
            raise ValueError("init continues a full distillation; it does not apply to lora")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss must be 'huber' or 'l2', got {self.loss!r}")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if 1000 % self.origin_steps:
            raise ValueError(f"origin_steps must divide 1000, got {self.origin_steps}")


def ddim_step(x: Tensor, x0: Tensor, a: Tensor, s: Tensor, a1: Tensor, s1: Tensor) -> Tensor:
    """The deterministic DDIM step ``x_t -> x_t'`` with frozen ``x0`` (Song et al. 2021):
    ``a1 x0 + s1 (x - a x0) / s`` (scalars broadcast over ``x``)."""
    return a1 * x0 + s1 * (x - a * x0) / s


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Mean over the batch of ``sqrt(||a_i - b_i||^2 + c^2) - c`` (Song & Dhariwal 2023)."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    return (torch.sqrt(sq + c * c) - c).mean()


def cd_loss(
    student: Callable[[Tensor, Tensor], Tensor],
    target: Callable[[Tensor, Tensor], Tensor],
    teacher_step: Callable[[Tensor, Tensor, Tensor], Tensor],
    x_t: Tensor,
    t: Tensor,
    t_prev: Tensor,
    loss: str = "huber",
    c: float = 0.00864,
) -> Tensor:
    """The consistency-distillation loss ``d(f(x_t, t), f^-(teacher(x_t, t -> t'), t'))``.

    ``student(x, t)`` and ``target(x, t)`` are consistency functions, ``teacher_step(x, t,
    t')`` one solver step of the teacher's probability-flow ODE; ``t``, ``t_prev``: ``[B]``.
    The target side runs without gradients. ``loss``: ``"huber"`` (pseudo-Huber with
    ``c``) or ``"l2"`` (mean squared error).
    """
    with torch.no_grad():
        x_prev = teacher_step(x_t, t, t_prev)
        goal = target(x_prev, t_prev)
    pred = student(x_t, t)
    if loss == "l2":
        return (pred - goal).pow(2).mean()
    return pseudo_huber(pred, goal, c)


def consistency_fn(
    net: Any, y: Tensor, scal: DDPMScalars, bound: BoundaryScalings
) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x, t) = c_skip(t) x + c_out(t) x0_net(x, t, y)`` of a v-prediction UNet (the
    function :class:`~diffusolve.models.consistency.ConsistencyBoundary` computes)."""

    def f(x: Tensor, t: Tensor) -> Tensor:
        a, s = scal(t, x.ndim)
        return bound.apply(x, t, unet_x0(net, x, t, y, a, s))

    return f


def teacher_ddim_fn(teacher: Any, y: Tensor, scal: DDPMScalars) -> Callable[..., Tensor]:
    """One DDIM step ``x_t -> x_t'`` of a v-prediction teacher UNet, per-sample times."""

    def step(x: Tensor, t: Tensor, t1: Tensor) -> Tensor:
        a, s = scal(t, x.ndim)
        a1, s1 = scal(t1, x.ndim)
        return ddim_step(x, unet_x0(teacher, x, t, y, a, s), a, s, a1, s1)

    return step


def train_lcm(
    cfg: LCMConfig | None = None, out: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Distil the bundled digits model into a consistency model and save it under ``out``.

    Writes ``out/unet`` + ``out/scheduler`` (full) or ``out/lora`` (adapter only, with
    ``lora=True``), ``consistency.json`` (the boundary scalings), ``fewstep.json`` (the
    ``lcm`` sampling recipe) and ``train_info.json``; returns the training record.

    Example (a few steps only)::

        from diffusolve.train.lcm import LCMConfig, train_lcm
        info = train_lcm(LCMConfig(steps=3, batch_size=4), out="/tmp/lcm")
    """
    from tqdm.auto import tqdm

    from ..models.lora import add_lora, lora_config, save_lora

    cfg = cfg or LCMConfig()
    out = Path(out) if out is not None else ASSET_DIRS[cfg.lora]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_digits("train")
    scal = DDPMScalars(dtype=torch.float32)
    bound = BoundaryScalings(cfg.sigma_data, cfg.timestep_scaling)
    k = 1000 // cfg.origin_steps

    teacher = base_unet().requires_grad_(False).eval()
    student = base_unet() if cfg.init is None else _unet_from(cfg.init)
    lcfg = None
    if cfg.lora:
        lcfg = lora_config(cfg.rank)
        add_lora(student, lcfg)
    target = copy.deepcopy(student).requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    lr = cfg.lora_lr if cfg.lora else cfg.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg.steps, cfg.warmup))

    n = x_train.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train lcm", disable=not progress, mininterval=5.0)
    run = None
    for _ in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(len(y), generator=gen) < cfg.label_dropout] = NULL_CLASS
        i = torch.randint(0, cfg.origin_steps, (len(y),), generator=gen)
        t = k * (i + 1) - 1
        t_prev = (t - k).clamp(min=0)
        eps = torch.randn(x0.shape, generator=gen)
        a, s = scal(t, 4)
        x_t = a * x0 + s * eps
        loss = cd_loss(
            consistency_fn(student, y, scal, bound),
            consistency_fn(target, y, scal, bound),
            teacher_ddim_fn(teacher, y, scal),
            x_t,
            t,
            t_prev,
            cfg.loss,
            cfg.huber_c,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema_update(target, student, cfg.target_decay)
        li = float(loss.detach())
        losses.append(li)
        run = li if run is None else 0.98 * run + 0.02 * li
        bar.set_postfix(loss=f"{run:.4f}", refresh=False)
    wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora:
        save_lora(target, lcfg, out / "lora", base="digits")
    else:
        from .digits import DigitsConfig, build_scheduler

        target.save_pretrained(out / "unet", safe_serialization=True)
        build_scheduler(DigitsConfig()).save_pretrained(out / "scheduler")
    bound.save(out)
    recipe_for(out.name, "lcm").save(out)
    tail = losses[-100:]
    info = {
        "config": asdict(cfg),
        "method": "consistency distillation (LCM), pixel space, DDIM teacher",
        "trainable_parameters": sum(p.numel() for p in params),
        "train_images": n,
        "wall_time_s": round(wall, 1),
        "s_per_step": round(wall / max(1, cfg.steps), 3),
        "loss_first_100": round(sum(losses[:100]) / len(losses[:100]), 5),
        "loss_last_100": round(sum(tail) / len(tail), 5),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "saved": f"target network (EMA of the student, decay {cfg.target_decay:.2f})",
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _unet_from(folder: str | Path) -> Any:
    """A trainable copy of the UNet of a full ``digits-lcm`` folder."""
    from diffusers import UNet2DModel

    path = Path(folder).expanduser() / "unet"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init {folder}: no unet/ folder there (a full digits-lcm)")
    return UNet2DModel.from_pretrained(str(path)).requires_grad_(True).train()


def recipe_for(name: str, solver: str, steps: tuple[int, ...] = (1, 2, 4)) -> FewStepRecipe:
    """The ``fewstep.json`` recipe of a model trained here: ``solver`` between network calls
    at the skipping-grid times, final denoise, one evaluation per step."""
    return FewStepRecipe(
        name=name,
        base="digits",
        solver=solver,
        grid_kind=None,
        final="denoise",
        steps=steps,
        nfe_per_step=1,
        timesteps=tuple((n, tuple(skipping_timesteps(n))) for n in steps),
    )
