"""The methods of ``diffusolve bench accel``: how each one samples, what it weighs on disk,
and the CPU time and memory of one batch.

Every method samples the bundled digits model (or a few-step model distilled from it) with
class labels ``i % 10``; all but the few-step models start from the same noise (per-sample
seeds ``seed + 1 + i``). Families:

* ``float``: the float model with a registered solver (the baseline ``dpmpp_2m`` at 20
  steps, the teacher's best solver at NFE 5, 10 and 50).
* ``quant``: post-training quantization (:mod:`diffusolve.accel.quant`) calibrated on the
  float model's own ``dpmpp_2m`` trajectories from separate starts, sampled like the
  baseline. W8A8 with Q-Diffusion's uniform time-step calibration, PTQ4DM's normally
  distributed time-step calibration and EDA-DM's temporal distribution alignment (TDAC),
  W4A8 with PTQ4DM, EDA-DM with block reconstruction when :mod:`~diffusolve.accel.quant`
  provides it, and the real int8 CPU path (:func:`~diffusolve.accel.quant.int8_dynamic`).
* ``cache``: feature caching (:mod:`diffusolve.accel.cache`) at the baseline's solver and
  steps: DeepCache uniform intervals 2 and 3, a non-uniform (quadratic, interval 3)
  schedule, encoder propagation with and without the prior-noise injection.
* ``fewstep``: the distilled models of :mod:`diffusolve.models.fewstep` at NFE 1, 2, 4 with
  their own recipe (``fewstep_recipe``) and starts (``sample_fewstep``'s seed).

The NFE of a method is the number of network calls it really made (``stats["nfe"]`` of
``diffusolve.sample``; for a few-step model, the calls of its UNet counted by a forward
hook). Classifier-free guidance doubles the batch inside one call.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Method",
    "MissingWeights",
    "SOLVER",
    "STEPS",
    "TEACHER_SOLVERS",
    "TEACHER_NFES",
    "FEWSTEP_NFES",
    "methods",
    "steps_for_nfe",
    "generate",
    "disk_bytes",
    "model_bytes",
    "measure_batch",
    "fewstep_names",
]

#: the teacher's own solver and steps: the baseline every ratio refers to
SOLVER = "dpmpp_2m"
STEPS = 20
#: the solvers the teacher's best is picked from, and its NFEs
TEACHER_SOLVERS = ("dpmpp_2m", "unipc_bh2_2", "dpm_solver_3m")
TEACHER_NFES = (5, 10, 50)
FEWSTEP_NFES = (1, 2, 4)
CHUNK = 250


class MissingWeights(RuntimeError):
    """A method's weights are not in this checkout (a few-step model not trained yet)."""


@dataclass(frozen=True)
class Method:
    """One bench method.

    Attributes:
        name: the record's ``method`` (``float``, ``teacher``, ``w8a8-uniform``, ...).
        setting: the record's ``setting`` (``dpmpp_2m/20``, ``nfe=10``, ...).
        family: ``float``, ``quant``, ``cache`` or ``fewstep``.
        solver: the registered solver (``""``: a few-step model's own recipe).
        steps: solver steps (a few-step model: its NFE).
        option: family detail (quant: calibration/bits; cache: schedule; fewstep: model).
        rank: simplicity within the family (0 simplest; the table's notes compare a method
            with the simpler ones and with the float solver points).
    """

    name: str
    setting: str
    family: str
    solver: str
    steps: int
    option: str = ""
    rank: int = 0

    @property
    def label(self) -> str:
        if self.family == "float" and self.name == "float":
            return f"float {self.solver} {self.steps} steps (baseline)"
        if self.name == "teacher":
            return f"teacher {self.solver} {self.setting.replace('=', ' ')}"
        if self.family == "fewstep":
            return f"{self.option} {self.setting.replace('=', ' ')}"
        return self.name


# ----------------------------------------------------------------------------- catalogue

QUANT = {
    # name: (weight bits, calibration, reconstruct, rank)
    "w8a8-uniform": (8, "uniform", False, 0),
    "w8a8-ptq4dm": (8, "ptq4dm", False, 1),
    "w8a8-tdac": (8, "tdac", False, 1),
    "w4a8-ptq4dm": (4, "ptq4dm", False, 1),
    "w8a8-edadm": (8, "tdac", True, 2),
}
CACHE = {
    # name: (kind, interval, prior-noise injection, rank); DeepCache at the paper's branch 0
    # (cached calls run conv_in and the last up layer) unless CACHE_OPTIONS says otherwise
    "deepcache-2": ("deepcache", 2, False, 0),
    "deepcache-3": ("deepcache", 3, False, 0),
    "deepcache-nonuniform-3": ("nonuniform", 3, False, 1),
    "deepcache-2-block0": ("deepcache", 2, False, 1),
    "deepcache-forecast-2": ("deepcache", 2, False, 1),
    "deepcache-forecast-3": ("deepcache", 3, False, 1),
    "encprop": ("encprop", 0, False, 0),
    "encprop-noise": ("encprop", 0, True, 1),
}
#: DeepCache options other than the defaults (branch 0, plain reuse): the whole first block
#: (block-level branch 0, (block, layer) = (0, 1) on the bundled UNet), the shallowest
#: branch of a block-level cache; the linear feature forecast (``forecast=1``), chosen over
#: reuse and over the quadratic forecast on separate starts (see docs/api/accel.md)
CACHE_OPTIONS: dict[str, dict[str, Any]] = {
    "deepcache-2-block0": {"branch": (0, 1)},
    "deepcache-forecast-2": {"forecast": 1},
    "deepcache-forecast-3": {"forecast": 1},
}


def _cache_option(name: str) -> str:
    kind, interval = CACHE[name][:2]
    extra = "".join(f":{k}={v}" for k, v in CACHE_OPTIONS.get(name, {}).items())
    return f"{kind}:{interval}{extra}"


def fewstep_names() -> tuple[str, ...]:
    """The bundled few-step models (:data:`diffusolve.models.fewstep.FEWSTEP_MODELS`)."""
    from ..models.fewstep import FEWSTEP_MODELS

    return tuple(FEWSTEP_MODELS)


#: the real int8 CPU program (torchao PT2E, Inductor-compiled once per batch shape: minutes
#: each on one thread, so only the full run has it)
REAL_INT8 = "int8-pt2e"


def methods(teacher_solver: str | None, real_int8: bool = False) -> list[Method]:
    """Every method in report order; the teacher's NFE points only once its solver is
    chosen (``teacher_solver``); the real int8 program when ``real_int8``."""
    out = [Method("float", f"{SOLVER}/{STEPS}", "float", SOLVER, STEPS)]
    if teacher_solver is not None:
        for nfe in TEACHER_NFES:
            steps = steps_for_nfe(teacher_solver, nfe)
            out.append(Method("teacher", f"nfe={nfe}", "float", teacher_solver, steps))
    for name, (bits, cal, _recon, rank) in QUANT.items():
        out.append(Method(name, f"{SOLVER}/{STEPS}", "quant", SOLVER, STEPS, f"{bits}:{cal}", rank))
    out.append(Method("int8-dynamic", f"{SOLVER}/{STEPS}", "quant", SOLVER, STEPS, "int8", 0))
    if real_int8:
        out.append(Method(REAL_INT8, f"{SOLVER}/{STEPS}", "quant", SOLVER, STEPS, "int8:tdac", 1))
    for name, (*_, rank) in CACHE.items():
        out.append(
            Method(name, f"{SOLVER}/{STEPS}", "cache", SOLVER, STEPS, _cache_option(name), rank)
        )
    for model in fewstep_names():
        for nfe in FEWSTEP_NFES:
            out.append(Method(model, f"nfe={nfe}", "fewstep", "", nfe, model))
    return out


# ----------------------------------------------------------------------------- models


@lru_cache(maxsize=1)
def _float_model() -> Any:
    from ..models import load

    return load("digits")


@cache
def count_nfe(solver: str, steps: int) -> int:
    """Network calls of a ``steps``-step ``solver`` solve (``final="denoise"``), counted on a
    denoiser that predicts zero at no cost."""
    from ..models.base import Denoiser
    from ..solvers import sample

    process = _float_model().process

    class Zero(Denoiser):
        def __init__(self) -> None:
            self.process = process

        def denoise(self, x: Tensor, t: Tensor, c: Any = None) -> Tensor:
            return torch.zeros_like(x)

    stats: dict[str, Any] = {}
    sample(Zero(), torch.zeros(1, 1, 2, 2), steps, solver, stats=stats, progress=False)
    return int(stats["nfe"])


@cache
def steps_for_nfe(solver: str, nfe: int) -> int:
    """The fewest steps whose solve makes exactly ``nfe`` network calls; a ``ValueError``
    when no step count does."""
    for steps in range(1, nfe + 1):
        try:
            n = count_nfe(solver, steps)
        except ValueError:  # too few steps for the solver's order
            continue
        if n == nfe:
            return steps
        if n > nfe:
            break
    raise ValueError(f"no step count gives {solver} exactly {nfe} network evaluations")


@lru_cache(maxsize=4)
def _trajectories(seed: int, n_traj: int) -> Any:
    """The float model's ``dpmpp_2m`` trajectories (with mid-block features) from starts
    ``seed + 10**6 + i``, labels ``i % 10``: the calibration data of every quantizer."""
    from ..accel.quant import collect_trajectories

    model = _float_model()
    x = model.process.prior_sample(
        (n_traj, 1, 16, 16), noise=list(range(seed + 10**6, seed + 10**6 + n_traj))
    )
    return collect_trajectories(
        model, x, STEPS, SOLVER, cond=torch.arange(n_traj) % 10, features=True
    )


def _calibration(kind: str, seed: int, n_traj: int, n_cal: int) -> Any:
    from ..accel import quant

    tr = _trajectories(seed, n_traj)
    if kind == "uniform":  # Q-Diffusion: every step, n_cal / S samples at each
        return quant.uniform_calibration(tr, cali_st=tr.steps, cali_n=max(1, n_cal // tr.steps))
    if kind == "ptq4dm":
        return quant.ptq4dm_calibration(tr, n=n_cal, seed=seed)
    if kind == "tdac":
        return quant.tdac_calibration(tr, n=n_cal, seed=seed)
    raise ValueError(f"unknown calibration {kind!r}")


@lru_cache(maxsize=8)
def quantized(name: str, seed: int, n_traj: int, n_cal: int, recon_iters: int = 300) -> Any:
    """The quantized model of method ``name`` (a key of ``QUANT``, ``int8-dynamic`` or
    :data:`REAL_INT8`);
    EDA-DM's block reconstruction runs ``recon_iters`` steps per block."""
    from ..accel import quant

    model = _float_model()
    if name == "int8-dynamic":
        return quant.int8_dynamic(model)
    if name == REAL_INT8:  # static int8 of every conv / linear layer, TDAC-calibrated
        try:
            quant._require_torchao()
        except ImportError as e:
            raise MissingWeights(f"{e}; or pip install 'diffusolve[accel]'") from None
        return quant.real_int8(model, _calibration("tdac", seed, n_traj, n_cal))
    bits, cal, recon, _ = QUANT[name]
    cfg = quant.QuantConfig(weight_bits=bits, act_bits=8)
    calib = _calibration(cal, seed, n_traj, n_cal)
    if not recon:
        return quant.quantize(model, cfg, calib, seed=seed)
    from ..accel.recon import BlockReconstruction

    opts = BlockReconstruction(iters=recon_iters, seed=seed)
    return quant.quantize(model, cfg, calib, seed=seed, reconstruct=opts)


# ----------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def _cache(method: Method, nfe: int) -> Iterator[Any]:
    from ..accel import CacheSchedule, deep_cache, encoder_propagation, find_unet

    kind, interval, _noise, _ = CACHE[method.name]
    unet = find_unet(_float_model())
    opts = CACHE_OPTIONS.get(method.name, {})
    if kind == "deepcache":
        ctx = deep_cache(unet, CacheSchedule.uniform(nfe, interval), **opts)
    elif kind == "nonuniform":
        ctx = deep_cache(unet, CacheSchedule.nonuniform(nfe, interval), **opts)
    else:
        ctx = encoder_propagation(unet, nfe)
    with ctx as run:
        yield run


def _base_model(method: Method, cfg: dict[str, Any]) -> Any:
    if method.family == "quant":
        return quantized(
            method.name, cfg["seed"], cfg["n_traj"], cfg["n_cal"], cfg.get("recon_iters", 300)
        )
    return _float_model()


def _guided(model: Any, guidance: float | None) -> Any:
    if guidance is None:
        return model
    from ..guidance import classifier_free

    return classifier_free(model, guidance)


class _CallCounter:
    """Counts forward calls of diffusers UNets (a global module pre-hook while active)."""

    def __enter__(self) -> _CallCounter:
        self.calls = 0

        def hook(module: torch.nn.Module, args: Any) -> None:
            if type(module).__name__ in ("UNet2DModel", "UNet2DConditionModel"):
                self.calls += 1

        self._h = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._h.remove()


@lru_cache(maxsize=4)
def _fewstep_model(name: str) -> Any:
    """The few-step model ``name`` loaded once (``diffusolve.models.load``; it carries its
    recipe), or :class:`MissingWeights` with the loader's message (the train command)."""
    from ..models import load
    from ..models.fewstep import fewstep_recipe

    try:
        fewstep_recipe(name)
        return load(name)
    except FileNotFoundError as e:
        raise MissingWeights(str(e)) from None


def _fewstep_batch(
    method: Method, n: int, labels: Tensor, seed: int, guidance: float | None
) -> tuple[Tensor, int]:
    """``n`` samples of a few-step model (sample ``i`` seeded ``seed + i``) and the
    network calls they took (UNet forwards counted by a hook)."""
    from ..models.fewstep import sample_fewstep

    model = _fewstep_model(method.option)
    try:
        with _CallCounter() as count, torch.no_grad():
            out = sample_fewstep(
                model,
                n,
                method.steps,
                labels,
                seed,
                guidance=1.0 if guidance is None else float(guidance),
            )
    except FileNotFoundError as e:
        raise MissingWeights(str(e)) from None
    if count.calls == 0:
        raise RuntimeError(
            f"{method.option}: no UNet call was seen while sampling, so its NFE is unknown"
        )
    return out.detach(), count.calls


def generate(
    method: Method, n: int, seed: int, cfg: dict[str, Any], guidance: float | None = None
) -> tuple[Tensor, int]:
    """``n`` samples of ``method`` (labels ``i % 10``; starts ``seed + 1 + i``), in chunks of
    250; returns them and the network calls of one chunk's solve. ``guidance``: the CFG
    scale (``None``: the conditional model)."""
    labels = torch.arange(n) % 10
    outs, nfe = [], 0
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        x, nfe = sample_batch(method, lo, hi, labels[lo:hi], seed, cfg, guidance)
        outs.append(x)
    return torch.cat(outs), nfe


def sample_batch(
    method: Method,
    lo: int,
    hi: int,
    labels: Tensor,
    seed: int,
    cfg: dict[str, Any],
    guidance: float | None,
) -> tuple[Tensor, int]:
    """Samples ``lo .. hi - 1`` of ``method`` and the network calls of their solve."""
    from ..solvers import sample

    if method.family == "fewstep":
        return _fewstep_batch(method, hi - lo, labels, seed + 1 + lo, guidance)
    model = _guided(_base_model(method, cfg), guidance)
    x = model.process.prior_sample(
        (hi - lo, 1, 16, 16), noise=list(range(seed + 1 + lo, seed + 1 + hi))
    )
    stats: dict[str, Any] = {}
    kw: dict[str, Any] = {"cond": labels, "stats": stats, "progress": False}
    with torch.no_grad():
        if method.family != "cache":
            out = sample(model, x, method.steps, method.solver, **kw)
            return out.detach(), stats["nfe"]
        nfe = count_nfe(method.solver, method.steps)
        if CACHE[method.name][2]:
            from ..accel import prior_noise_injection

            kw["callback"] = prior_noise_injection(x, float(model.process.t_max))
        with _cache(method, nfe):
            out = sample(model, x, method.steps, method.solver, **kw)
    if stats["nfe"] != nfe:
        raise RuntimeError(f"{method.name}: {stats['nfe']} calls, schedule for {nfe}")
    return out.detach(), stats["nfe"]


# ----------------------------------------------------------------------------- sizes


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        if obj.is_quantized:
            return obj.int_repr().numel() * 1
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def model_bytes(model: Any) -> int:
    """Bytes of the network's state (parameters and buffers; int8 packed weights of the
    dynamic path at one byte each) as held in memory. The compiled int8 program
    (``int8-pt2e``) counts the float network it keeps to build a program per shape; the
    programs' own int8 weights show in the measured resident-set growth instead."""
    from ..accel.quant import find_unet  # any network module, Int8Network included

    return sum(_tensor_bytes(v) for v in find_unet(model).state_dict().values())


def disk_bytes(method: Method, cfg: dict[str, Any]) -> tuple[int, str]:
    """Bytes of the method's saved weights and what was saved: the float UNet as
    safetensors, a fake-quant model by ``save_quantized`` (int8, int4 packed), the dynamic
    int8 model by ``torch.save`` of its state dict, a few-step model's folder."""
    from safetensors.torch import save_file

    from ..accel import find_unet, save_quantized

    if method.family == "fewstep":
        folder = _fewstep_folder(method.option)
        if folder is None:
            return -1, "no weights folder"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return size, "model folder (all files)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights"
        if method.family == "quant" and method.name == "int8-dynamic":
            torch.save(find_unet(_base_model(method, cfg)).state_dict(), path)
            return path.stat().st_size, "torch.save state dict (int8 Linear packed)"
        if method.family == "quant":
            save_quantized(_base_model(method, cfg), path)
            return path.stat().st_size, "save_quantized safetensors"
        state = {k: v.contiguous() for k, v in find_unet(_float_model()).state_dict().items()}
        save_file(state, str(path))
        return path.stat().st_size, "float UNet safetensors"


def _fewstep_folder(name: str) -> Path | None:
    """The folder of few-step model ``name``: a bundled name's packaged folder, or ``name``
    itself when it is a folder (``None`` when there are no weights)."""
    from ..models.bundled import asset_dir

    if Path(name).is_dir():
        return Path(name)
    try:
        return asset_dir(name)
    except (FileNotFoundError, ValueError):
        return None


# ----------------------------------------------------------------------------- speed


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> bool:
    """Free what Python and the C heap can give back, then reset the kernel's peak-RSS mark
    (``/proc/self/clear_refs`` 5, Linux >= 4.0); ``False`` where that is unavailable."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_batch(
    method: Method, batch: int, seed: int, cfg: dict[str, Any], memory: bool = False
) -> dict[str, float]:
    """CPU seconds per sample of one batch (``time.process_time``: this process, all its
    threads) and, with ``memory``, the peak growth of the resident set while it ran (bytes:
    ``VmHWM`` after a reset minus ``VmRSS`` before, heap trimmed first)."""
    labels = torch.arange(batch) % 10
    mem = None
    if memory and _reset_peak():
        before = _status()["VmRSS"]
    else:
        memory = False
    t = time.process_time()
    _, nfe = sample_batch(method, 0, batch, labels, seed, cfg, None)
    cpu = (time.process_time() - t) / batch
    if memory:
        mem = max(_status()["VmHWM"] - before, 0)
    out: dict[str, float] = {"cpu_s_per_sample": cpu, "nfe": nfe}
    if mem is not None:
        out["peak_rss_growth"] = float(mem)
    return out


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return float("nan") if n == 0 else (v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def speed_runner(
    methods_: list[Method], batch: int, repeats: int, seed: int, cfg: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """A function measuring every method of ``methods_`` in one process, interleaved: a
    warm-up of 2 samples each (builds or loads the model), then ``repeats`` rounds over all
    methods of one ``batch`` each, every batch from a trimmed heap and a reset peak mark.
    Per method: the medians over the rounds of the CPU time per sample and of the peak RSS
    growth (every round's figure kept), and the in-memory bytes of its network. A method
    whose weights are missing is reported so."""

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        live = []
        for m in methods_:
            key = f"{m.name}|{m.setting}"
            try:
                measure_batch(m, 2, seed, cfg)
                live.append((key, m))
                out[key] = {"repeats": []}
            except MissingWeights as e:
                out[key] = {"status": "missing", "message": str(e)}
        for _ in range(repeats):
            for key, m in live:
                got = measure_batch(m, batch, seed, cfg, memory=True)
                out[key]["repeats"].append(got["cpu_s_per_sample"])
                out[key].setdefault("rss_repeats", []).append(got.get("peak_rss_growth"))
                out[key]["nfe"] = got["nfe"]
        for key, m in live:
            out[key]["cpu_s_per_sample"] = median(out[key]["repeats"])
            rss = [v for v in out[key].pop("rss_repeats") if v is not None]
            if rss:
                out[key]["rss_repeats"] = rss
                out[key]["peak_rss_growth"] = median(rss)
            net = _fewstep_model(m.option) if m.family == "fewstep" else _base_model(m, cfg)
            out[key]["model_bytes"] = model_bytes(net)
        return out

    return run
