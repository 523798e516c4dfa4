"""MMD fine-tuning of the bundled digits model for a fixed small NFE: ``digits-mmd``.

Aiello, Valsesia & Magli, "Fast Inference in Denoising Diffusion Models via MMD
Finetuning" (2023, arXiv 2301.07969): fine-tune the denoiser so that the samples of a fixed
``K``-step DDIM sampler match the data in maximum mean discrepancy,

    L(theta) = MMD^2_u( phi(DDIM_K(z; theta)), phi(x) ),

with the full chain differentiated (each network call gradient-checkpointed), the KID
kernel ``k(a, b) = (a.b / d + 1)^3`` on features ``phi``, the unbiased estimator and
gradient-norm clipping at 0.5 (the paper's defaults).

Here: ``K = 2`` network calls at ``t = 999`` and ``t = 499`` (the uniform skip T/K; the
second call's x0 estimate is the sample, i.e. DDIM's last step to ``alpha = 1``), x0
clamped to [-1, 1] at each call as the shipped sampler does; generated and real (train
split) batches share their class labels (generation uses the null class with probability
0.1, as in the teacher's training, so classifier-free guidance keeps working). Features
``phi``: the 64-d penultimate (pooled) features of the shipped clean *guide* classifier
(:func:`diffusolve.models.clean_classifier.load_clean_classifier`), never the FD-digits
feature network (that would train on the metric) nor the judge classifier.

Richer kernels (options, off by default): the loss is a weighted sum of per-feature-set
MMDs, ``L = sum_k w_k L_k`` with each ``L_k`` the class-conditional loss
(:func:`class_mmd2`) on one feature set, every set divided by its RMS over the train split:
``guide_weight`` on the penultimate features above, ``pixel_weight`` on the 256 pixels
themselves and ``stage_weight`` on the pooled outputs of the guide's two lower stages
(16-d at 16x16 and 32-d at 8x8, one MMD each), a multi-scale kernel. A sum of kernels is
a kernel, so ``L`` is the MMD^2 of the concatenated features under the summed kernel (MMD^2
is linear in the kernel), still unbiased per group. The bundled ``digits-lcm-mmd`` is a
second stage with all three weights 1 (its model card has both commands).

``init`` (``diffusolve train digits-mmd --init digits-lcm``, the bundled ``digits-lcm-mmd``)
fine-tunes a consistency model instead: the network keeps its boundary scalings
(:mod:`diffusolve.models.consistency`) and the differentiated sampler is its own multistep
consistency sampler (Song et al. 2023, Alg. 1; the ``lcm`` recipe): ``x0 = f(x_T, 999)``,
then ``x = alpha_499 x0 + sigma_499 z`` with fresh noise ``z`` (drawn outside the graph, so
the chain is reparameterised and the gradient flows through ``x0`` into both calls), and the
sample is ``f(x, 499)``. The stochastic re-noising is kept because it is the sampler the
model is shipped with: tuning for the deterministic DDIM chain would tune a sampler that is
not used.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..models.consistency import BoundaryScalings
from ..models.data import NUM_CLASSES, load_digits
from ..models.fewstep import skipping_timesteps
from .fewstep import DDPMScalars, base_unet, ema_update, lr_factor, unet_x0

__all__ = [
    "MMDConfig",
    "train_mmd",
    "poly_kernel",
    "mmd2_unbiased",
    "class_mmd2",
    "guide_features",
    "guide_stage_features",
    "feature_sets",
    "weighted_mmd2",
    "ddim_chain",
    "lcm_chain",
    "outputs",
    "OUTPUTS",
    "ASSET_DIR",
]

NULL_CLASS = NUM_CLASSES
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-mmd"
OUTPUTS = ("unet", "scheduler", "fewstep.json", "train_info.json")
#: the default output of ``--init`` (a consistency model fine-tuned with MMD)
INIT_ASSET_DIR = ASSET_DIR.parent / "digits-lcm-mmd"


def outputs(init: str | None = None) -> tuple[str, ...]:
    """The files/folders ``train_mmd`` writes (what ``--force`` guards); ``init`` adds the
    boundary scalings ``consistency.json``."""
    return OUTPUTS + (("consistency.json",) if init is not None else ())


@dataclass
class MMDConfig:
    """Hyper-parameters of :func:`train_mmd` (defaults: the shipped ``digits-mmd``)."""

    steps: int = 250
    seed: int = 0
    batch_size: int = 60  # generated and real samples per step, batch_size / 10 per class
    nfe: int = 2
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    label_dropout: float = 0.1
    ema_decay: float = 0.99
    degree: int = 3
    checkpointing: bool = True
    #: fine-tune a consistency model (a bundled name such as ``"digits-lcm"`` or a folder
    #: with ``unet/`` and ``consistency.json``) through its own ``lcm`` sampler instead of
    #: the teacher ``digits`` through DDIM
    init: str | None = None
    #: weight of the MMD on the guide classifier's 64-d penultimate features
    guide_weight: float = 1.0
    #: weight of the MMD on the 256 pixels / their RMS (0: no pixel term)
    pixel_weight: float = 0.0
    #: weight of each MMD on the pooled outputs of the guide's first two stages (16-d and
    #: 32-d, each / its RMS; 0: none)
    stage_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("guide_weight", "pixel_weight", "stage_weight"):
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w}")
        if not self.weights():
            raise ValueError(
                "guide_weight, pixel_weight and stage_weight are all 0: the loss would be "
                "empty; give at least one feature set a positive weight"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.nfe < 1:
            raise ValueError(f"nfe must be at least 1, got {self.nfe}")
        if self.batch_size < 2 * NUM_CLASSES:
            raise ValueError(
                f"batch_size must be at least {2 * NUM_CLASSES} (two samples per class for the "
                f"unbiased MMD), got {self.batch_size}"
            )

    def weights(self) -> dict[str, float]:
        """The positive feature-set weights, in loss order (``guide``, ``pixel``,
        ``stage1``, ``stage2``); the default is ``{"guide": 1.0}``, the shipped loss."""
        w = {"guide": self.guide_weight, "pixel": self.pixel_weight}
        w |= {"stage1": self.stage_weight, "stage2": self.stage_weight}
        return {k: float(v) for k, v in w.items() if v > 0}


def poly_kernel(a: Tensor, b: Tensor, degree: int = 3) -> Tensor:
    """The KID kernel ``(a_i . b_j / d + 1)^degree`` (Binkowski et al. 2018), ``[m, n]``."""
    return (a @ b.T / a.shape[1] + 1.0) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3) -> Tensor:
    """The unbiased estimate of MMD^2 between samples ``x`` ``[m, d]`` and ``y`` ``[n, d]``:

        1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
        - 2/(mn) sum_{i, j} k(x_i, y_j)

    (Gretton et al. 2012, Lemma 6), with the polynomial kernel of ``degree``. Zero-mean
    when ``x`` and ``y`` come from one distribution; may be negative.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(50, 4, generator=g, dtype=torch.float64)
        >>> bool(mmd2_unbiased(x, x + 3.0) > 0.5)
        True
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples each, got {m} and {n}")
    kxx, kyy, kxy = poly_kernel(x, x, degree), poly_kernel(y, y, degree), poly_kernel(x, y, degree)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2.0 * kxy.mean()


def class_mmd2(f_gen: Tensor, labels: Tensor, f_real: list, degree: int = 3) -> Tensor:
    """The class-conditional loss: the mean over groups ``g`` of ``MMD^2_u(f_gen[labels ==
    g], f_real[g])``, groups in order of ``labels.unique()`` (classes, then the null class
    against real images of any class).

    Within a group the generated and the real samples are independent, so every term is
    unbiased; one MMD over a batch whose generated half copies the real half's labels is
    not (its cross term holds the same-class pairs ``(i, i)`` that the within-set terms
    exclude, which biases it downward by ``O(1 / batch)``).
    """
    groups = labels.unique()
    if len(groups) != len(f_real):
        raise ValueError(f"{len(groups)} label groups but {len(f_real)} real batches")
    terms = [
        mmd2_unbiased(f_gen[labels == g], fr, degree) for g, fr in zip(groups, f_real, strict=True)
    ]
    return torch.stack(terms).mean()


def guide_features(net: torch.nn.Module, x: Tensor) -> Tensor:
    """The clean guide classifier's pooled penultimate features ``[B, 4 w]``."""
    return net.stages(net.stem(x)).mean(dim=(2, 3))


def guide_stage_features(net: torch.nn.Module, x: Tensor) -> list[Tensor]:
    """The pooled output of each stage of the clean guide classifier, ``[[B, w], [B, 2 w],
    [B, 4 w]]`` (the last is :func:`guide_features`), from one forward pass."""
    h = net.stem(x)
    pooled = []
    for stage in net.stages:
        h = stage(h)
        pooled.append(h.mean(dim=(2, 3)))
    return pooled


def feature_sets(net: torch.nn.Module, x: Tensor, names: Any) -> dict[str, Tensor]:
    """The raw (unscaled) feature sets ``names`` of images ``x`` ``[B, 1, H, W]``:
    ``guide`` (pooled penultimate features of the guide ``net``), ``pixel`` (the flattened
    image), ``stage1`` / ``stage2`` (pooled outputs of the guide's first two stages); the
    guide is run once for all of its sets.

    Example:
        >>> from diffusolve.models.clean_classifier import CleanClassifier
        >>> f = feature_sets(CleanClassifier(width=4), torch.zeros(3, 1, 16, 16), ["pixel", "stage2"])
        >>> {k: tuple(v.shape) for k, v in f.items()}
        {'pixel': (3, 256), 'stage2': (3, 8)}
    """
    names = list(names)
    unknown = set(names) - {"guide", "pixel", "stage1", "stage2"}
    if unknown:
        raise ValueError(
            f"unknown feature sets {sorted(unknown)}; use guide, pixel, stage1, stage2"
        )
    out: dict[str, Tensor] = {}
    stages = guide_stage_features(net, x) if {"guide", "stage1", "stage2"} & set(names) else None
    for name in names:
        if name == "pixel":
            out[name] = x.flatten(1)
        elif name == "guide":
            out[name] = stages[2]
        else:
            out[name] = stages[int(name[-1]) - 1]
    return out


def weighted_mmd2(
    f_gen: dict[str, Tensor],
    labels: Tensor,
    f_real: dict[str, list],
    weights: dict[str, float],
    degree: int = 3,
) -> Tensor:
    """``sum_k weights[k] * class_mmd2(f_gen[k], labels, f_real[k])`` over the feature sets
    ``k`` of ``weights`` in its order (the first term alone, not ``0 + w * term``, so one set
    of weight 1 is exactly :func:`class_mmd2`)."""
    total = None
    for k, w in weights.items():
        term = class_mmd2(f_gen[k], labels, f_real[k], degree)
        term = term if w == 1.0 else w * term
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weights is empty: give at least one feature set a weight")
    return total


def ddim_chain(
    unet: Any,
    x: Tensor,
    y: Tensor,
    times: list,
    scal: DDPMScalars,
    checkpointing: bool = True,
) -> Tensor:
    """The differentiable DDIM sample from ``x`` at ``times[0]`` with one network call per
    time (x0 clamped to [-1, 1]); the last call's x0 estimate is returned."""

    def x0_of(x: Tensor, t: Tensor) -> Tensor:
        a, s = scal(t, x.ndim)
        return unet_x0(unet, x, t, y, a, s).clamp(-1.0, 1.0)

    for i, ti in enumerate(times):
        t = torch.full((x.shape[0],), int(ti), dtype=torch.long)
        x0 = checkpoint(x0_of, x, t, use_reentrant=False) if checkpointing else x0_of(x, t)
        if i == len(times) - 1:
            return x0
        a, s = scal(t, x.ndim)
        a1, s1 = scal(torch.full_like(t, int(times[i + 1])), x.ndim)
        x = a1 * x0 + s1 * (x - a * x0) / s
    raise ValueError("times must not be empty")


def lcm_chain(
    unet: Any,
    x: Tensor,
    y: Tensor,
    times: list,
    scal: DDPMScalars,
    bound: BoundaryScalings,
    noise: list,
    checkpointing: bool = True,
) -> Tensor:
    """The differentiable multistep consistency sample from ``x`` at ``times[0]``: one call
    ``f(x, t) = c_skip(t) x + c_out(t) x0_net(x, t)`` per time (clamped to [-1, 1]), between
    calls ``x = alpha_t' f + sigma_t' z`` with ``z = noise[i]`` (the ``lcm`` recipe's
    re-noising, reparameterised); the last call's output is returned. ``noise`` holds
    ``len(times) - 1`` tensors shaped like ``x``.
    """
    from .lcm import consistency_fn

    if len(noise) != len(times) - 1:
        raise ValueError(
            f"{len(times)} calls need {len(times) - 1} noise tensors, got {len(noise)}"
        )
    f = consistency_fn(unet, y, scal, bound)

    def x0_of(x: Tensor, t: Tensor) -> Tensor:
        return f(x, t).clamp(-1.0, 1.0)

    for i, ti in enumerate(times):
        t = torch.full((x.shape[0],), int(ti), dtype=torch.long)
        x0 = checkpoint(x0_of, x, t, use_reentrant=False) if checkpointing else x0_of(x, t)
        if i == len(times) - 1:
            return x0
        a1, s1 = scal(torch.full_like(t, int(times[i + 1])), x.ndim)
        x = a1 * x0 + s1 * noise[i]
    raise ValueError("times must not be empty")


_SET_NOTES = {
    "guide": "clean guide classifier, 64-d pooled penultimate features",
    "pixel": "the 256 pixels",
    "stage1": "clean guide classifier, 16-d pooled output of stage 1 (16x16)",
    "stage2": "clean guide classifier, 32-d pooled output of stage 2 (8x8)",
}
#: the ``features`` entry of ``train_info.json`` for the default (guide-only) loss
_FEATURES_NOTE = _SET_NOTES["guide"] + " / their RMS on the train split"


def _init_model(init: str) -> tuple[Any, BoundaryScalings, Path]:
    """The trainable UNet and boundary scalings of a consistency-model folder or name."""
    from diffusers import UNet2DModel

    from ..models.bundled import BUNDLED, asset_dir

    folder = asset_dir(init) if init in BUNDLED else Path(init).expanduser()
    bound = BoundaryScalings.read(folder)
    if bound is None or not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"--init {init}: {folder} needs unet/ and consistency.json (a full consistency "
            "model such as digits-lcm; a LoRA folder is not supported)"
        )
    unet = UNet2DModel.from_pretrained(str(folder / "unet")).requires_grad_(True).train()
    return unet, bound, folder


def train_mmd(
    cfg: MMDConfig | None = None, out: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """MMD-fine-tune the bundled digits model for ``cfg.nfe`` DDIM calls; save under ``out``.

    Writes ``out/unet``, ``out/scheduler``, ``fewstep.json`` (the ``ddim`` recipe) and
    ``train_info.json``; returns the training record. The saved weights are an EMA of the
    fine-tuned ones (``ema_decay``). With ``cfg.init`` the consistency model there is tuned
    through its ``lcm`` sampler instead, and ``consistency.json`` and the ``lcm`` recipe are
    written.

    Example (a few steps only)::

        from diffusolve.train.mmd import MMDConfig, train_mmd
        info = train_mmd(MMDConfig(steps=3, batch_size=4), out="/tmp/mmd")
    """
    import copy

    from tqdm.auto import tqdm

    from ..models.clean_classifier import load_clean_classifier
    from .digits import DigitsConfig, build_scheduler
    from .lcm import recipe_for

    cfg = cfg or MMDConfig()
    out = Path(out) if out is not None else (INIT_ASSET_DIR if cfg.init else ASSET_DIR)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_digits("train")
    scal = DDPMScalars(dtype=torch.float32)
    times = skipping_timesteps(cfg.nfe)
    guide = load_clean_classifier("digits")
    bound = None
    if cfg.init is not None:
        unet, bound, _ = _init_model(cfg.init)
    else:
        unet = base_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg.steps, cfg.warmup))
    sigma_T = float(scal(torch.tensor([int(times[0])]))[1])

    n = x_train.shape[0]
    m = cfg.batch_size // NUM_CLASSES
    by_class = [torch.nonzero(y_train == c).flatten() for c in range(NUM_CLASSES)]
    weights = cfg.weights()
    with torch.no_grad():
        scale = {
            k: float(f.pow(2).mean().sqrt())
            for k, f in feature_sets(guide, x_train, weights).items()
        }
    n_null = max(2, round(cfg.label_dropout * cfg.batch_size)) if cfg.label_dropout > 0 else 0
    labels = torch.cat(
        [torch.arange(NUM_CLASSES).repeat_interleave(m), torch.full((n_null,), NULL_CLASS)]
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train mmd", disable=not progress, mininterval=5.0)
    run = None
    for step in bar:
        real = [ic[torch.randperm(len(ic), generator=gen)[:m]] for ic in by_class]
        if n_null:
            real.append(torch.randperm(n, generator=gen)[:n_null])
        shape = (len(labels), *x_train.shape[1:])
        z = sigma_T * torch.randn(shape, generator=gen)
        if bound is None:
            x_gen = ddim_chain(unet, z, labels, times, scal, cfg.checkpointing)
        else:
            noise = [torch.randn(shape, generator=gen) for _ in times[1:]]
            x_gen = lcm_chain(unet, z, labels, times, scal, bound, noise, cfg.checkpointing)
        f_gen = {k: f / scale[k] for k, f in feature_sets(guide, x_gen, weights).items()}
        with torch.no_grad():
            per_batch = [feature_sets(guide, x_train[i], weights) for i in real]
            f_real = {k: [f[k] / scale[k] for f in per_batch] for k in weights}
        loss = weighted_mmd2(f_gen, labels, f_real, weights, cfg.degree)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, unet, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        li = float(loss.detach())
        losses.append(li)
        run = li if run is None else 0.95 * run + 0.05 * li
        bar.set_postfix(mmd2=f"{run:.4f}", refresh=False)
    wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    build_scheduler(DigitsConfig()).save_pretrained(out / "scheduler")
    recipe_for(out.name, "ddim" if bound is None else "lcm").save(out)
    if bound is not None:
        bound.save(out)
    k = max(1, min(50, len(losses) // 4))
    chain = "DDIM chain" if bound is None else f"lcm chain (init {cfg.init})"
    info = {
        "config": asdict(cfg),
        "method": f"MMD fine-tuning (KID kernel, unbiased MMD^2) of a differentiable {chain}",
        "features": _FEATURES_NOTE
        if weights == {"guide": 1.0}
        else {
            k: f"{_SET_NOTES[k]}, / its RMS on the train split ({scale[k]:.4g})" for k in weights
        },
        "loss": "mean over the 10 classes and the null group of the unbiased MMD^2"
        + ("" if weights == {"guide": 1.0} else f", weighted sum over the feature sets {weights}"),
        ("ddim_times" if bound is None else "lcm_times"): times,
        "trainable_parameters": sum(p.numel() for p in params),
        "train_images": n,
        "wall_time_s": round(wall, 1),
        "s_per_step": round(wall / max(1, cfg.steps), 3),
        f"mmd2_first_{k}": round(sum(losses[:k]) / k, 5),
        f"mmd2_last_{k}": round(sum(losses[-k:]) / k, 5),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "saved": f"EMA of the fine-tuned weights (decay {cfg.ema_decay})",
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
