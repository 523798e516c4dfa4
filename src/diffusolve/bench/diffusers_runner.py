"""Run diffusers' schedulers on one of our exact models, with the same start and NFE budget.

A diffusers scheduler is driven exactly as a diffusers pipeline drives it::

    scheduler.set_timesteps(n)
    sample = x_T * init_scale
    for t in scheduler.timesteps:           # one model evaluation per entry
        out = model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(out, t, sample).prev_sample

The model is our exact x0 denoiser, converted with :func:`diffusolve.process.param.from_x0`
to what the scheduler expects (epsilon for the DDPM family, flow velocity for flow
schedulers and ``prediction_type="flow_prediction"``). Each call is evaluated at the time
of our process that the scheduler's update assumes: the scheduler's own ``sigmas[k]`` at
call ``k`` where it keeps sigmas (``sigma = sigma/alpha`` of our process for the DDPM
family, ``sigma = t`` for flow sigmas), otherwise its integer timestep (DDIM, PNDM: the
diffusers index time of :func:`diffusolve.process.ddpm`).

``num_inference_steps`` is the largest value whose ``len(scheduler.timesteps)`` (the
number of model evaluations a pipeline makes) fits the NFE budget; the evaluations are
also counted during the run.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..process import from_x0

__all__ = ["SchedulerSpec", "SPECS", "settings_for", "run_scheduler", "unsupported_note"]

#: diffusers' DDPM-linear configuration (the ``ddpm("linear")`` process); passed explicitly
#: because some schedulers (Heun) default to Stable Diffusion's betas.
DDPM_LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}

#: diffusers' beta configuration of each DDPM process of the bench (by process name)
BETAS: dict[str, dict[str, Any]] = {
    "ddpm-linear": DDPM_LINEAR,
    "ddpm-scaled_linear": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    },
}


def betas_config(process_name: str | None) -> dict[str, Any]:
    """Diffusers' beta configuration for a process name (DDPM-linear for non-DDPM ones)."""
    if process_name is None or not process_name.startswith("ddpm"):
        return DDPM_LINEAR
    try:
        return BETAS[process_name]
    except KeyError:
        raise ValueError(
            f"no diffusers beta configuration for process {process_name!r}; add it to BETAS"
        ) from None


LEADING_NOTE = "timestep_spacing='leading' excluded (its first timestep lies below t_max)"


@dataclass(frozen=True)
class SchedulerSpec:
    """One diffusers method and the documented settings searched for it.

    Attributes:
        method: display name.
        cls: diffusers class name.
        base: fixed constructor options.
        options: options searched on DDPM (VP) tasks; the pseudo-option ``sigmas`` takes
            ``"default"``, ``"karras"``, ``"lu"`` (uniform logSNR) or ``"exponential"``.
        flow: ``"native"`` (a flow-matching scheduler), ``"flag"`` (supports
            ``use_flow_sigmas`` + ``prediction_type="flow_prediction"``) or ``"none"``.
        flow_options: options searched on rectified-flow tasks.
        spacing_note: whether the scheduler has a ``leading`` spacing (then recorded as excluded).
        flow_sigmas_arg: on flow tasks pass ``set_timesteps(sigmas=...)`` (documented for
            flow sigmas) with the default flow spacing started at ``t_max`` instead of 1.
        linspace_caveat: ``step()`` goes to ``t - N // n`` whatever the spacing, so with
            ``linspace`` the state and the next call's timestep disagree (noted in records).
    """

    method: str
    cls: str
    base: dict[str, Any] = field(default_factory=dict)
    options: dict[str, tuple] = field(default_factory=dict)
    flow: str = "none"
    flow_options: dict[str, tuple] = field(default_factory=dict)
    spacing_note: bool = True
    flow_sigmas_arg: bool = False
    linspace_caveat: bool = False


_SPACING = ("linspace", "trailing")
_LOF = (True, False)
_FINAL = ("zero", "sigma_min")

SPECS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec(
        "DDIM",
        "DDIMScheduler",
        {"set_alpha_to_one": True, "clip_sample": False},
        {"timestep_spacing": _SPACING},
        linspace_caveat=True,
    ),
    *(
        SchedulerSpec(
            f"DPM-Solver++ {order}M",
            "DPMSolverMultistepScheduler",
            {"solver_order": order, "algorithm_type": "dpmsolver++"},
            {
                "timestep_spacing": _SPACING,
                "sigmas": ("default", "karras", "lu"),
                "lower_order_final": _LOF,
                "final_sigmas_type": _FINAL,
            },
            flow="flag",
            flow_options={"lower_order_final": _LOF, "final_sigmas_type": _FINAL},
        )
        for order in (2, 3)
    ),
    SchedulerSpec(
        "UniPC",
        "UniPCMultistepScheduler",
        {},
        {
            "solver_order": (2, 3),
            "solver_type": ("bh1", "bh2"),
            "timestep_spacing": _SPACING,
            "sigmas": ("default", "karras"),
            "lower_order_final": _LOF,
            "final_sigmas_type": _FINAL,
        },
        flow="flag",
        flow_options={
            "solver_order": (2, 3),
            "solver_type": ("bh1", "bh2"),
            "lower_order_final": _LOF,
            "final_sigmas_type": _FINAL,
        },
        flow_sigmas_arg=True,
    ),
    SchedulerSpec(
        "DEIS",
        "DEISMultistepScheduler",
        {},
        {
            "solver_order": (2, 3),
            "timestep_spacing": _SPACING,
            "sigmas": ("default", "karras"),
            "lower_order_final": _LOF,
        },
        flow="flag",
        flow_options={"solver_order": (2, 3), "lower_order_final": _LOF},
    ),
    SchedulerSpec(
        "PNDM",
        "PNDMScheduler",
        {},
        {
            "skip_prk_steps": (True, False),
            "timestep_spacing": _SPACING,
            "set_alpha_to_one": (True, False),
        },
        linspace_caveat=True,
    ),
    SchedulerSpec(
        "Euler",
        "EulerDiscreteScheduler",
        {},
        {
            "timestep_spacing": _SPACING,
            "sigmas": ("default", "karras", "exponential"),
            "final_sigmas_type": _FINAL,
        },
    ),
    SchedulerSpec(
        "Heun",
        "HeunDiscreteScheduler",
        {},
        {"timestep_spacing": _SPACING, "sigmas": ("default", "karras", "exponential")},
    ),
    SchedulerSpec(
        "FlowMatchEuler",
        "FlowMatchEulerDiscreteScheduler",
        {},
        {},
        flow="native",
        flow_options={"sigmas": ("default", "karras", "exponential")},
        spacing_note=False,
    ),
    SchedulerSpec(
        "FlowMatchHeun",
        "FlowMatchHeunDiscreteScheduler",
        {},
        {},
        flow="native",
        flow_options={},
        spacing_note=False,
    ),
)

_SIGMA_FLAGS = {
    "karras": "use_karras_sigmas",
    "lu": "use_lu_lambdas",
    "exponential": "use_exponential_sigmas",
}


def unsupported_note(spec: SchedulerSpec, kind: str) -> str | None:
    """Why ``spec`` cannot run a ``kind`` (``"vp"`` or ``"rf"``) task, or ``None``."""
    if kind == "rf" and spec.flow == "none":
        return (
            f"{spec.cls} has no flow-matching mode (no use_flow_sigmas / flow_prediction); "
            "the rectified-flow process is not a DDPM beta schedule"
        )
    if kind == "vp" and spec.flow == "native":
        return f"{spec.cls} is a flow-matching scheduler; the task is a DDPM (VP) process"
    return None


def settings_for(spec: SchedulerSpec, kind: str, quick: bool = False) -> list[dict[str, Any]]:
    """Every combination of the searched options for a task of ``kind``.

    With ``quick`` only the first two values of each option are kept (and ``sigma_min``
    final sigmas, rarely best, are dropped).
    """
    opts = dict(spec.flow_options if kind == "rf" else spec.options)
    if quick:
        opts = {k: tuple(v for v in vals if v != "sigma_min")[:2] for k, vals in opts.items()}
    keys = list(opts)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*opts.values())]


def _config(
    spec: SchedulerSpec, setting: dict[str, Any], kind: str, betas: dict[str, Any] | None = None
) -> dict[str, Any]:
    cfg = dict(spec.base)
    if spec.flow != "native":
        cfg.update(DDPM_LINEAR if betas is None else betas)
        cfg["prediction_type"] = "epsilon"
    if kind == "rf" and spec.flow == "flag":
        cfg.update(use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction")
    for k, v in setting.items():
        if k == "sigmas":
            if v != "default":
                cfg[_SIGMA_FLAGS[v]] = True
        else:
            cfg[k] = v
    return cfg


def _build(spec: SchedulerSpec, cfg: dict[str, Any], process: Any) -> Any:
    import diffusers

    sched = getattr(diffusers, spec.cls)(**cfg)
    if spec.flow == "native":
        # The default flow schedule starts at sigma = 1 (pure noise), where the rectified
        # flow's x0 estimate is undefined (alpha = 0); start at the process's t_max instead.
        sched.sigma_max = float(process.t_max)
        sched.sigma_min = float(process.t_min)
    return sched


def _time_mode(sched: Any) -> str:
    sig = getattr(sched, "sigmas", None)
    if isinstance(sig, Tensor) and sig.numel() == len(sched.timesteps) + 1:
        return "sigma"
    return "timestep"


def _process_time(process: Any, sched: Any, mode: str, flow: bool, k: int, timestep: Any) -> Tensor:
    if mode == "timestep":
        return torch.tensor(float(timestep), dtype=torch.float64)
    s = torch.tensor(float(sched.sigmas[k]), dtype=torch.float64)
    if flow:
        return s  # flow sigmas are rectified-flow times
    return process.t_of_sigma_tilde(s)


def _set_timesteps(sched: Any, n: int, custom_flow: Any) -> None:
    if custom_flow is None:
        sched.set_timesteps(n)
    else:
        import numpy as np

        t_max, t_min = custom_flow
        sched.set_timesteps(sigmas=np.linspace(t_max, t_min, n + 1)[:-1])


def _steps_within(sched: Any, nfe: int, custom_flow: Any = None) -> int:
    """Largest ``num_inference_steps`` whose timesteps (model calls) fit in ``nfe``."""
    for n in range(int(nfe), 0, -1):
        try:
            _set_timesteps(sched, n, custom_flow)
        except Exception:  # noqa: BLE001 - some schedulers refuse small n
            continue
        if len(sched.timesteps) <= nfe:
            return n
    raise ValueError(f"no num_inference_steps gives at most {nfe} model evaluations")


def _upcasts(sched: Any) -> bool:
    """Whether ``step()`` rounds the sample to float32 internally (diffusers' upcast line)."""
    try:
        return "sample.to(torch.float32)" in inspect.getsource(type(sched).step)
    except (OSError, TypeError):
        return False


def run_scheduler(
    spec: SchedulerSpec,
    setting: dict[str, Any],
    model: Any,
    x_T: Tensor,
    nfe: int,
    kind: str,
    *,
    dtype: torch.dtype = torch.float64,
    betas: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample with one diffusers scheduler setting; returns ``x`` and bookkeeping.

    Args:
        spec, setting: the scheduler and one element of :func:`settings_for`.
        model: our x0 denoiser (with ``.process``).
        x_T: the shared start, the process state at ``t_max``.
        nfe: the evaluation budget.
        kind: ``"vp"`` (DDPM process) or ``"rf"`` (rectified flow).
        dtype: the sample dtype the scheduler runs in.
        betas: diffusers' beta configuration of the process (default :data:`DDPM_LINEAR`;
            see :func:`betas_config`).

    Returns:
        ``dict(x, nfe_used, steps, notes)``; raises ``ValueError`` when the setting does not
        start at ``t_max`` or does not fit the budget.
    """
    process = model.process
    flow = kind == "rf"
    cfg = _config(spec, setting, kind, betas)
    sched = _build(spec, cfg, process)
    custom = (process.t_max, process.t_min) if flow and spec.flow_sigmas_arg else None
    steps = _steps_within(sched, nfe, custom)
    _set_timesteps(sched, steps, custom)
    mode = _time_mode(sched)
    timesteps = list(sched.timesteps)
    t0 = _process_time(process, sched, mode, flow, 0, timesteps[0])
    gap = abs(float(process.lam(t0)) - float(process.lam(process.t_max)))
    if gap > 1e-3:
        raise ValueError(
            f"starts at t={float(t0):.6g}, not at t_max={process.t_max:g} (|delta lambda|={gap:.3g})"
        )
    pred = "velocity" if flow else "epsilon"
    x = x_T.to(dtype)
    ones = torch.ones((1,) + tuple(x.shape[1:]), dtype=dtype)
    scale = (
        sched.scale_model_input(ones, timesteps[0]) if hasattr(sched, "scale_model_input") else ones
    )
    sample = x / scale  # the scheduler's own representation of x_T (e.g. x / alpha for Euler)
    evals = 0
    for k, ts in enumerate(timesteps):
        xin = sched.scale_model_input(sample, ts) if hasattr(sched, "scale_model_input") else sample
        t = _process_time(process, sched, mode, flow, k, ts)
        x0 = model(xin, t)
        out = from_x0(process, xin, t, x0, pred)
        evals += 1
        sample = sched.step(out, ts, sample).prev_sample
        if not torch.all(torch.isfinite(sample)):
            raise FloatingPointError(f"non-finite sample at step {k}")
    notes = []
    if spec.linspace_caveat and cfg.get("timestep_spacing") == "linspace":
        notes.append(
            "with linspace spacing step() still moves to t - 1000//n, so the next model call's "
            "timestep differs from the state's (diffusers behaviour, kept as a pipeline runs it)"
        )
    if _upcasts(sched):
        notes.append("step() rounds the sample to float32 internally")
    if spec.flow == "native":
        notes.append(f"sigma_max set to t_max={process.t_max:g} (default schedule starts at 1)")
    if custom is not None:
        notes.append(
            f"set_timesteps(sigmas=linspace({process.t_max:g}, {process.t_min:g}, n+1)[:-1]): "
            "the default flow sigmas start at 1"
        )
    return {"x": sample.to(torch.float64), "nfe_used": evals, "steps": steps, "notes": notes}


def describe(setting: dict[str, Any], steps: int | None = None) -> str:
    """A short text for a setting (``key=value, ...``)."""
    parts = [f"{k}={v}" for k, v in setting.items()]
    if steps is not None:
        parts.append(f"num_inference_steps={steps}")
    return ", ".join(parts) if parts else "default"
