"""LoRA adapters on a diffusers UNet through peft (Hu et al. 2022, LoRA; Luo et al. 2023,
LCM-LoRA: the acceleration vector of consistency distillation stored as a LoRA).

A LoRA folder holds ``adapter_config.json`` (peft's ``LoraConfig`` plus
``base_model_name_or_path``, the base model) and ``adapter_model.safetensors`` (only the
``lora_A`` / ``lora_B`` weights). :func:`load_lora_unet` injects the adapter into the base
UNet with peft, loads the weights and merges them (``W <- W + (alpha / r) B A``), so the
returned UNet is a plain diffusers module with no extra cost per call.

peft is an optional dependency (the ``lora`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["add_lora", "lora_state_dict", "save_lora", "load_lora_unet", "ADAPTER_WEIGHTS"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: the UNet2DModel layers a digits LoRA adapts: attention projections, ResNet convolutions,
#: time-embedding projections and the resampling convolutions
DEFAULT_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
)


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "LoRA models need peft: pip install 'diffusolve[lora]' (or pip install peft)"
        ) from err
    return peft


def lora_config(rank: int = 8, alpha: float | None = None, targets=DEFAULT_TARGETS) -> Any:
    """A peft ``LoraConfig`` for the digits UNet (``lora_alpha`` defaults to ``rank``,
    i.e. scale 1; ``init_lora_weights=True``: ``B = 0``, so the adapter starts as the
    identity)."""
    peft = _peft()
    if int(rank) < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return peft.LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=True,
    )


def add_lora(unet: Any, config: Any) -> Any:
    """Inject a trainable LoRA adapter ``"default"`` into ``unet`` in place (the base
    weights are frozen) and return ``unet``."""
    peft = _peft()
    unet.requires_grad_(False)
    peft.inject_adapter_in_model(config, unet, adapter_name="default")
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return unet


def lora_state_dict(unet: Any) -> dict[str, Any]:
    """The adapter's weights only (peft's key names, without the adapter name)."""
    return _peft().get_peft_model_state_dict(unet, adapter_name="default")


def save_lora(unet: Any, config: Any, folder: str | Path, base: str) -> None:
    """Write ``folder/adapter_model.safetensors`` and ``folder/adapter_config.json``
    (naming ``base`` as ``base_model_name_or_path``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(unet).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS))
    cfg = config.to_dict()
    cfg["base_model_name_or_path"] = base
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n")


def load_lora_unet(unet: Any, folder: str | Path) -> Any:
    """``unet`` with the adapter in ``folder`` injected, loaded and merged (a plain module).

    Example:
        >>> from diffusolve.models import load
        >>> model = load("digits-lcm-lora")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    peft = _peft()
    folder = Path(folder)
    data = json.loads((folder / ADAPTER_CONFIG).read_text())
    known = set(peft.LoraConfig.__dataclass_fields__)
    config = peft.LoraConfig(**{k: v for k, v in data.items() if k in known})
    model = peft.LoraModel(unet, config, "default")
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    result = peft.set_peft_model_state_dict(unet, state, adapter_name="default")
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{folder}: adapter weights do not fit the base UNet: {missing[:3]}")
    return model.merge_and_unload()
