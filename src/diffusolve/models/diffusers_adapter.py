"""Adapters for diffusers UNets: a ``UNet2DModel`` / ``UNet2DConditionModel`` as a Denoiser.

The scheduler config decides the process (:func:`diffusolve.process.from_scheduler_config`)
and the prediction type; the adapter converts the network output to the x0 estimate with
:func:`diffusolve.process.to_x0`. Time conventions:

* DDPM-family schedulers map to a :class:`~diffusolve.process.DiscreteVP` whose time *is*
  diffusers' timestep (``0 .. num_train_timesteps - 1``), so the network gets ``t`` as is.
* Flow-matching schedulers map to rectified flow with ``t in (0, 1)`` (``t`` = diffusers'
  ``sigma``); the network gets ``t * num_train_timesteps``, as diffusers' flow pipelines do.

diffusers is imported lazily, only when a model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..process import Process, from_scheduler_config, to_x0
from ..process.schedules import DiscreteVP
from .base import Denoiser

__all__ = ["DiffusersDenoiser", "from_diffusers", "load_diffusers", "PREDICTION_TYPES"]

#: diffusers' ``prediction_type`` -> diffusolve's prediction name (ours are accepted as is).
PREDICTION_TYPES: dict[str, str] = {
    "epsilon": "epsilon",
    "v_prediction": "v",
    "sample": "x0",
    "flow_prediction": "velocity",
    "v": "v",
    "x0": "x0",
    "velocity": "velocity",
}

_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _prediction(kind: str) -> str:
    try:
        return PREDICTION_TYPES[kind]
    except KeyError:
        raise ValueError(
            f"unsupported prediction_type {kind!r}; diffusers names: 'epsilon', "
            "'v_prediction', 'sample', 'flow_prediction' (or ours: 'v', 'x0', 'velocity')."
        ) from None


def _config_dict(obj: Any) -> dict[str, Any]:
    """A scheduler's config (a FrozenDict / dict / scheduler object) as a plain dict."""
    if obj is None:
        return {}
    cfg = getattr(obj, "config", obj)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            "scheduler_or_config must be a diffusers scheduler or its config dict, "
            f"got {type(obj).__name__}."
        )
    cfg = dict(cfg)
    if "_class_name" not in cfg and not isinstance(obj, Mapping):
        cfg["_class_name"] = type(obj).__name__
    return cfg


class DiffusersDenoiser(Denoiser):
    """A diffusers UNet wrapped as ``model(x, t, cond) -> x0_hat`` on ``process``.

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel`` (any module with the same
            ``forward(sample, timestep, ..., return_dict=False)`` signature).
        process: the process the network was trained on.
        prediction: what the network predicts, in diffusolve's names (``"epsilon"``,
            ``"v"``, ``"x0"``, ``"velocity"``).
        time_scale: the network's timestep input is ``t * time_scale`` (1 for DDPM-family
            processes, ``num_train_timesteps`` for rectified flow).

    ``cond`` is ``class_labels`` (an int tensor ``[B]``) for a ``UNet2DModel``,
    ``encoder_hidden_states`` (``[B, L, D]``) for a ``UNet2DConditionModel``, or a dict of
    keyword arguments for ``forward`` (e.g. ``{"encoder_hidden_states": e,
    "added_cond_kwargs": {...}}``).

    Learned-variance networks (improved DDPM, ``out_channels == 2 * in_channels``) return
    ``[prediction, variance interpolation]`` stacked on channels; only the first half, the
    mean prediction, defines the probability-flow ODE, so the second half is dropped (this
    is what diffusers' schedulers do too).

    Autograd is left to the caller (no ``torch.no_grad`` here): wrap sampling in
    ``torch.no_grad()`` yourself unless you need gradients through the network.
    """

    def __init__(
        self, unet: Any, process: Process, prediction: str = "epsilon", *, time_scale: float = 1.0
    ) -> None:
        self.unet = unet
        self.process = process
        self.prediction = _prediction(prediction)
        self.time_scale = float(time_scale)
        self.conditional = type(unet).__name__ == "UNet2DConditionModel" or (
            getattr(getattr(unet, "config", None), "cross_attention_dim", None) is not None
        )
        self.scheduler_config: dict[str, Any] = {}

    def _dtype(self, x: Tensor) -> torch.dtype:
        dt = getattr(self.unet, "dtype", None)
        return dt if isinstance(dt, torch.dtype) else x.dtype

    def _cond_kwargs(self, cond: Any) -> dict[str, Any]:
        if cond is None:
            if self.conditional:
                raise ValueError(
                    "a UNet2DConditionModel needs cond: pass encoder_hidden_states [B, L, D] "
                    "(or a dict of forward kwargs)."
                )
            return {}
        if isinstance(cond, Mapping):
            return dict(cond)
        if isinstance(cond, Tensor):
            return {"encoder_hidden_states" if self.conditional else "class_labels": cond}
        raise TypeError(
            f"cond must be a tensor or a dict of forward kwargs, got {type(cond).__name__}."
        )

    def denoise(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        b = x.shape[0]
        if t.ndim == 0:
            t_b = t.expand(b)
        elif t.shape == (b,):
            t_b = t
        else:
            raise ValueError(f"t must be 0-d or of shape [{b}], got {tuple(t.shape)}.")
        # diffusers embeds timesteps in float32 (get_timestep_embedding calls .float())
        tin = (t_b * self.time_scale).to(device=x.device, dtype=torch.float32)
        dt = self._dtype(x)
        kwargs = self._cond_kwargs(cond)
        for k, v in kwargs.items():
            if isinstance(v, Tensor):
                kwargs[k] = v.to(device=x.device, dtype=dt if v.is_floating_point() else None)
        out = self.unet(x.to(dt), tin, **kwargs, return_dict=False)
        out = out[0] if isinstance(out, (tuple, list)) else out
        c = x.shape[1]
        if out.ndim == x.ndim and out.shape[1] == 2 * c:
            out = out[:, :c]  # learned variance: keep the mean prediction (see class docstring)
        if out.shape != x.shape:
            raise ValueError(
                f"the UNet returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                "check sample_size / in_channels against your data."
            )
        return to_x0(self.process, x, t, out.to(x.dtype), self.prediction)

    def __repr__(self) -> str:
        return (
            f"DiffusersDenoiser({type(self.unet).__name__}, process={self.process!r}, "
            f"prediction={self.prediction!r})"
        )


def from_diffusers(
    unet: Any,
    scheduler_or_config: Any = None,
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype | None = None,
) -> DiffusersDenoiser:
    """Wrap a diffusers UNet (or a pipeline's ``.unet`` and ``.scheduler``) as a Denoiser.

    Args:
        unet: a ``UNet2DModel``, ``UNet2DConditionModel`` or a ``DiffusionPipeline``.
        scheduler_or_config: a diffusers scheduler or its config dict (taken from the
            pipeline when ``unet`` is one). Without it the process is diffusers' default
            linear DDPM schedule with 1000 steps and epsilon prediction.
        prediction_type: overrides the config's ``prediction_type`` (diffusers' or our names).
        dtype: if given, the UNet is converted in place with ``unet.to(dtype)``.

    Example:
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from diffusolve.models import from_diffusers
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        ...     down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> model = from_diffusers(unet, {"beta_schedule": "linear"})
        >>> model(torch.zeros(2, 1, 8, 8), 500.0).shape
        torch.Size([2, 1, 8, 8])
    """
    if hasattr(unet, "unet") and hasattr(unet, "scheduler"):  # a DiffusionPipeline
        if scheduler_or_config is None:
            scheduler_or_config = unet.scheduler
        unet = unet.unet
    if not callable(unet) or not hasattr(unet, "config"):
        raise TypeError(
            f"expected a diffusers UNet2DModel / UNet2DConditionModel, got {type(unet).__name__}."
        )
    cfg = _config_dict(scheduler_or_config)
    process = from_scheduler_config(cfg)
    if prediction_type is None:
        default = "flow_prediction" if not isinstance(process, DiscreteVP) else "epsilon"
        prediction_type = cfg.get("prediction_type") or default
    prediction = _prediction(prediction_type)
    if isinstance(process, DiscreteVP) and prediction == "velocity":
        raise ValueError("flow_prediction needs a flow-matching scheduler config.")
    # from_scheduler_config returns a DiscreteVP (diffusers timestep units) or rectified
    # flow (t = diffusers' sigma in (0, 1), network timestep = sigma * num_train_timesteps)
    time_scale = 1.0
    if not isinstance(process, DiscreteVP):
        time_scale = float(cfg.get("num_train_timesteps", 1000))
    if dtype is not None:
        unet.to(dtype)
    model = DiffusersDenoiser(unet, process, prediction, time_scale=time_scale)
    model.scheduler_config = cfg
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _find_scheduler_config(root: Path, unet_dir: Path) -> Path:
    for cand in (
        root / "scheduler" / "scheduler_config.json",
        unet_dir / "scheduler_config.json",
        root / "scheduler_config.json",
    ):
        if cand.is_file():
            return cand
    raise ValueError(
        f"no scheduler config found for {unet_dir}: expected {root}/scheduler/"
        "scheduler_config.json or a scheduler_config.json next to the UNet's config.json. "
        "Load the UNet yourself and call from_diffusers(unet, scheduler_config)."
    )


def load_diffusers(
    path: str | Path, *, subfolder: str | None = None, dtype: torch.dtype | None = None
) -> DiffusersDenoiser:
    """Load a diffusers UNet + scheduler config from a local folder (never the network).

    Accepted layouts:

    * a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``);
    * a folder with ``unet/`` and ``scheduler/`` subfolders;
    * a UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) with a
      ``scheduler_config.json`` beside it or in ``../scheduler/``.

    ``subfolder`` names the UNet's subfolder (default ``unet`` when present). Weights are
    read from safetensors only (pickled ``.bin`` weights are refused).

    Example:
        >>> from diffusolve.models import load_diffusers
        >>> model = load_diffusers("path/to/ddpm-cifar10")  # doctest: +SKIP
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; load_diffusers needs a local folder.")
    if subfolder is not None:
        unet_dir = root / subfolder
        if not unet_dir.is_dir():
            raise FileNotFoundError(f"{unet_dir} does not exist.")
    elif (root / "unet").is_dir():
        unet_dir = root / "unet"
    else:
        unet_dir = root
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise ValueError(
            f"{root} is not a diffusers model folder: expected model_index.json with unet/ "
            "and scheduler/ subfolders, or a UNet folder with config.json and "
            "diffusion_pytorch_model.safetensors plus a scheduler_config.json."
        )
    cls_name = _read_json(cfg_file).get("_class_name")
    if cls_name not in _UNET_CLASSES:
        raise ValueError(
            f"{cfg_file} describes {cls_name!r}; load_diffusers supports {_UNET_CLASSES}."
        )
    if not any(unet_dir.glob("*.safetensors")):
        raise ValueError(
            f"no .safetensors weights in {unet_dir}; diffusolve never unpickles weights. "
            "Convert them with diffusers: model.save_pretrained(dir, safe_serialization=True)."
        )
    sched_cfg = _read_json(_find_scheduler_config(root, unet_dir))

    import diffusers

    unet_cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if importlib.util.find_spec("accelerate") is None:
        # what diffusers falls back to anyway, without its "install accelerate" warning
        kwargs["low_cpu_mem_usage"] = False
    try:
        unet = unet_cls.from_pretrained(str(unet_dir), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(
            f"cannot load the UNet weights in {unet_dir}: {_first_line(err)}. The file is "
            "corrupt, incomplete or does not match config.json; copy or re-train the folder "
            "(e.g. `diffusolve train digits --out DIR --force`)."
        ) from None
    return from_diffusers(unet, sched_cfg)


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (chained library errors can be long)."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(". ") if text else type(err).__name__
