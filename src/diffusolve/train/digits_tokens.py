"""Train and evaluate the bundled caption-conditioned digits model (``digits-tokens``).

Recipe (recorded in ``assets/digits-tokens/MODEL_CARD.md`` and ``train_info.json``):

- data: :func:`diffusolve.models.data.load_digits` (train split, 16x16, [-1, 1]); each image's
  caption is measured from the image itself (:func:`diffusolve.models.attributes.captions`:
  thickness, slant and size binned at the class terciles, then the digit word), e.g.
  ``"thick slanted-left small three"``;
- conditioning: a diffusers ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4 (and
  in the mid block) over the caption's tokens, embedded by a learned table
  (:class:`diffusolve.models.tokens.TokenEmbedding`, trained jointly). Each attribute word is
  dropped with probability ``word_dropout`` (so ``"three"`` and ``"thick three"`` are
  captions too) and the whole caption is replaced by the null caption ``""`` with
  probability ``caption_dropout`` (classifier-free guidance);
- process, prediction and optimiser as the ``digits`` model
  (:mod:`diffusolve.train.digits`): DDPM with linear betas 1e-4..0.02 and 1,000 steps,
  v-prediction, MSE, AdamW with warm-up and cosine decay, gradient clipping, EMA of the
  weights (UNet and embedding; the EMA weights are saved).

Deterministic for a seed and a thread count: one generator drives the data order, the
timesteps, the noise and both dropouts; ``torch.manual_seed`` fixes the initial weights.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.attributes import (
    ATTRIBUTE_WORDS,
    ATTRIBUTES,
    DIGIT_WORDS,
    attribute_bins,
    thresholds,
)
from ..models.data import load_digits
from ..models.tokens import DigitsTokenizer, TokenEmbedding, save_token_embedding
from .digits import _lr_factor, _target, build_scheduler, sample_digits

__all__ = [
    "ASSET_DIR",
    "OUTPUTS",
    "DigitsTokensConfig",
    "build_unet",
    "caption_batch",
    "train_digits_tokens",
    "heldout_captions",
    "evaluate_captions",
]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-tokens"
#: what a training run writes into its output folder
OUTPUTS = (
    "unet",
    "scheduler",
    "text_encoder",
    "tokenizer.json",
    "attribute_thresholds.json",
    "train_info.json",
)


@dataclass
class DigitsTokensConfig:
    """Hyper-parameters of :func:`train_digits_tokens` (the defaults are the shipped model's)."""

    steps: int = 1600
    seed: int = 0
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    word_dropout: float = 0.3
    grad_clip: float = 1.0
    prediction_type: str = "v_prediction"
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    )
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    embed_dim: int = 64
    attention_heads: int = 4
    max_length: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


def build_unet(cfg: DigitsTokensConfig):
    """The (untrained) ``UNet2DConditionModel`` of ``cfg``.

    diffusers' ``attention_head_dim`` of this class is, for historical reasons, the number
    of heads; ``cfg.attention_heads`` heads of ``channels / heads`` dimensions each.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        cross_attention_dim=cfg.embed_dim,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=32,
    )


def caption_batch(
    bins: Tensor,
    labels: Tensor,
    *,
    word_dropout: float = 0.0,
    caption_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Captions of a batch from attribute bins ``[B, 3]`` and digit labels ``[B]``, each
    attribute word dropped with probability ``word_dropout`` and each caption replaced by
    ``""`` with probability ``caption_dropout`` (random numbers from ``generator``).

    Example:
        >>> import torch
        >>> from diffusolve.train.digits_tokens import caption_batch
        >>> caption_batch(torch.tensor([[2, 0, 1]]), torch.tensor([3]))
        ['thick slanted-left medium three']
    """
    b = len(labels)
    keep = torch.rand(b, len(ATTRIBUTES), generator=generator) >= word_dropout
    null = torch.rand(b, generator=generator) < caption_dropout
    out = []
    for i in range(b):
        if bool(null[i]):
            out.append("")
            continue
        words = [
            ATTRIBUTE_WORDS[a][int(bins[i, j])]
            for j, a in enumerate(ATTRIBUTES)
            if bool(keep[i, j])
        ]
        out.append(" ".join(words + [DIGIT_WORDS[int(labels[i])]]))
    return out


def train_digits_tokens(
    cfg: DigitsTokensConfig | None = None,
    out: str | Path | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the caption-conditioned digits UNet and its token embedding; save them under
    ``out`` (default: the packaged asset folder).

    Writes ``out/unet/`` (diffusers ``config.json`` + ``diffusion_pytorch_model.safetensors``,
    EMA weights), ``out/scheduler/``, ``out/text_encoder/`` (``config.json`` +
    ``model.safetensors``, EMA weights), ``out/tokenizer.json``,
    ``out/attribute_thresholds.json`` (the class terciles the captions were cut at) and
    ``out/train_info.json``. Returns the training record.

    Example (a few steps only; the shipped model uses the defaults)::

        from diffusolve.train.digits_tokens import DigitsTokensConfig, train_digits_tokens
        info = train_digits_tokens(DigitsTokensConfig(steps=5, batch_size=8), out="/tmp/dt")
    """
    from tqdm.auto import tqdm

    cfg = cfg or DigitsTokensConfig()
    for name in ("caption_dropout", "word_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    out = Path(out) if out is not None else ASSET_DIR
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    x_train, y_train = load_digits("train")
    bins = attribute_bins(x_train, y_train)
    tokenizer = DigitsTokenizer(max_length=cfg.max_length)
    nets = torch.nn.ModuleDict(
        {
            "unet": build_unet(cfg),
            "encoder": TokenEmbedding(len(tokenizer), cfg.max_length, cfg.embed_dim),
        }
    )
    ema = copy.deepcopy(nets).requires_grad_(False)
    scheduler = build_scheduler(cfg)
    ac = scheduler.alphas_cumprod.to(torch.float32)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}

    opt = torch.optim.AdamW(nets.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    n = x_train.shape[0]
    perm = torch.randperm(n, generator=gen)
    pos = 0
    run_loss = None
    losses: list[float] = []
    start = time.perf_counter()
    nets.train()
    bar = tqdm(range(cfg.steps), desc="train digits-tokens", disable=not progress, mininterval=2.0)
    for step in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x0 = x_train[idx]
        caps = caption_batch(
            bins[idx],
            y_train[idx],
            word_dropout=cfg.word_dropout,
            caption_dropout=cfg.caption_dropout,
            generator=gen,
        )
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1.0 - ac[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        emb = nets["encoder"](tokenizer.encode(caps))
        pred = nets["unet"](xt, t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(pred, _target(x0, eps, a, s, cfg.prediction_type))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
            for pe, p in zip(ema.parameters(), nets.parameters(), strict=True):
                pe.lerp_(p, 1.0 - d)
        li = float(loss.detach())
        losses.append(li)
        run_loss = li if run_loss is None else 0.98 * run_loss + 0.02 * li
        bar.set_postfix(loss=f"{run_loss:.4f}", refresh=False)
    wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    ema["unet"].save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    save_token_embedding(ema["encoder"], out / "text_encoder")
    tokenizer.save(out / "tokenizer.json")
    cuts = thresholds()
    (out / "attribute_thresholds.json").write_text(
        json.dumps(
            {
                "definition": "per class, the train-split terciles (low, high) of each "
                "attribute (diffusolve.models.attributes.thresholds)",
                "attributes": list(ATTRIBUTES),
                "thresholds": {
                    DIGIT_WORDS[c]: {
                        a: [round(float(v), 6) for v in cuts[c, j]]
                        for j, a in enumerate(ATTRIBUTES)
                    }
                    for c in range(len(DIGIT_WORDS))
                },
            },
            indent=2,
        )
        + "\n"
    )
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


def heldout_captions(
    n: int = 200, seed: int = 0, *, attributes: bool = True
) -> tuple[list[str], Tensor, Tensor]:
    """Captions of ``n`` held-out digits (a seeded draw without replacement from the 359):
    ``(captions, labels [n], bins [n, 3])``. With ``attributes=False`` the captions are the
    digit words only (the bins are still the images' own, for a chance-level comparison)."""
    x, y = load_digits("heldout")
    if not 1 <= n <= len(y):
        raise ValueError(f"n must be in 1..{len(y)}, got {n}")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    labels, bins = y[idx], attribute_bins(x[idx], y[idx])
    if attributes:
        caps = caption_batch(bins, labels)
    else:
        caps = [DIGIT_WORDS[int(d)] for d in labels]
    return caps, labels, bins


def evaluate_captions(
    model: Any = None,
    n: int = 200,
    steps: int = 50,
    solver: str = "ddim",
    guidance: float | None = 2.0,
    seed: int = 0,
    *,
    attributes: bool = True,
) -> dict[str, Any]:
    """Sample from the captions of ``n`` held-out digits and check them.

    Args:
        model: a :class:`~diffusolve.models.bundled.TokenConditioned` (default: the bundled
            ``digits-tokens``).
        n: held-out captions (:func:`heldout_captions` with ``seed``).
        steps, solver: the sampler (the solver's natural ``steps``-step grid, a logSNR grid
            for DDIM; x0 clamped to [-1, 1]).
        guidance: classifier-free guidance scale (``None`` or 1: the conditional model),
            applied with :func:`diffusolve.guidance.classifier_free` on token ids.
        seed: the draw of captions and the prior noise.
        attributes: ``False`` samples from the digit words alone (the attribute accuracies
            then measure chance agreement: about 1/3 for a model that ignores them).

    Returns a dict with ``digit_accuracy`` (the bundled classifier's prediction at
    ``t = 0`` equals the caption's digit), ``attribute_accuracy`` (per attribute, the share
    of samples whose measured word, cut at the requested digit's terciles, is the requested
    one), ``all_attributes`` (all three match), ``fd_digits`` (against the held-out split)
    and the settings.
    """
    from ..guidance import classifier_free
    from ..models import fd_digits, load, load_classifier

    model = load("digits-tokens") if model is None else model
    caps, labels, want = heldout_captions(n, seed, attributes=attributes)
    ids = model.tokenizer.encode(caps)
    guided = model
    if guidance is not None and float(guidance) != 1.0:
        guided = classifier_free(model, guidance, null_cond=model.null_cond)
    start = time.perf_counter()
    xs = sample_digits(guided, ids, steps, solver, seed=seed)
    wall = time.perf_counter() - start
    with torch.no_grad():
        pred = load_classifier()(xs, torch.tensor(0.0)).argmax(1)
    got = attribute_bins(xs, labels)
    match = got == want
    return {
        "n": n,
        "steps": steps,
        "solver": solver,
        "guidance": guidance,
        "seed": seed,
        "captions": "heldout, full" if attributes else "heldout, digit word only",
        "digit_accuracy": round(float((pred == labels).float().mean()), 4),
        "attribute_accuracy": {
            a: round(float(match[:, j].float().mean()), 4) for j, a in enumerate(ATTRIBUTES)
        },
        "all_attributes": round(float(match.all(1).float().mean()), 4),
        "fd_digits": round(fd_digits(xs), 3),
        "sampling_wall_s": round(wall, 1),
    }


#: the model card's evaluations: (n, steps, guidance, captions with attributes)
CARD_RUNS = (
    (200, 50, 1.0, True),
    (200, 50, 2.0, True),
    (200, 50, 3.0, True),
    (200, 50, 5.0, True),
    (200, 50, 3.0, False),
    (200, 20, 3.0, True),
)
#: the configuration ``tests/test_digits_tokens.py`` re-runs (``test_check`` in metrics.json)
TEST_CHECK = (20, 10, 3.0, True)


def write_metrics(path: str | Path | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run :data:`CARD_RUNS` and :data:`TEST_CHECK` on the bundled model (ddim, seed 0) and
    write them as JSON to ``path`` (default: the asset folder's ``metrics.json``).

    ``python -m diffusolve.train.digits_tokens`` does this; the model card quotes the file.
    """
    from ..models import load

    model = load("digits-tokens")
    path = Path(path) if path is not None else ASSET_DIR / "metrics.json"
    runs = []
    for n, steps, w, attrs in CARD_RUNS:
        runs.append(evaluate_captions(model, n, steps, "ddim", w, 0, attributes=attrs))
        if progress:
            print(json.dumps(runs[-1]), flush=True)
    n, steps, w, attrs = TEST_CHECK
    check = evaluate_captions(model, n, steps, "ddim", w, 0, attributes=attrs)
    record = {
        "command": "OMP_NUM_THREADS=1 python -m diffusolve.train.digits_tokens",
        "definitions": {
            "digit_accuracy": "bundled digits classifier at t = 0 predicts the caption's digit",
            "attribute_accuracy": "measured tercile word (cut at the requested digit's train "
            "terciles) equals the requested word; chance is 1/3",
            "all_attributes": "all three attribute words match (chance 1/27)",
            "fd_digits": "against the 359 held-out digits; noise floor at n = 200 is 0.40 "
            "(mean of 5 seeds, assets/digits/metrics.json)",
            "captions": "full captions of n held-out digits (seeded draw), or their digit "
            "words only (control: attribute agreement by chance)",
        },
        "runs": runs,
        "test_check": check,
        "torch_threads": torch.get_num_threads(),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    write_metrics()
