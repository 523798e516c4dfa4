"""``diffusolve bench samplers``: our solvers vs diffusers' schedulers against exact references.

Tasks are Gaussian-mixture priors (25 components, unequal weights, anisotropic full
covariances) under the DDPM-linear VP process (time in diffusers index units) and under
rectified flow, in ``d = 2`` and ``d = 64``. Every method starts from the same
``x_T`` (prior noise at ``t_max``) and returns an x0 estimate; the reference is the exact
probability-flow ODE solution (DOP853, float64, tight tolerance) from ``(x_T, t_max)`` to
``t_min`` followed by the exact denoiser at ``t_min``.

Both libraries get the same latitude: for each method and NFE every documented setting
(grids / timestep spacings, Karras sigmas, lower-order final steps, final sigma types) is
tried on the first ``n_select`` samples and the winner (lowest mean relative error) is run
on all samples and recorded with its setting.

Example:
    >>> from diffusolve.bench.samplers import run_bench
    >>> out = run_bench(tasks=["gauss-d2-vp"], nfes=[5], n_samples=16, methods=["ddim"],
    ...                 schedulers=["DDIM"], progress=False)
    >>> sorted(out)
    ['bench', 'convention', 'meta', 'records', 'summary', 'tasks']
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..metrics import rel_error, sliced_wasserstein, sw_noise_floor
from ..process import GRIDS, get_process, make_grid
from ..solvers import get_solver, list_solvers, sample, steps_for_nfe
from . import diffusers_runner as dr
from .report import summarize

__all__ = ["CONVENTION", "TASKS", "Task", "build_task", "run_bench", "our_settings"]

CONVENTION = (
    "Every method starts from the same x_T = prior noise at the process's t_max and outputs an "
    "x0 estimate. Reference: the exact probability-flow ODE solution from (x_T, t_max) to t_min "
    "(DOP853, float64, rtol=atol=1e-10; closed form for Gaussian tasks) followed by the exact "
    "denoiser at t_min. Our solvers end with final='denoise' (the final denoise counts as one "
    "NFE) at t_min (setting end=t_min) or, like diffusers' final_sigmas_type='zero' and EDM's "
    "last Euler step to sigma=0, one grid point early (end=early: the second-to-last point of a "
    "grid with one more interval); diffusers schedulers run their own final step. rel_error = mean over samples of "
    "||x - x_ref|| / ||x_ref||; sw = sliced Wasserstein-2 distance of the samples to exact data "
    "samples of the same size (noise floor sw_floor = SW between two independent exact sets). "
    "Diffusers schedulers get the exact model in the parameterisation they expect (epsilon for "
    "the DDPM family, flow velocity for flow_prediction), evaluated at the process time of the "
    "scheduler's own sigma for that call (its integer timestep for DDIM/PNDM). For every method "
    "and NFE, each documented setting is tried on the first n_select samples and the winner is "
    "run on all samples; nfe_used counts the model evaluations actually made (<= nfe). All runs "
    "in float64 unless the record's note says otherwise (diffusers keeps its schedule tensors in "
    "float32, so its coefficients carry ~1e-7 relative round-off even on float64 samples)."
)

#: name -> (prior, dim, process name)
TASKS: dict[str, dict[str, Any]] = {
    "gmm-d2-vp": {"prior": "gmm", "dim": 2, "process": "ddpm-linear"},
    "gmm-d64-vp": {"prior": "gmm", "dim": 64, "process": "ddpm-linear"},
    "gmm-d2-rf": {"prior": "gmm", "dim": 2, "process": "rectified-flow"},
    "gmm-d64-rf": {"prior": "gmm", "dim": 64, "process": "rectified-flow"},
    # the bundled digits UNet (unconditional: null class), float64; the reference is a
    # 1000-step third-order solve (see build_task), checked against a 500-step one
    "digits-unet": {
        "prior": "digits",
        "dim": 256,
        "process": "ddpm-linear",
        # each solve is a UNet run: our strongest solvers of each family only
        "methods": (
            "ddim",
            "dpmpp_2m",
            "dpmpp_3m",
            "unipc_bh1_2",
            "unipc_bh2_2",
            "deis_tab3",
            "ipndm",
            "plms",
        ),
    },
    # small exact tasks for tests and smoke runs
    "gauss-d2-vp": {"prior": "gaussian", "dim": 2, "process": "ddpm-linear"},
    "gauss-d2-rf": {"prior": "gaussian", "dim": 2, "process": "rectified-flow"},
}
FULL_TASKS = ("gmm-d2-vp", "gmm-d64-vp", "gmm-d2-rf", "gmm-d64-rf", "digits-unet")
#: samples for the network task (each solve runs the float32 UNet; solver arithmetic float64)
N_SAMPLES_NETWORK = 32
REFERENCE_STEPS = 1000
QUICK_TASKS = ("gmm-d64-vp", "gmm-d2-rf")
FULL_NFES = (5, 10, 20, 50)
QUICK_NFES = (5, 10)
N_COMPONENTS = 25


@dataclass
class Task:
    """One bench task: a prior with its process, the shared start, reference and data."""

    name: str
    kind: str  # "vp" or "rf"
    model: Any
    x_T: Tensor
    ref: Tensor
    data: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def _prior(spec: dict[str, Any], seed: int) -> Any:
    process = get_process(spec["process"])
    d = int(spec["dim"])
    if spec["prior"] == "gmm":
        from ..models.analytic.gmm import GaussianMixture

        return GaussianMixture.random(d, N_COMPONENTS, process=process, seed=seed)
    from ..models import Gaussian

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(-2, 0, d, dtype=torch.float64)
    mean = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    return Gaussian(mean, (q * evals) @ q.T, process=process)


def _network_task(name: str, n_samples: int, seed: int, sw_projections: int) -> Task:
    """The bundled digits UNet: reference = 1000-step dpmpp_3m solve in float64."""
    from ..models import load
    from ..train.data import load_digits

    # the UNet runs in float32 (float64 convolutions are ~6x slower on CPU); the solver state
    # and coefficients stay float64. cond None = the null class (unconditional)
    model = load("digits", dtype=torch.float32)
    p = model.process
    n_samples = min(n_samples, N_SAMPLES_NETWORK)
    xT = p.prior_sample(
        (n_samples, 1, 16, 16), torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )

    def solve(steps: int) -> Tensor:
        with torch.no_grad():
            return sample(model, xT, make_grid(p, steps, "logsnr"), "dpmpp_3m", progress=False)

    start = time.perf_counter()
    ref = solve(REFERENCE_STEPS)
    ref_seconds = time.perf_counter() - start
    acc = rel_error(solve(REFERENCE_STEPS // 2), ref)
    data = load_digits("heldout")[0].to(torch.float64)
    g = torch.Generator().manual_seed(seed + 2)
    data = data[torch.randperm(data.shape[0], generator=g)[:n_samples]]
    if data.shape[0] < n_samples:
        raise ValueError(f"digits-unet needs at most {data.shape[0]} samples")
    info = {
        "prior": "bundled digits UNet (unconditional, null class)",
        "dim": 256,
        "n_components": None,
        "process": p.name,
        "t_max": p.t_max,
        "t_min": p.t_min,
        "n_samples": n_samples,
        "seed": seed,
        "reference": f"{REFERENCE_STEPS}-step dpmpp_3m (third order), logSNR grid, float64 "
        "solver state (float32 UNet), final denoise at t_min",
        "reference_accuracy": acc,
        "reference_accuracy_is": f"rel. difference to a {REFERENCE_STEPS // 2}-step solve "
        "(an upper bound on the reference's error)",
        "reference_seconds": round(ref_seconds, 3),
        "sw_floor": None,
        "sw_floor_std": None,
        "sw_projections": sw_projections,
        "sw_data": "held-out digits (model samples are not exact data samples; sw is indicative)",
    }
    return Task(name, "vp", model, xT, ref, data, info)


def build_task(name: str, n_samples: int, *, seed: int = 0, sw_projections: int = 128) -> Task:
    """Build a task: prior, ``x_T`` (float64), exact reference, exact data and SW floor."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    spec = TASKS[name]
    if spec["prior"] == "digits":
        return _network_task(name, n_samples, seed, sw_projections)
    model = _prior(spec, seed)
    p = model.process
    d = int(spec["dim"])
    xT = p.prior_sample(
        (n_samples, d), torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    start = time.perf_counter()
    ref = model.reference(xT, p.t_max, p.t_min, final="denoise")
    ref_seconds = time.perf_counter() - start
    if hasattr(model, "reference_accuracy"):
        n_check = min(16, n_samples)
        acc = model.reference_accuracy(xT[:n_check], p.t_max, p.t_min, n_check=n_check)
        acc_text = f"max rel. diff. to a 100x tighter DOP853 solve on {n_check} samples"
    else:
        acc, acc_text = 0.0, "closed form (exact)"
    data = model.sample(n_samples, torch.Generator().manual_seed(seed + 2))
    floor = sw_noise_floor(
        model.sample, n_samples, repeats=3, seed=seed, n_projections=sw_projections
    )
    info = {
        "prior": spec["prior"],
        "dim": d,
        "n_components": N_COMPONENTS if spec["prior"] == "gmm" else 1,
        "process": p.name,
        "t_max": p.t_max,
        "t_min": p.t_min,
        "n_samples": n_samples,
        "seed": seed,
        "reference": "DOP853 float64 PF-ODE + exact denoiser"
        if spec["prior"] == "gmm"
        else "closed form",
        "reference_accuracy": acc,
        "reference_accuracy_is": acc_text,
        "reference_seconds": round(ref_seconds, 3),
        "sw_floor": floor["mean"],
        "sw_floor_std": floor["std"],
        "sw_projections": sw_projections,
    }
    kind = "rf" if spec["process"] == "rectified-flow" else "vp"
    return Task(name, kind, model, xT, ref, data, info)


# ----------------------------------------------------------------------------- our side
def deterministic_solvers() -> list[str]:
    """Registered solvers whose default preset is deterministic."""
    return [n for n in list_solvers() if not get_solver(n).stochastic]


def our_settings(name: str, quick: bool = False) -> list[dict[str, Any]]:
    """Grid kinds (natural first) x ``lower_order_final`` where the solver has it."""
    solver = get_solver(name)
    kinds = [solver.natural_grid] + [k for k in GRIDS if k != solver.natural_grid]
    if quick:
        kinds = kinds[:2] + (["logsnr"] if "logsnr" not in kinds[:2] else [])
    lofs: list[bool | None] = [None]
    if "lower_order_final" in solver.options():
        lofs = [True, "grid", False]
    out = []
    for end in ENDS:
        for k in kinds:
            for lof in lofs:
                st: dict[str, Any] = {"grid": k, "end": end}
                if lof is not None:
                    st["lower_order_final"] = lof
                out.append(st)
    return out


#: where our grid ends before the final denoise: at t_min, or "early" -- at the
#: second-to-last point of a grid with one more interval, i.e. the final denoise jumps from
#: there to the clean estimate exactly as diffusers' final_sigmas_type="zero" (and EDM's
#: last Euler step to sigma = 0) do
ENDS = ("t_min", "early")


def our_grid(process: Any, n_steps: int, kind: str, end: str = "t_min") -> Tensor:
    """The grid of ``n_steps`` steps for a bench setting (see :data:`ENDS`)."""
    if end == "t_min":
        return make_grid(process, n_steps, kind)
    if end == "early":
        return make_grid(process, n_steps + 1, kind)[:-1]
    raise ValueError(f"unknown grid end {end!r}; choose from {ENDS}")


def run_ours(
    task: Task, name: str, setting: dict[str, Any], nfe: int, idx: slice
) -> dict[str, Any]:
    """Run one of our solvers with one setting at an NFE budget on ``x_T[idx]``."""
    opts = {k: v for k, v in setting.items() if k not in ("grid", "end")}
    solver = get_solver(name, **opts)
    n = steps_for_nfe(solver, nfe, "denoise")
    grid = our_grid(task.model.process, n, setting["grid"], setting.get("end", "t_min"))
    stats: dict[str, Any] = {}
    x = sample(
        task.model,
        task.x_T[idx],
        grid,
        solver,
        final="denoise",
        dtype=torch.float64,
        stats=stats,
        progress=False,
    )
    return {"x": x, "nfe_used": stats["nfe"], "steps": n, "notes": []}


# ----------------------------------------------------------------------------- selection
def _select(
    task: Task,
    settings: Sequence[dict[str, Any]],
    runner: Callable[[dict[str, Any], slice], dict[str, Any]],
    n_select: int,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """Try every setting on the first ``n_select`` samples; rerun the winner on all."""
    n = task.x_T.shape[0]
    sub = slice(0, min(n_select, n))
    best, best_err, best_out, failures = None, math.inf, None, []
    for s in settings:
        try:
            out = runner(s, sub)
            err = rel_error(out["x"], task.ref[sub])
        except Exception as e:  # noqa: BLE001 - recorded, never dropped silently
            failures.append(f"{dr.describe(s)}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if math.isfinite(err) and err < best_err:
            best, best_err, best_out = s, err, out
    if best is None:
        return None, None, failures
    if sub.stop < n:
        best_out = runner(best, slice(0, n))
    return best, best_out, failures


def _record(
    task: Task,
    library: str,
    method: str,
    nfe: int,
    setting: dict[str, Any] | None,
    out: dict[str, Any] | None,
    notes: list[str],
    n_tried: int,
    n_failed: int = 0,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "library": library,
        "method": method,
        "task": task.name,
        "nfe": nfe,
        "setting": None,
        "nfe_used": None,
        "rel_error": None,
        "sw": None,
        "settings_tried": n_tried,
        "settings_failed": n_failed,
        "note": "; ".join(dict.fromkeys(notes)) or None,
    }
    if out is not None and setting is not None:
        x = out["x"]
        rec.update(
            setting=dr.describe(setting, out["steps"]),
            nfe_used=out["nfe_used"],
            rel_error=rel_error(x, task.ref),
            sw=sliced_wasserstein(
                x.reshape(x.shape[0], -1),
                task.data.reshape(x.shape[0], -1),
                task.info["sw_projections"],
                seed=task.info["seed"],
            ),
        )
    return rec


def _diffusers_runner(spec: dr.SchedulerSpec, task: Task, nfe: int):
    def run(setting: dict[str, Any], idx: slice) -> dict[str, Any]:
        try:
            return dr.run_scheduler(spec, setting, task.model, task.x_T[idx], nfe, task.kind)
        except (RuntimeError, TypeError, FloatingPointError) as e:
            out = dr.run_scheduler(
                spec, setting, task.model, task.x_T[idx], nfe, task.kind, dtype=torch.float32
            )
            out["notes"].append(
                f"float64 failed ({type(e).__name__}: {str(e)[:80]}); ran in float32"
            )
            return out

    return run


def run_bench(
    *,
    tasks: Iterable[str] = FULL_TASKS,
    nfes: Iterable[int] = FULL_NFES,
    n_samples: int = 512,
    n_select: int = 64,
    quick: bool = False,
    methods: Iterable[str] | None = None,
    schedulers: Iterable[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the samplers bench and return the JSON-ready result.

    Args:
        tasks: task names (see :data:`TASKS`).
        nfes: NFE budgets.
        n_samples: samples per task (rel_error and SW use all of them).
        n_select: samples used to choose each method's best setting.
        quick: fewer settings per method.
        methods: our solver names (default: every registered deterministic solver).
        schedulers: diffusers method names (default: all of :data:`SPECS`).
        seed: seed of priors, starts and data.
        progress: show a tqdm bar over runs.
    """
    from tqdm.auto import tqdm

    nfes = [int(n) for n in nfes]
    ours = list(methods) if methods is not None else deterministic_solvers()
    specs = [s for s in dr.SPECS if schedulers is None or s.method in set(schedulers)]
    if schedulers is not None and len(specs) != len(set(schedulers)):
        known = [s.method for s in dr.SPECS]
        raise ValueError(f"unknown diffusers method in {list(schedulers)}; choose from {known}")
    task_names = list(tasks)
    total = sum(
        len(nfes) * (len([m for m in ours if m in TASKS[t].get("methods", ours)]) + len(specs))
        for t in task_names
    )
    bar = tqdm(total=total, desc="bench samplers", unit="run", disable=not progress)
    task_info, records = {}, []
    start = time.perf_counter()
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # the bench is the caller: no autograd graphs of the UNet
    try:
        for tname in task_names:
            bar.set_postfix_str(f"{tname}: reference")
            task = build_task(tname, n_samples, seed=seed)
            task_info[tname] = task.info
            for nfe in nfes:
                q = quick or TASKS[tname]["prior"] == "digits"  # network: fewer settings
                only = TASKS[tname].get("methods")
                for name in [m for m in ours if only is None or m in only]:
                    bar.set_postfix_str(f"{tname} NFE {nfe} {name}")
                    records.append(_run_ours_method(task, name, nfe, n_select, q))
                    bar.update(1)
                for spec in specs:
                    bar.set_postfix_str(f"{tname} NFE {nfe} {spec.method}")
                    records.append(_run_spec(task, spec, nfe, n_select, q))
                    bar.update(1)
    finally:
        torch.set_grad_enabled(grad_was)
        bar.close()
    result = {
        "bench": "samplers",
        "convention": CONVENTION,
        "tasks": task_info,
        "records": records,
        "summary": summarize(records),
        "meta": {
            "nfes": nfes,
            "n_samples": n_samples,
            "n_select": n_select,
            "quick": quick,
            "seed": seed,
            "seconds": round(time.perf_counter() - start, 1),
            "skipped_stochastic": [n for n in list_solvers() if get_solver(n).stochastic],
            "torch": torch.__version__,
            "diffusers": _diffusers_version(),
        },
    }
    return result


def _run_ours_method(task: Task, name: str, nfe: int, n_select: int, quick: bool) -> dict[str, Any]:
    settings = our_settings(name, quick)

    def run(setting: dict[str, Any], idx: slice) -> dict[str, Any]:
        return run_ours(task, name, setting, nfe, idx)

    best, out, fails = _select(task, settings, run, n_select)
    notes = [] if best is not None else ["no setting ran: " + " | ".join(fails)]
    return _record(task, "diffusolve", name, nfe, best, out, notes, len(settings), len(fails))


def _run_spec(
    task: Task, spec: dr.SchedulerSpec, nfe: int, n_select: int, quick: bool
) -> dict[str, Any]:
    reason = dr.unsupported_note(spec, task.kind)
    if reason is not None:
        return _record(task, "diffusers", spec.method, nfe, None, None, [reason], 0)
    notes: list[str] = []
    settings = dr.settings_for(spec, task.kind, quick)
    best, out, fails = _select(task, settings, _diffusers_runner(spec, task, nfe), n_select)
    if spec.spacing_note and task.kind == "vp":
        notes.append(dr.LEADING_NOTE)
    if best is None:
        notes.append("no setting ran: " + " | ".join(fails))
    elif out is not None:
        notes = out["notes"] + notes
    return _record(task, "diffusers", spec.method, nfe, best, out, notes, len(settings), len(fails))


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # noqa: BLE001
        return "unavailable"
