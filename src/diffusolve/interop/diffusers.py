"""``DiffusolveScheduler``: any registered solver behind diffusers' scheduler interface.

``pipe.scheduler = DiffusolveScheduler.from_config(pipe.scheduler.config, solver="unipc_bh2_2")``
swaps the sampler of a diffusers pipeline (Stable Diffusion, ``DDPMPipeline``, flow-matching
pipelines) with no other change. The pipeline keeps calling the network; every other step of
the solve is our stateless core:

* the config's betas (or a flow-matching config) give the process
  (:func:`diffusolve.process.from_scheduler_config`; flow configs map to rectified flow with
  ``t`` = diffusers' sigma, the shift only changes the grid);
* flow configs: the grid is diffusers' flow sigmas, computed as diffusers' flow-matching
  Euler scheduler computes them (its default ``linspace`` from the shifted training range,
  or the ``sigmas`` a pipeline passes; then ``shift`` or the dynamic shift with the
  pipeline's ``mu`` (``time_shift_type``), then ``shift_terminal``), so ``timesteps`` are
  ``sigma * N`` and start at ``N``. At ``sigma = 1`` (pure noise, ``lambda = -inf``) only the
  first-order step is defined (every exponential integrator reduces to it as
  ``lambda_s -> -inf``; higher-order corrections divide by ``h = inf``): a grid starting
  above the process's ``t_max = 1 - 1/N`` takes that one *entry* step (``x + (t_1 - t_0) v``,
  diffusers' flow Euler step) and the solver runs the rest of the grid from ``t_1``, fresh
  (a multistep solver warms up there). With ``solver="ddim"`` (or ``"euler"``) the whole
  solve is diffusers' flow-matching Euler scheduler;
* DDPM-family configs: the config's end point is honoured: ``set_alpha_to_one=False`` (the
  shipped Stable Diffusion configs) with ``solver="ddim"``, or ``final_sigmas_type=
  "sigma_min"`` with any solver, ends the grid at ``t = 0`` (``alphas_cumprod[0]``, appended
  to a spacing grid that stops above it) with final policy ``"none"``, as diffusers' DDIM /
  DPM-Solver schedulers do; otherwise (``set_alpha_to_one=True``, ``final_sigmas_type=
  "zero"``, or neither key) the last evaluation's x0 estimate is returned (``final=
  "denoise"``). An explicit ``final`` overrides both. ``lower_order_final`` is passed to
  solvers that have that option (diffusers' rule,
  :func:`diffusolve.solvers.multistep.final_order_cap`). Config options that change
  diffusers' sampler in ways this scheduler does not reproduce (``use_karras_sigmas`` and the
  other sigma conversions, ``thresholding``, ``euler_at_final``, ``solver_type="heun"``,
  ``invert_sigmas``, ``stochastic_sampling``, ...) are ignored with a warning naming the
  option (use ``grid_kind`` / ``solver`` / ``solver_options`` instead). With ``grid_kind``
  ``"linspace"`` a config with ``final_sigmas_type`` uses the DPM-Solver schedulers'
  linspace (``n + 1`` times to 0, the 0 dropped), others DDIM's; ``"leading"`` is DDIM's
  formula for both; DDIM's last step at a step count not dividing ``N`` goes to its next
  timestep (diffusers' DDIM goes to ``t - N // n``, which is not one);
* ``set_timesteps`` builds the time grid and lists the solve's model evaluations: a
  multi-stage solver (Heun, singlestep DPM-Solver, PNDM's warm-up) exposes its stage times as
  extra entries of ``timesteps``, and ``final="denoise"`` (default) or ``"zero"`` adds the
  final evaluation at the last grid time, so ``len(timesteps)`` is the solve's NFE;
* ``step`` converts the network output (epsilon, v, sample or flow velocity, as the config's
  ``prediction_type`` says) to the x0 estimate with :func:`diffusolve.process.to_x0` and feeds
  it to a :class:`~diffusolve.interop.replay.PushSolve`, which re-runs the solver's pure step
  until it needs the next evaluation; ``prev_sample`` is that next query point (a stage point
  for multi-stage solvers, as diffusers' own Heun scheduler returns) and, after the last
  entry, the result of the solve.

Timesteps are in the pipeline's units: diffusers' training timesteps for DDPM-family configs
(fractional where the grid is not integer: UNets embed float timesteps), ``sigma * N`` for
flow matching. ``init_noise_sigma`` is 1 and ``scale_model_input`` is the identity (the
pipeline's latents are the process's ``x_t``).

``num_inference_steps`` is an NFE budget: the solve uses the largest number of grid steps
whose evaluations (final one included) fit it (:func:`diffusolve.solvers.steps_for_nfe`), so
every solver gets the same network cost. A ``schedule`` (a searched-schedule file or shipped
name, :mod:`diffusolve.solvers.search`) fixes grid, solver and final policy; then
``num_inference_steps`` is ignored and ``len(timesteps)`` is the schedule's NFE.

Stochastic solvers draw their noise from the ``generator`` passed to ``step`` (the pipeline
passes its own), else from torch's global generator, as diffusers' schedulers do.

**Threads.** The per-generation state (grid, evaluation list, solver state, history) lives
in thread-local storage: one scheduler object may serve pipelines running in different
threads at once, provided each generation calls ``set_timesteps`` and ``step`` from one
thread (every diffusers pipeline does). Two generations interleaved *in one thread* on one
scheduler object are not supported: build one scheduler per pipeline with ``from_config``.
Multistep history is reset by ``set_timesteps``, so consecutive pipeline calls are
independent.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor

from ..models.diffusers_adapter import PREDICTION_TYPES
from ..process import GRIDS, Process, check_grid, from_scheduler_config, make_grid, to_x0
from ..process.schedules import rectified_flow
from ..solvers import FINALS, Solver, get_solver, steps_for_nfe
from .replay import PushSolve, evaluation_times

__all__ = ["DiffusolveScheduler", "DiffusolveSchedulerOutput", "SPACINGS"]

#: diffusers' timestep spacings, usable as ``grid_kind`` on DDPM-family configs (the
#: formulas of diffusers' DDIM scheduler for ``num_steps + 1`` grid points)
SPACINGS = ("leading", "trailing", "linspace")

#: options of diffusers' scheduler configs that change their sampler in ways this scheduler
#: does not reproduce, with the value at which they are harmless; ``from_config`` warns when
#: a config sets one to another value
_IGNORED: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "thresholding": False,
    "clip_sample": False,
    "euler_at_final": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "rescale_betas_zero_snr": False,
}

_COMPATIBLES = [
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
    "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
]


@dataclass
class DiffusolveSchedulerOutput(SchedulerOutput):
    """``prev_sample`` (where the pipeline evaluates next, or the result after the last
    entry) and ``pred_original_sample`` (the x0 estimate of this entry's evaluation)."""

    pred_original_sample: Tensor | None = None


def _spacing(kind: str, points: int, n_train: int, offset: int) -> np.ndarray:
    """``points`` decreasing timesteps with diffusers' DDIM spacing formulas."""
    if kind == "leading":
        ratio = n_train // points
        ts = (np.arange(0, points) * ratio).round()[::-1].astype(np.float64) + offset
    elif kind == "trailing":
        ratio = n_train / points
        ts = np.round(np.arange(n_train, 0, -ratio)).astype(np.float64) - 1
    else:  # linspace
        ts = np.linspace(0, n_train - 1, points).round()[::-1].astype(np.float64)
    return ts


def _resample(values: Sequence[float], points: int) -> np.ndarray:
    """A decreasing sequence resampled to ``points`` entries, linear in the index (ends kept)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == points:
        return v
    if v.size < 2:
        raise ValueError("give at least two timesteps / sigmas")
    pos = np.linspace(0.0, v.size - 1, points)
    return np.interp(pos, np.arange(v.size), v)


def _load_schedule(schedule: str):
    from ..solvers.search import Schedule
    from ..solvers.search.shipped import list_shipped, load_shipped

    path = Path(schedule).expanduser()
    if path.is_file():
        return Schedule.load(path)
    if schedule in list_shipped():
        return load_shipped(schedule)
    raise ValueError(
        f"schedule {schedule!r} is neither a file nor a shipped schedule; shipped: "
        f"{', '.join(list_shipped())}"
    )


class DiffusolveScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any registered diffusolve solver (module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: diffusers'
            beta configuration (DDPM-family pipelines).
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
            ``"flow_prediction"`` (flow matching; set automatically by :meth:`from_config`
            for a ``FlowMatch*`` config).
        timestep_spacing, steps_offset: diffusers' spacing (used when ``grid_kind`` is one of
            :data:`SPACINGS`; ``steps_offset`` shifts ``"leading"``).
        shift: flow-matching time shift (as diffusers' flow-matching Euler scheduler; applied
            to the default flow sigmas and to sigmas given by the pipeline);
            ``use_dynamic_shifting``, ``base_shift``, ``max_shift``, ``base_image_seq_len``,
            ``max_image_seq_len``, ``time_shift_type`` and ``shift_terminal`` set the
            resolution-dependent shift and the terminal stretch as in diffusers.
        set_alpha_to_one: DDIM configs' end point (``False``: ``solver="ddim"`` ends at
            ``t = 0``; module docstring); ``None``: not set.
        final_sigmas_type: DPM-Solver configs' end point (``"sigma_min"``: every solver
            ends at ``t = 0``; ``"zero"`` or ``None``: at the x0 estimate).
        lower_order_final: passed to solvers with that option (``None``: their default).
        solver: a registered solver name or alias (``diffusolve solvers``).
        solver_options: options of that solver (a JSON-able dict).
        grid_kind: ``None`` (default: the solver's natural grid on DDPM-family configs; on
            flow configs diffusers' flow sigmas: the pipeline's, else its default linspace,
            shifted by the config), one of :data:`diffusolve.process.GRIDS`, or one of
            :data:`SPACINGS`.
            An explicit ``grid_kind`` takes precedence over sigmas / timesteps passed by a
            pipeline to ``set_timesteps``.
        final: the final policy (``"denoise"``, ``"zero"``, ``"none"``; see
            :func:`diffusolve.sample`); ``None`` (default): the config's end point (module
            docstring).
        schedule: a searched schedule (a JSON file or a shipped name); fixes the grid,
            solver and final policy.

    Example:
        >>> import torch
        >>> from diffusolve.diffusers import DiffusolveScheduler
        >>> s = DiffusolveScheduler(solver="heun", grid_kind="karras")
        >>> s.set_timesteps(7)
        >>> len(s.timesteps), s.order  # 3 Heun steps (2 evaluations each) + the final one
        (7, 2)
        >>> x = torch.randn(1, 2, generator=torch.Generator().manual_seed(0))
        >>> for t in s.timesteps:
        ...     x = s.step(torch.zeros_like(x), t, x).prev_sample  # an x ~ N(0, I) model
        >>> x.shape
        torch.Size([1, 2])
    """

    _compatibles = list(_COMPATIBLES)
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        set_alpha_to_one: bool | None = None,
        final_sigmas_type: str | None = None,
        lower_order_final: bool | None = None,
        solver: str = "dpmpp_2m",
        solver_options: dict[str, Any] | None = None,
        grid_kind: str | None = None,
        final: str | None = None,
        schedule: str | None = None,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; use 'epsilon', "
                "'v_prediction', 'sample' or 'flow_prediction'"
            )
        self.prediction = PREDICTION_TYPES[prediction_type]
        self.flow = self.prediction == "velocity"
        self.process: Process = self._make_process()
        if final is not None and final not in FINALS:
            raise ValueError(f"final must be None or one of {FINALS}, got {final!r}")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}"
            )
        if final_sigmas_type not in (None, "zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type must be None, 'zero' or 'sigma_min', got {final_sigmas_type!r}"
            )
        kinds = GRIDS + (() if self.flow else SPACINGS)
        if grid_kind is not None and grid_kind not in kinds:
            raise ValueError(
                f"grid_kind must be None or one of {kinds} for this "
                f"{'flow-matching' if self.flow else 'DDPM-family'} config, got {grid_kind!r}"
            )
        if solver_options is not None and not isinstance(solver_options, dict):
            raise TypeError(f"solver_options must be a dict, got {type(solver_options).__name__}")
        try:
            json.dumps(solver_options)
        except TypeError as err:
            raise TypeError(
                f"solver_options must be JSON-able (saved in the config): {err}"
            ) from None
        self.schedule = None
        if schedule is not None:
            self.schedule = _load_schedule(schedule)
            self.schedule.check_process(self.process)
            self.solver: Solver = self.schedule.solver_object()
        else:
            self.solver = get_solver(solver, **(solver_options or {}))
            if (
                lower_order_final is not None
                and "lower_order_final" not in (solver_options or {})
                and hasattr(self.solver, "lower_order_final")
            ):
                self.solver = self.solver.replace(lower_order_final=bool(lower_order_final))
        #: the final policy and whether the grid ends at t = 0 (the config's end point)
        self.final, self.end_at_zero = self._resolve_final(final)
        self.order = self.solver.evals_per_step
        self.init_noise_sigma = 1.0
        self._local = threading.local()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' ``from_config`` (keyword arguments override the config); a
        flow-matching config (``FlowMatch*``: a ``shift`` and no betas) sets
        ``prediction_type="flow_prediction"`` (those configs have no prediction type)."""
        cfg = dict(getattr(config, "config", config) or {})
        flow_cfg = "FlowMatch" in str(cfg.get("_class_name", "")) or (
            "shift" in cfg and "beta_schedule" not in cfg and "prediction_type" not in cfg
        )  # a flow-matching scheduler's config (an instance's config has no class name)
        if flow_cfg and "prediction_type" not in kwargs:
            kwargs["prediction_type"] = "flow_prediction"
        # diffusers skips a config's keys that held its class's defaults when it was made
        # ("_use_default_values"); those defaults are the config's meaning here (e.g. the
        # DPM-Solver scheduler's lower_order_final=True), so they are passed explicitly
        own = set(inspect.signature(cls.__init__).parameters) - {"self"}
        for k in cfg.get("_use_default_values", []):
            if k in own and k not in kwargs and k in cfg:
                kwargs[k] = cfg[k]
        ignored = [
            f"{k}={cfg[k]!r}" for k, default in _IGNORED.items() if k in cfg and cfg[k] != default
        ]
        if "DPMSolver" in str(cfg.get("_class_name", "")) and cfg.get("solver_type") == "heun":
            ignored.append("solver_type='heun'")
        if ignored:
            warnings.warn(
                f"DiffusolveScheduler ignores these options of the {cfg.get('_class_name', '')} "
                f"config: {', '.join(ignored)} (it runs solver/grid_kind/solver_options as "
                "given; e.g. grid_kind='karras' for Karras sigmas)",
                stacklevel=2,
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _resolve_final(self, final: str | None) -> tuple[str, bool]:
        """The final policy and whether the grid ends at ``t = 0`` (module docstring)."""
        if self.schedule is not None:
            return self.schedule.final, False
        cfg = self.config
        end_at_zero = not self.flow and (
            cfg.final_sigmas_type == "sigma_min"
            or (cfg.set_alpha_to_one is False and self.solver.name == "ddim")
        )
        if final is not None:
            return final, end_at_zero and final == "none"
        return ("none", True) if end_at_zero else ("denoise", False)

    def _make_process(self) -> Process:
        cfg = dict(self.config)
        n = int(cfg["num_train_timesteps"])
        if self.flow:
            return rectified_flow(t_min=1.0 / n, t_max=1.0 - 1.0 / n)
        return from_scheduler_config({k: v for k, v in cfg.items() if k != "prediction_type"})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)  # per-thread generation state is not copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ------------------------------------------------------------------ units
    def _to_pipeline(self, t: Tensor) -> Tensor:
        return t * self.config.num_train_timesteps if self.flow else t

    def _from_pipeline(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return t / self.config.num_train_timesteps if self.flow else t

    # ------------------------------------------------------------------ per-thread state
    @property
    def _run(self) -> dict[str, Any]:
        run = getattr(self._local, "run", None)
        if run is None:
            raise RuntimeError(
                "call set_timesteps(num_inference_steps) first (in this thread: a "
                "DiffusolveScheduler keeps each generation's state per thread)"
            )
        return run

    @property
    def timesteps(self) -> Tensor:
        """The model evaluations of the solve, in the pipeline's units (float32)."""
        return self._run["timesteps"]

    @property
    def sigmas(self) -> Tensor:
        """``sigma / alpha`` at every entry of :attr:`timesteps`, then 0 (diffusers'
        convention; flow matching: the flow time ``sigma``)."""
        return self._run["sigmas"]

    @property
    def num_inference_steps(self) -> int | None:
        run = getattr(self._local, "run", None)
        return None if run is None else run["num_inference_steps"]

    @property
    def grid(self) -> Tensor:
        """The time grid the solver runs, in our process's units (float64); on a flow grid
        from sigma = 1 it starts after the entry step (at ``timesteps[1] / N``)."""
        return self._run["grid"]

    @property
    def step_index(self) -> int | None:
        run = getattr(self._local, "run", None)
        return None if run is None else run["index"]

    @property
    def begin_index(self) -> int:
        run = getattr(self._local, "run", None)
        return 0 if run is None else run["begin"]

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at entry ``begin_index`` of :attr:`timesteps` (image-to-image pipelines).

        The entry must start a grid step; the solve then starts there with fresh solver
        state (multistep solvers warm up again), so its evaluations must be the remaining
        entries: checked at the first :meth:`step`.
        """
        run = self._run
        run["begin"] = int(begin_index)
        run["index"] = int(begin_index)

    # ------------------------------------------------------------------ the grid
    def _grid(
        self,
        n_steps: int,
        sigmas: Sequence[float] | None,
        timesteps: Sequence[float] | None,
        mu: float | None,
    ) -> Tensor:
        """A DDPM-family grid of ``n_steps`` steps (ending at ``t = 0`` with ``end_at_zero``)."""
        cfg, p, kind = self.config, self.process, self.config.grid_kind
        if kind in GRIDS or (kind is None and timesteps is None and sigmas is None):
            # a grid kind, default the solver's natural one (both end at t_min = 0)
            return make_grid(p, n_steps, kind or self.solver.natural_grid)
        if sigmas is not None:
            raise ValueError(
                "sigmas= is for flow-matching configs; pass timesteps= or set grid_kind"
            )
        if kind in SPACINGS:
            n_train, offset = int(cfg.num_train_timesteps), int(cfg.steps_offset)
            n_eval = n_steps if self.end_at_zero else n_steps + 1
            if kind == "linspace" and cfg.final_sigmas_type is not None:
                # DPM-Solver configs' linspace: n + 1 times from N - 1 to 0, the 0 dropped
                g = _spacing(kind, n_eval + 1, n_train, offset)[:-1]
            else:
                g = _spacing(kind, n_eval, n_train, offset)
            if self.end_at_zero:  # the evaluation times, then the config's end point t = 0
                g = np.append(g, 0.0) if g[-1] > 0 else _spacing(kind, n_steps + 1, n_train, offset)
        else:
            g = _resample(self._from_pipeline(torch.as_tensor(timesteps)).tolist(), n_steps + 1)
        g = np.clip(g, p.t_min, p.t_max)
        return check_grid(p, torch.as_tensor(g, dtype=torch.float64))

    def _flow_sigmas(self, n: int, sigmas: Sequence[float] | None, mu: float | None) -> np.ndarray:
        """``n`` flow sigmas exactly as diffusers' flow-matching Euler scheduler computes them
        (float32, then float64): the default ``linspace`` over the (shifted) training range
        or the given ``sigmas``, then the static or dynamic shift, then ``shift_terminal``."""
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError(
                "use_dynamic_shifting=True needs mu (flow pipelines pass it to set_timesteps)"
            )
        if sigmas is None:
            train = torch.arange(n_train, 0, -1, dtype=torch.float32) / n_train
            if not cfg.use_dynamic_shifting:
                train = cfg.shift * train / (1 + (cfg.shift - 1) * train)
            hi, lo = train[0].item() * n_train, train[-1].item() * n_train
            s = np.linspace(hi, lo, n) / n_train
        else:
            s = np.asarray(sigmas).astype(np.float32)
        if cfg.use_dynamic_shifting:
            e = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
            s = e / (e + (1 / s - 1) ** 1.0)
        else:
            s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
        if cfg.shift_terminal:
            z = 1 - s
            s = 1 - z / (z[-1] / (1 - cfg.shift_terminal))
        return np.asarray(s).astype(np.float32).astype(np.float64)

    def _flow_grid(
        self,
        nfe: int,
        sigmas: Sequence[float] | None,
        timesteps: Sequence[float] | None,
        mu: float | None,
        final: str,
    ) -> tuple[float | None, int, Tensor]:
        """``(entry, n_steps, grid)`` for a flow config: ``entry`` is the first sigma when it
        lies above ``t_max`` (the entry step, module docstring), else ``None``."""
        p, kind = self.process, self.config.grid_kind
        if kind in GRIDS:
            n_steps = steps_for_nfe(self.solver, nfe, final)
            return None, n_steps, make_grid(p, n_steps, kind)
        if timesteps is not None and sigmas is None:
            s = self._from_pipeline(torch.as_tensor(timesteps)).numpy()
        else:
            s = self._flow_sigmas(nfe, sigmas, mu)
        entry = float(s[0]) if s[0] > p.t_max else None
        if entry is not None:
            if s.size < 2:
                raise ValueError("a flow grid from sigma = 1 needs at least two sigmas")
            s = s[1:]
            nfe -= 1  # the entry step's evaluation
        try:
            n_steps = steps_for_nfe(self.solver, nfe, final)
        except ValueError as err:
            raise ValueError(
                f"{err} (a flow grid starting at sigma = 1 spends one evaluation on the entry "
                "step: ask for one more step)"
            ) from None
        g = np.clip(_resample(s, n_steps + 1), p.t_min, p.t_max)
        return entry, n_steps, check_grid(p, torch.as_tensor(g, dtype=torch.float64))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """Build the grid and the list of evaluations for one generation (resets the
        solver's state and history).

        Args:
            num_inference_steps: the NFE budget (ignored with a ``schedule``); default the
                length of ``timesteps`` / ``sigmas`` when those are given.
            device: where :attr:`timesteps` live.
            sigmas: flow-matching sigmas (shifted by the config, as diffusers does);
                resampled to the solver's number of grid points.
            mu: the dynamic shift of flow pipelines (``use_dynamic_shifting``).
            timesteps: grid times in the pipeline's units, resampled likewise.
        """
        final, entry = self.final, None
        if self.schedule is not None:
            grid = self.schedule.grid_tensor()
        else:
            if num_inference_steps is None:
                given = timesteps if timesteps is not None else sigmas
                if given is None:
                    raise ValueError("give num_inference_steps (or timesteps / sigmas)")
                num_inference_steps = len(given)
            nfe = int(num_inference_steps)
            if self.flow:
                entry, _, grid = self._flow_grid(nfe, sigmas, timesteps, mu, final)
            else:
                grid = self._grid(steps_for_nfe(self.solver, nfe, final), sigmas, timesteps, mu)
        solved = evaluation_times(self.solver, self.process, grid, final)
        times = torch.tensor(([entry] if entry is not None else []) + solved)
        st = self.process.sigma_tilde(times).to(torch.float32)
        if self.flow:
            st = times.to(torch.float32)
        self._local.run = {
            "grid": grid,
            "entry": entry,
            "final": final,
            "times": times,
            "timesteps": self._to_pipeline(times).to(torch.float32).to(device),
            "sigmas": torch.cat([st, st.new_zeros(1)]).to(device),
            "num_inference_steps": int(num_inference_steps or len(times)),
            "index": 0,
            "begin": 0,
            "solve": None,
        }

    # ------------------------------------------------------------------ the interface
    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity: the pipeline's latents are the process's state."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DiffusolveSchedulerOutput | tuple[Tensor, Tensor]:
        """Take the network output at the current entry and return the next query point
        (or, after the last entry, the result) as ``prev_sample``."""
        run = self._run
        k = run["index"]
        times = run["times"]
        if k >= times.numel():
            raise RuntimeError(
                f"step() called {k + 1} times for {times.numel()} timesteps; call set_timesteps "
                "before each generation"
            )
        expected = float(run["timesteps"][k])
        got = float(timestep) if not isinstance(timestep, Tensor) else float(timestep.flatten()[0])
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(
                f"step() got timestep {got:g} but entry {k} of this scheduler's timesteps is "
                f"{expected:g}; step through scheduler.timesteps in order"
            )
        if k == 0 and run["entry"] is not None and run["begin"] == 0:
            return self._entry_step(run, model_output, sample, return_dict)
        solve: PushSolve | None = run["solve"]
        if solve is None:
            solve = self._start(run, sample)
        solve.set_generator(generator)
        t = solve.query[1]  # type: ignore[index]
        x0 = to_x0(self.process, sample, t, model_output.to(sample.dtype), self.prediction)
        solve.query = (sample, t)  # the point the network was actually evaluated at
        solve.feed(x0)
        run["index"] = k + 1
        out = solve.result if solve.done else solve.query[0]  # type: ignore[index]
        if not return_dict:
            return (out, x0)
        return DiffusolveSchedulerOutput(prev_sample=out, pred_original_sample=x0)

    def _entry_step(
        self, run: dict[str, Any], velocity: Tensor, sample: Tensor, return_dict: bool
    ) -> DiffusolveSchedulerOutput | tuple[Tensor, Tensor]:
        """The first-order step from ``t_0 > t_max`` (sigma = 1: pure noise) to the grid's
        first time: ``x + (t_1 - t_0) v``, with ``x0 = x - t_0 v``."""
        t0, t1 = run["entry"], float(run["grid"][0])
        v = velocity.to(sample.dtype)
        x0 = sample - t0 * v
        run["index"] = 1
        out = sample + (t1 - t0) * v
        if not return_dict:
            return (out, x0)
        return DiffusolveSchedulerOutput(prev_sample=out, pred_original_sample=x0)

    def _start(self, run: dict[str, Any], sample: Tensor) -> PushSolve:
        grid, begin = run["grid"], run["begin"]
        if begin:
            t0 = float(run["times"][begin])
            hits = [i for i, t in enumerate(grid.tolist()) if t == t0]
            if not hits:
                raise ValueError(
                    f"begin index {begin} is a stage of a multi-stage step, not a grid time"
                )
            grid = grid[hits[0] :]
            rest = evaluation_times(self.solver, self.process, grid, run["final"])
            if rest != run["times"][begin:].tolist():
                raise ValueError(
                    f"{self.solver.name} restarted at entry {begin} evaluates at other times "
                    "than the remaining timesteps (its warm-up differs); use a solver with one "
                    "evaluation per step for image-to-image"
                )
        solve = PushSolve(self.solver, self.process, grid, sample, run["final"])
        run["solve"] = solve
        return solve

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at ``timesteps`` (pipeline units, per sample)."""
        t = self._from_pipeline(torch.as_tensor(timesteps).to("cpu")).flatten()
        a = self.process.alpha(t).to(original_samples.dtype).to(original_samples.device)
        s = self.process.sigma(t).to(original_samples.dtype).to(original_samples.device)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return a.reshape(shape) * original_samples + s.reshape(shape) * noise

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """Flow matching's name for :meth:`add_noise` (``(1 - t) x0 + t noise``)."""
        t = torch.as_tensor(timestep).flatten()
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        return self.add_noise(sample, noise, t)
