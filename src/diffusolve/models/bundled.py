"""Small models shipped inside the package, loaded offline.

``digits``: a class-conditional diffusers ``UNet2DModel`` (1.1M parameters) trained here on
scikit-learn's digits (16x16, one channel, [-1, 1]); DDPM process with linear betas and
1,000 steps, v-prediction; classes 0-9 plus the null class 10 for classifier-free guidance.
See ``assets/digits/MODEL_CARD.md``.

``digits-tokens``: the same data and process with captions instead of labels: a diffusers
``UNet2DConditionModel`` with cross-attention (at 8x8 and 4x4) over a short token sequence
from a learned embedding table (:class:`~diffusolve.models.tokens.TokenEmbedding`, no external
text encoder), trained on captions measured from each image, e.g.
``"thick slanted-left small three"`` (:mod:`diffusolve.models.attributes`). Wrapped in
:class:`TokenConditioned`. See ``assets/digits-tokens/MODEL_CARD.md``.

``digits-lcm``, ``digits-lcm-lora``, ``digits-mmd``, ``digits-lcm-mmd``: few-step models
trained from ``digits`` (consistency distillation, full and as a LoRA merged into ``digits``
on loading; MMD fine-tuning of ``digits`` and of ``digits-lcm``), each with a ``fewstep.json``
sampling recipe; see
:mod:`diffusolve.models.fewstep`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Denoiser

__all__ = [
    "BUNDLED",
    "NULL_CLASS",
    "asset_dir",
    "load",
    "load_classifier",
    "LabelConditioned",
    "TokenConditioned",
]

BUNDLED = (
    "digits",
    "digits-tokens",
    "digits-lcm",
    "digits-lcm-lora",
    "digits-mmd",
    "digits-lcm-mmd",
)
#: the ``diffusolve train`` arguments that rebuild a bundled model, in order (its
#: MODEL_CARD.md gives the full commands with seeds and output folders); ``digits-lcm-mmd``
#: is two MMD stages over ``digits-lcm``
TRAIN_STAGES: dict[str, tuple[str, ...]] = {
    "digits-lcm-lora": ("digits-lcm --lora",),
    "digits-lcm-mmd": (
        "digits-mmd --init digits-lcm --lr 2e-5 --steps 300 --out STAGE1",
        "digits-mmd --init STAGE1 --lr 2e-5 --steps 800 --batch-size 120 --pixel-weight 1 "
        "--stage-weight 1",
    ),
}


def train_hint(name: str) -> str:
    """The ``diffusolve train`` command(s) that rebuild bundled model ``name``.

    Example:
        >>> train_hint("digits-lcm-lora")
        '`diffusolve train digits-lcm --lora`'
    """
    stages = TRAIN_STAGES.get(name, (name,))
    return ", then ".join(f"`diffusolve train {s}`" for s in stages)


#: bundled models that ship a noise-aware classifier
_CLASSIFIERS = ("digits",)
NULL_CLASS = 10
_NUM_LABELS = 11
#: a LoRA folder: the adapter (peft format) over the base model named in its config
_LORA_CONFIG = "lora/adapter_config.json"


def asset_dir(name: str = "digits") -> Path:
    """The packaged folder of bundled model ``name``."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; available: {BUNDLED}")
    path = Path(__file__).resolve().parent.parent / "assets" / name
    if not (path / "unet" / "config.json").is_file() and not (path / _LORA_CONFIG).is_file():
        raise FileNotFoundError(f"{path} has no weights; retrain them with {train_hint(name)}.")
    return path


class LabelConditioned(Denoiser):
    """Turns integer labels into the class-label tensor the UNet expects.

    ``cond`` may be an int (one label for the batch), a sequence of ints or an integer
    tensor of shape ``[B]`` or ``[1]``; ``None`` means the null class (unconditional).
    ``num_labels`` counts the null class; the real classes are ``0 .. num_classes - 1``.
    """

    def __init__(self, model: Any, num_labels: int = _NUM_LABELS, null: int = NULL_CLASS) -> None:
        self.model = model
        self.process = model.process
        self.num_labels = int(num_labels)
        self.null = int(null)

    @property
    def num_classes(self) -> int:
        """The number of real classes (labels other than the null class)."""
        return self.num_labels - 1

    def labels(self, cond: Any, batch: int, device: torch.device) -> Tensor:
        if cond is None:
            cond = self.null
        y = torch.as_tensor(cond, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"class labels must be integers, got dtype {y.dtype}")
        y = y.to(torch.long).reshape(-1)
        if y.numel() == 1:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"got {y.numel()} labels for a batch of {batch}")
        if bool(((y < 0) | (y >= self.num_labels)).any()):
            raise ValueError(
                f"labels must be in 0..{self.num_labels - 1} ({self.null} = unconditional)"
            )
        return y

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.model(x, t, self.labels(cond, x.shape[0], x.device))

    def __repr__(self) -> str:
        return f"LabelConditioned({self.model!r})"


class TokenConditioned(Denoiser):
    """Turns captions into the token embeddings a cross-attention UNet expects.

    ``cond`` may be

    - ``None``: the null (empty) caption, the unconditional input;
    - a caption ``str`` for the whole batch (``"thick slanted-left three"``, ``""`` = null);
    - a list of captions, one per sample (or one);
    - token ids, an integer tensor ``[B, L]`` or ``[1, L]`` (``model.tokenizer.encode``);
    - embedded tokens, a float tensor ``[B, L, D]`` or ``[1, L, D]`` (what :meth:`embed`
      returns), passed to the UNet as they are, so that they can be optimised (null-text
      inversion) with gradients flowing through the network.

    For one caption all these forms give the same output. ``model.unet`` is the diffusers
    ``UNet2DConditionModel`` (install attention processors with ``unet.set_attn_processor``).

    Classifier-free guidance: :func:`diffusolve.guidance.classifier_free` concatenates
    tensors only, so give it tensors: ``classifier_free(model, w,
    null_cond=model.null_cond)`` with token ids as ``cond`` (``model.tokenizer.encode(...)``),
    or ``null_cond=model.embed(None, 1)`` with embeddings as ``cond``.
    ``diffusolve.load("digits-tokens", guidance=w)`` takes every form above (it guides the
    inner network on embeddings and puts this wrapper outside).

    Args:
        model: a denoiser whose ``cond`` is embedded tokens ``[B, L, D]`` (the diffusers
            adapter of the UNet, or a wrapper of it with the same signature).
        tokenizer: the :class:`~diffusolve.models.tokens.DigitsTokenizer`.
        encoder: the :class:`~diffusolve.models.tokens.TokenEmbedding` (ids -> embeddings).

    Example:
        >>> import torch
        >>> from diffusolve.models import load
        >>> model = load("digits-tokens")
        >>> x = torch.zeros(2, 1, 16, 16)
        >>> with torch.no_grad():
        ...     a = model(x, 500.0, "thick three")
        ...     b = model(x, 500.0, model.tokenizer.encode("thick three"))
        >>> torch.equal(a, b), model.null_cond.tolist()
        (True, [[1, 0, 0, 0, 0]])
    """

    def __init__(self, model: Any, tokenizer: Any, encoder: torch.nn.Module) -> None:
        self.model = model
        self.process = model.process
        self.tokenizer = tokenizer
        self.encoder = encoder

    @property
    def unet(self) -> Any:
        """The diffusers UNet under this wrapper (and any wrappers inside it)."""
        inner = self.model
        while not hasattr(inner, "unet"):
            if not hasattr(inner, "model"):
                raise AttributeError(f"no UNet found under {self.model!r}")
            inner = inner.model
        return inner.unet

    @property
    def null_cond(self) -> Tensor:
        """Token ids ``[1, L]`` of the empty caption (the unconditional input)."""
        return self.tokenizer.encode("")

    def rewrap(self, model: Any) -> TokenConditioned:
        """The same captions over another inner denoiser (e.g. a guided one)."""
        return TokenConditioned(model, self.tokenizer, self.encoder)

    def token_ids(self, cond: Any, batch: int | None = None) -> Tensor:
        """Token ids ``[B, L]`` of a caption, a list of captions, ids or ``None``."""
        if cond is None:
            cond = ""
        if isinstance(cond, (str, list, tuple)):
            if isinstance(cond, (list, tuple)) and not all(isinstance(c, str) for c in cond):
                raise TypeError("a list cond must hold caption strings")
            ids = self.tokenizer.encode(cond)
        elif isinstance(cond, Tensor) and not cond.is_floating_point():
            ids = cond.to(torch.long)
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or ids.shape[1] != self.tokenizer.max_length:
                raise ValueError(
                    f"token ids must be [B, {self.tokenizer.max_length}] or "
                    f"[1, {self.tokenizer.max_length}], got {tuple(cond.shape)}"
                )
            if bool(((ids < 0) | (ids >= len(self.tokenizer))).any()):
                raise ValueError(f"token ids must be in 0..{len(self.tokenizer) - 1}")
        else:
            raise TypeError(
                "cond must be None, a caption, a list of captions, token ids [B, L] or "
                f"embeddings [B, L, D]; got {type(cond).__name__}"
            )
        return _batched(ids, batch)

    def embed(self, cond: Any, batch: int | None = None, device: Any = None) -> Tensor:
        """Embedded tokens ``[B, L, D]`` (float) of any ``cond`` form; ``batch`` broadcasts a
        single condition. Float tensors ``[B, L, D]`` are returned as they are (on
        ``device``), so gradients with respect to them flow.

        Example:
            >>> from diffusolve.models import load
            >>> model = load("digits-tokens")
            >>> model.embed("thick three", 4).shape
            torch.Size([4, 5, 64])
        """
        if isinstance(cond, Tensor) and cond.is_floating_point():
            if cond.ndim != 3 or cond.shape[-1] != self.encoder.dim:
                raise ValueError(
                    f"embedded tokens must be [B, L, {self.encoder.dim}] or "
                    f"[1, L, {self.encoder.dim}], got {tuple(cond.shape)}"
                )
            # a broadcast row is copied: the UNet's kernels may round a stride-0 batch
            # differently, and every cond form of one caption must give the same output
            out = _batched(cond, batch).contiguous()
        else:
            ids = self.token_ids(cond, batch)
            dev = next(self.encoder.parameters()).device
            out = self.encoder(ids.to(dev))
        return out if device is None else out.to(device)

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.model(x, t, self.embed(cond, x.shape[0], x.device))

    def __repr__(self) -> str:
        return f"TokenConditioned({self.model!r}, {self.tokenizer!r})"


def _batched(c: Tensor, batch: int | None) -> Tensor:
    """``c`` with a batch of ``batch`` rows (a single row is broadcast)."""
    if batch is None or c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand((batch,) + tuple(c.shape[1:]))
    raise ValueError(f"got a condition for {c.shape[0]} samples in a batch of {batch}")


def load(
    name: str | Path = "digits",
    *,
    dtype: torch.dtype = torch.float32,
    guidance: float | None = None,
) -> Denoiser:
    """A bundled model or a local diffusers folder as a ready :class:`Denoiser`.

    Args:
        name: a bundled model name (``"digits"``, ``"digits-tokens"``, the few-step
            ``"digits-lcm"``, ``"digits-lcm-lora"``, ``"digits-mmd"``, ``"digits-lcm-mmd"``)
            or the path of a
            diffusers folder, e.g. one written by ``diffusolve train digits --out my-digits``.
        dtype: the network's dtype.

    Loads with ``from_pretrained`` (local files only, safetensors, never the network). The
    UNet's parameters do not require gradients; gradients with respect to ``x`` still flow
    (the caller owns autograd). A class-conditional UNet (``num_class_embeds = K``) is
    wrapped in :class:`LabelConditioned`: ``cond`` takes int labels ``0 .. K-2`` and the last
    label ``K-1`` is the null (unconditional) class, as in the models ``diffusolve train``
    writes (``K = 11`` for digits: classes 0-9, null 10); ``cond=None`` means the null class.
    A folder with a ``tokenizer.json`` and a ``text_encoder/`` (``digits-tokens``, or one
    written by ``diffusolve train digits-tokens``) is wrapped in :class:`TokenConditioned`:
    ``cond`` is a caption, a list of captions, token ids or embedded tokens.
    A folder with a ``consistency.json`` (a consistency model) is wrapped in
    :class:`~diffusolve.models.consistency.ConsistencyBoundary`; one with
    ``lora/adapter_config.json`` is its base model (``base_model_name_or_path``) with the
    adapter merged (:func:`~diffusolve.models.lora.load_lora_unet`, needs peft); one with a
    ``fewstep.json`` gets its sampling recipe as ``model.fewstep``
    (:mod:`diffusolve.models.fewstep`).

    Classifier-free guidance is a layer above models: ``diffusolve.load(name, guidance=w)``
    or :func:`diffusolve.guidance.classifier_free`.

    Example:
        >>> import torch
        >>> from diffusolve import sample
        >>> from diffusolve.models import load
        >>> model = load("digits")
        >>> x = model.process.prior_sample((4, 1, 16, 16), noise=0)
        >>> with torch.no_grad():
        ...     digits = sample(model, x, 20, "ddim", cond=torch.tensor([0, 1, 2, 3]))
        >>> digits.shape
        torch.Size([4, 1, 16, 16])
    """
    from .diffusers_adapter import load_diffusers

    if guidance is not None:
        raise TypeError(
            "diffusolve.models.load no longer applies classifier-free guidance (models sit "
            "below guidance); use diffusolve.load(name, guidance=w), or "
            "diffusolve.guidance.classifier_free(diffusolve.models.load(name), w)."
        )
    from .consistency import BoundaryScalings, ConsistencyBoundary
    from .fewstep import RECIPE_NAME, fewstep_recipe

    folder = _resolve(name)
    if (folder / _LORA_CONFIG).is_file():
        from .lora import load_lora_unet

        base = load_diffusers(_resolve(_lora_base(folder)), dtype=dtype)
        base.unet = load_lora_unet(base.unet, folder / "lora")
    else:
        base = load_diffusers(folder, dtype=dtype)
    base.unet.eval().requires_grad_(False)
    if (folder / "tokenizer.json").is_file():
        return _token_model(folder, base)
    scalings = BoundaryScalings.read(folder)
    if scalings is not None:
        base = ConsistencyBoundary(base, scalings)
    k = getattr(getattr(base.unet, "config", None), "num_class_embeds", None)
    model = base
    if k:
        if int(k) < 2:
            raise ValueError(f"{folder}: num_class_embeds={k}; a label model needs at least 2")
        model = LabelConditioned(base, num_labels=int(k), null=int(k) - 1)
    if (folder / RECIPE_NAME).is_file():
        model.fewstep = fewstep_recipe(
            name if isinstance(name, str) and name in BUNDLED else folder
        )
    return model


def _lora_base(folder: Path) -> str | Path:
    """The base model named in a LoRA folder's adapter config (a bundled name or a folder)."""
    import json

    cfg = json.loads((folder / _LORA_CONFIG).read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / _LORA_CONFIG} names no base_model_name_or_path")
    return base if base in BUNDLED else (folder / base).resolve()


def _token_model(folder: Path, base: Any) -> TokenConditioned:
    """The caption model of ``folder``: its UNet ``base``, tokenizer and token embedding."""
    from .tokens import DigitsTokenizer, load_token_embedding

    tokenizer = DigitsTokenizer.load(folder / "tokenizer.json")
    encoder = load_token_embedding(folder / "text_encoder")
    if not base.conditional:
        raise ValueError(f"{folder} has a tokenizer but its UNet has no cross-attention")
    cross = getattr(base.unet.config, "cross_attention_dim", None)
    if cross != encoder.dim or encoder.vocab_size != len(tokenizer):
        raise ValueError(
            f"{folder}: the token embedding ({encoder.vocab_size} words, dim {encoder.dim}) does "
            f"not match the tokenizer ({len(tokenizer)} words) and the UNet (cross_attention_dim "
            f"{cross}); retrain with `diffusolve train digits-tokens --out {folder} --force`"
        )
    return TokenConditioned(base, tokenizer, encoder)


def _resolve(name: str | Path) -> Path:
    """The folder of bundled model ``name``, or ``name`` itself when it is a folder."""
    if isinstance(name, str) and name in BUNDLED:
        return asset_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise ValueError(
        f"unknown bundled model {str(name)!r}; available: {', '.join(BUNDLED)}, or the path "
        "of a local diffusers folder (e.g. one written by `diffusolve train digits --out DIR`)"
    )


def load_classifier(name: str = "digits") -> torch.nn.Module:
    """The bundled noise-aware classifier of ``name`` (``net(x_t, t) -> logits``,
    ``net.features(x_t, t)`` for FD-digits), in eval mode, parameters frozen."""
    from .classifier import load_classifier_from

    if name not in _CLASSIFIERS:
        raise ValueError(f"no bundled classifier {name!r}; available: {_CLASSIFIERS}")
    return load_classifier_from(Path(__file__).resolve().parent.parent / "assets" / name)
