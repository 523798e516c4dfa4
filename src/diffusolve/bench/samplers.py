"""``diffusolve bench samplers``: our solvers vs diffusers' schedulers against exact references.

Tasks (:mod:`.tasks`) are Gaussian-mixture priors (25 components, unequal weights,
anisotropic full covariances) under the DDPM-linear VP process (time in diffusers index
units), Stable Diffusion's scaled-linear betas and rectified flow, and the bundled digits
UNet. Every method starts from the same ``x_T`` (prior noise at ``t_max``) and returns an
x0 estimate; the reference is the exact probability-flow endpoint at ``sigma -> 0`` (or,
with ``reference="tmin"``, the PF-ODE to ``t_min`` followed by the exact denoiser there).

Both libraries get the same latitude (:mod:`.settings`): for each method and NFE every
documented setting is tried on the first ``n_select`` samples and the winner is re-run on
all samples. Each trial and each final run is a job of the resumable runner
(:mod:`.runner`): its record is appended to a JSONL file as soon as it finishes, and the
tables, JSON and plots are built from those records.

Example:
    >>> from diffusolve.bench.samplers import run_bench
    >>> out = run_bench(tasks=["gauss-d2-vp"], nfes=[5], n_samples=16, methods=["ddim"],
    ...                 schedulers=["DDIM"], progress=False)
    >>> sorted(out)
    ['bench', 'convention', 'meta', 'records', 'summary', 'tasks']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..metrics import rel_error, sliced_wasserstein
from ..solvers import get_solver, list_solvers
from . import diffusers_runner as dr
from .report import summarize
from .runner import TIMING, Job, RecordStore, run_jobs, strip_timing
from .settings import ENDS, our_grid, our_settings, pick_winner, run_ours
from .tasks import FULL_TASKS, QUICK_TASKS, REFERENCES, TASKS, Task, build_task, check_tasks

__all__ = [
    "CONVENTION",
    "convention",
    "TASKS",
    "Task",
    "build_task",
    "run_bench",
    "our_settings",
    "our_grid",
    "ENDS",
    "KEY_FIELDS",
    "DIVERGED_SCALE",
    "check_methods",
    "FULL_TASKS",
    "QUICK_TASKS",
    "FULL_NFES",
    "QUICK_NFES",
]

FULL_NFES = (5, 10, 20, 50)
QUICK_NFES = (5, 10)
#: the fields of a samplers record's key (see :mod:`.runner`)
KEY_FIELDS = ("bench", "phase", "task", "library", "method", "nfe", "setting")
#: a final output whose RMS exceeds the reference's by this factor (or is not finite) is
#: flagged ``diverged``: a blow-up, not an accuracy
DIVERGED_SCALE = 10.0

_REFERENCE_TEXT = {
    "tmin": (
        "Reference: the exact probability-flow ODE solution from (x_T, t_max) to t_min "
        "(DOP853, float64, rtol=atol=1e-10; closed form for Gaussian tasks) followed by the exact "
        "denoiser at t_min."
    ),
    "zero": (
        "Reference: the exact probability-flow endpoint at sigma -> 0 from (x_T, t_max): the "
        "PF-ODE written in x/alpha against v = (sigma/alpha)^2, dx/dv = (x - D(x, v))/(2v) "
        "(regular at v = 0 for the non-degenerate mixture covariances), solved with DOP853 in "
        "float64 (rtol=atol=1e-10) down to v = 0; closed form for Gaussian tasks; the network "
        "task keeps its 1000-step solve with a final denoise at t_min. A final denoise at t_min "
        "differs from this endpoint by O((sigma/alpha)(t_min)^2) (task info s_min)."
    ),
}


def convention(reference: str = "zero") -> str:
    """The convention text of a run (what is compared with what)."""
    return (
        "Every method starts from the same x_T = prior noise at the process's t_max and outputs an "
        f"x0 estimate. {_REFERENCE_TEXT[reference]} Our solvers end with final='denoise' (the final "
        "denoise counts as one "
        "NFE) at t_min (setting end=t_min) or, like diffusers' final_sigmas_type='zero' and EDM's "
        "last Euler step to sigma=0, one grid point early (end=early: the second-to-last point of a "
        "grid with one more interval), or at t_min with final='zero' (end=zero: the same one "
        "evaluation returns the sigma->0 endpoint extrapolated from the denoiser outputs at the last "
        "three grid times); diffusers schedulers run their own final step. rel_error = mean over samples of "
        "||x - x_ref|| / ||x_ref||; sw = sliced Wasserstein-2 distance of the samples to exact data "
        "samples of the same size (noise floor sw_floor = SW between two independent exact sets). "
        "Diffusers schedulers get the exact model in the parameterisation they expect (epsilon for "
        "the DDPM family, flow velocity for flow_prediction), evaluated at the process time of the "
        "scheduler's own sigma for that call (its integer timestep for DDIM/PNDM). For every method "
        "and NFE, each documented setting is tried on the first n_select samples and the winner is "
        "run on all samples; nfe_used counts the model evaluations actually made (<= nfe). All runs "
        "in float64 unless the record's note says otherwise (diffusers keeps its schedule tensors in "
        "float32, so its coefficients carry ~1e-7 relative round-off even on float64 samples). "
        f"A result whose RMS exceeds the reference's {DIVERGED_SCALE:g}x (or is not finite) is "
        "flagged diverged (marked in the tables) and never counts as a library's best."
    )


CONVENTION = convention("zero")


# ----------------------------------------------------------------------------- helpers
def deterministic_solvers() -> list[str]:
    """Registered solvers whose default preset is deterministic."""
    return [n for n in list_solvers() if not get_solver(n).stochastic]


def check_methods(methods: Iterable[str] | None, schedulers: Iterable[str] | None) -> None:
    """Raise ``ValueError`` for unknown solver or diffusers method names."""
    if methods is not None:
        known = list_solvers()
        bad = [m for m in methods if m not in known]
        if bad:
            raise ValueError(
                f"unknown solver {', '.join(map(repr, bad))}; choose from {', '.join(known)}"
            )
    if schedulers is not None:
        known = [s.method for s in dr.SPECS]
        bad = [m for m in schedulers if m not in known]
        if bad:
            raise ValueError(
                f"unknown diffusers method {', '.join(map(repr, bad))}; choose from "
                f"{', '.join(known)}"
            )


def _diverged(x: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float | None]:
    if not bool(torch.isfinite(x).all()):
        return True, None
    ratio = float(x.double().norm() / ref.double().norm().clamp_min(1e-300))
    return ratio > DIVERGED_SCALE, ratio


class _Tasks:
    """Builds each task on first use (a resumed run may need none) and keeps the last one."""

    def __init__(self, n_samples: int, seed: int, reference: str) -> None:
        self.n_samples, self.seed, self.reference = n_samples, seed, reference
        self._name: str | None = None
        self._task: Task | None = None

    def __call__(self, name: str) -> Task:
        if self._name != name:
            self._task = None  # free the previous task first
            self._task = build_task(name, self.n_samples, seed=self.seed, reference=self.reference)
            self._name = name
        assert self._task is not None
        return self._task


def _key(phase: str, task: str, library=None, method=None, nfe=None, setting=None) -> dict:
    return {
        "bench": "samplers",
        "phase": phase,
        "task": task,
        "library": library,
        "method": method,
        "nfe": nfe,
        "setting": setting,
    }


Runner = Callable[[Task, dict[str, Any], slice], dict[str, Any]]


def _ours_runner(name: str, nfe: int) -> Runner:
    def run(task: Task, setting: dict[str, Any], idx: slice) -> dict[str, Any]:
        return run_ours(task.model, task.x_T[idx], name, setting, nfe)

    return run


def _diffusers_runner(spec: dr.SchedulerSpec, nfe: int) -> Runner:
    def run(task: Task, setting: dict[str, Any], idx: slice) -> dict[str, Any]:
        betas = dr.betas_config(task.info.get("process"))
        try:
            return dr.run_scheduler(
                spec, setting, task.model, task.x_T[idx], nfe, task.kind, betas=betas
            )
        except (RuntimeError, TypeError, FloatingPointError) as e:
            out = dr.run_scheduler(
                spec,
                setting,
                task.model,
                task.x_T[idx],
                nfe,
                task.kind,
                dtype=torch.float32,
                betas=betas,
            )
            out["notes"].append(
                f"float64 failed ({type(e).__name__}: {str(e)[:80]}); ran in float32"
            )
            return out

    return run


def _method_jobs(
    store: RecordStore,
    tasks: _Tasks,
    tname: str,
    library: str,
    method: str,
    nfe: int,
    settings: list[dict[str, Any]],
    runner: Runner,
    n_samples: int,
    n_select: int,
    unsupported: str | None = None,
    extra_notes: tuple[str, ...] = (),
) -> Iterator[Job]:
    """The select jobs of one method at one NFE, then its final job (built from them)."""
    label = f"{tname} NFE {nfe} {method}"
    if unsupported is not None:
        rec = {
            "nfe_used": None,
            "steps": None,
            "rel_error": None,
            "sw": None,
            "diverged": None,
            "scale_ratio": None,
            "settings_tried": 0,
            "settings_failed": 0,
            "note": unsupported,
        }
        yield Job(_key("final", tname, library, method, nfe, None), lambda s: rec, label)
        return
    sub = slice(0, min(n_select, n_samples))
    full = sub.stop >= n_samples
    cache: dict[int, dict[str, Any]] = {}  # outputs of trials that ran on every sample

    def trial(i: int, setting: dict[str, Any]) -> Callable[[RecordStore], dict[str, Any]]:
        def run(store: RecordStore) -> dict[str, Any]:
            task = tasks(tname)
            try:
                out = runner(task, setting, sub)
                err = rel_error(out["x"], task.ref[sub])
            except Exception as e:  # noqa: BLE001 - recorded, never dropped silently
                msg = f"{dr.describe(setting)}: {type(e).__name__}: {str(e)[:120]}"
                return {"rel_error": None, "error": msg, "nfe_used": None, "steps": None}
            if full:
                cache[i] = out
            return {
                "rel_error": err,
                "error": None,
                "nfe_used": out["nfe_used"],
                "steps": out["steps"],
            }

        return run

    keys = []
    for i, setting in enumerate(settings):
        keys.append(_key("select", tname, library, method, nfe, setting))
        yield Job(keys[-1], trial(i, setting), label)
    # every trial record is in the store now (the runner finishes a job before the next)
    trials = [store.get(k) or {} for k in keys]
    failures = [r["error"] for r in trials if r.get("error")]
    best = pick_winner(trials)
    win = None if best is None else next(i for i, r in enumerate(trials) if r is best)
    winner = None if win is None else settings[win]

    def final(store: RecordStore) -> dict[str, Any]:
        notes = list(extra_notes)
        rec: dict[str, Any] = {
            "nfe_used": None,
            "steps": None,
            "rel_error": None,
            "sw": None,
            "diverged": None,
            "scale_ratio": None,
            "settings_tried": len(settings),
            "settings_failed": len(failures),
        }
        if win is None:
            notes.append("no setting ran: " + " | ".join(failures))
        else:
            task = tasks(tname)
            out = cache[win] if win in cache else runner(task, settings[win], slice(0, n_samples))
            notes = out["notes"] + notes
            x = out["x"]
            diverged, ratio = _diverged(x, task.ref)
            if diverged:
                notes.append(
                    "diverged: output RMS "
                    + ("not finite" if ratio is None else f"{ratio:.3g}x the reference's")
                )
            rec.update(
                nfe_used=out["nfe_used"],
                steps=out["steps"],
                rel_error=rel_error(x, task.ref),
                sw=sliced_wasserstein(
                    x.reshape(x.shape[0], -1),
                    task.data.reshape(x.shape[0], -1),
                    task.info["sw_projections"],
                    seed=task.info["seed"],
                ),
                diverged=diverged,
                scale_ratio=ratio,
            )
        rec["note"] = "; ".join(dict.fromkeys(notes)) or None
        cache.clear()
        return rec

    yield Job(_key("final", tname, library, method, nfe, winner), final, label)


def _task_job(tasks: _Tasks, tname: str) -> Job:
    def run(store: RecordStore) -> dict[str, Any]:
        info = dict(tasks(tname).info)
        seconds = info.pop("reference_seconds", None)
        return {"info": info, TIMING: {"reference_seconds": seconds}}

    return Job(_key("task", tname), run, f"{tname}: reference")


def _plan(
    store: RecordStore,
    tasks: _Tasks,
    task_names: list[str],
    nfes: list[int],
    ours: list[str],
    specs: list[dr.SchedulerSpec],
    n_samples: int,
    n_select: int,
    quick: bool,
) -> Iterator[Job]:
    for tname in task_names:
        yield _task_job(tasks, tname)
        kind = "rf" if TASKS[tname]["process"] == "rectified-flow" else "vp"
        q = quick or TASKS[tname]["prior"] == "digits"  # network: fewer settings
        only = TASKS[tname].get("methods")
        for nfe in nfes:
            for name in [m for m in ours if only is None or m in only]:
                yield from _method_jobs(
                    store,
                    tasks,
                    tname,
                    "diffusolve",
                    name,
                    nfe,
                    our_settings(name, q),
                    _ours_runner(name, nfe),
                    n_samples,
                    n_select,
                )
            for spec in specs:
                reason = dr.unsupported_note(spec, kind)
                notes = (dr.LEADING_NOTE,) if spec.spacing_note and kind == "vp" else ()
                yield from _method_jobs(
                    store,
                    tasks,
                    tname,
                    "diffusers",
                    spec.method,
                    nfe,
                    [] if reason else dr.settings_for(spec, kind, q),
                    _diffusers_runner(spec, nfe),
                    n_samples,
                    n_select,
                    unsupported=reason,
                    extra_notes=notes,
                )


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    """A final record in the result's format: the setting as text with its step count."""
    setting = rec.get("setting")
    out = {
        "library": rec["library"],
        "method": rec["method"],
        "task": rec["task"],
        "nfe": rec["nfe"],
        "setting": None if setting is None else dr.describe(setting, rec.get("steps")),
    }
    out.update((k, v) for k, v in strip_timing(rec).items() if k not in KEY_FIELDS)
    out[TIMING] = rec.get(TIMING)
    return out


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
    reference: str = "zero",
    records: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
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
        reference: ``"zero"`` (PF-ODE endpoint at sigma -> 0) or ``"tmin"`` (PF-ODE to
            t_min + exact denoiser).
        records: JSONL file of the run's records (``None``: in memory only).
        resume: continue the run in ``records`` (skip every job already recorded).
        overwrite: start ``records`` afresh when it exists.
        progress: show a tqdm bar over method runs.

    Raises:
        ValueError: unknown task / method / reference, non-positive sizes, or a records file
            of another configuration.
        runner.RecordsExistError: ``records`` exists and neither ``resume`` nor ``overwrite``.
    """
    from tqdm.auto import tqdm

    task_names = list(tasks)
    check_tasks(task_names)
    nfes = [int(n) for n in nfes]
    if not nfes or min(nfes) < 1:
        raise ValueError(f"NFE budgets must be positive integers, got {nfes}")
    if n_samples < 1 or n_select < 1:
        raise ValueError(f"n_samples and n_select must be >= 1, got {n_samples}, {n_select}")
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose from {', '.join(REFERENCES)}")
    methods = None if methods is None else list(methods)
    schedulers = None if schedulers is None else list(schedulers)
    check_methods(methods, schedulers)
    ours = methods if methods is not None else deterministic_solvers()
    specs = [s for s in dr.SPECS if schedulers is None or s.method in set(schedulers)]
    config = {
        "n_samples": n_samples,
        "n_select": n_select,
        "quick": quick,
        "seed": seed,
        "reference": reference,
    }
    store = RecordStore(
        records,
        bench="samplers",
        key_fields=KEY_FIELDS,
        config=config,
        mode="resume" if resume else ("overwrite" if overwrite else "new"),
    )
    total = sum(
        len(nfes) * (len([m for m in ours if m in TASKS[t].get("methods", ours)]) + len(specs))
        for t in task_names
    )
    bar = tqdm(total=total, desc="bench samplers", unit="run", disable=not progress)

    def on_record(job: Job, rec: dict[str, Any], skipped: bool) -> None:
        if rec.get("phase") == "final":
            bar.update(1)
        bar.set_postfix_str(job.label)

    task_cache = _Tasks(n_samples, seed, reference)
    start = time.perf_counter()
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # the bench is the caller: no autograd graphs of the UNet
    try:
        n_run, n_skipped = run_jobs(
            _plan(store, task_cache, task_names, nfes, ours, specs, n_samples, n_select, quick),
            store,
            on_record=on_record,
        )
    finally:
        torch.set_grad_enabled(grad_was)
        bar.close()
    return result_from_records(
        store,
        task_names,
        nfes,
        ours,
        [s.method for s in specs],
        meta={
            "nfes": nfes,
            "n_samples": n_samples,
            "n_select": n_select,
            "quick": quick,
            "seed": seed,
            "reference": reference,
            "records": None if records is None else str(records),
            "records_run": n_run,
            "records_resumed": n_skipped,
            "seconds": round(time.perf_counter() - start, 1),
            "skipped_stochastic": [n for n in list_solvers() if get_solver(n).stochastic],
            "torch": torch.__version__,
            "diffusers": _diffusers_version(),
        },
    )


def result_from_records(
    store: RecordStore,
    task_names: list[str],
    nfes: list[int],
    ours: list[str],
    theirs: list[str],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-ready result (tasks, final records, summary) from a run's records.

    Records are taken in plan order (task, NFE, our methods, diffusers methods), whatever
    order the file has them in, so a resumed run gives the same result as an uninterrupted one.
    """
    finals = {
        (r["task"], r["library"], r["method"], r["nfe"]): r for r in store.select(phase="final")
    }
    task_info: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for tname in task_names:
        trec = store.get(_key("task", tname))
        if trec is not None:
            info = dict(trec["info"])
            info["reference_seconds"] = trec.get(TIMING, {}).get("reference_seconds")
            task_info[tname] = info
        only = TASKS[tname].get("methods")
        for nfe in nfes:
            for lib, names in (("diffusolve", ours), ("diffusers", theirs)):
                for m in names:
                    if lib == "diffusolve" and only is not None and m not in only:
                        continue
                    r = finals.get((tname, lib, m, nfe))
                    if r is not None:
                        records.append(_public(r))
    reference = meta.get("reference", "zero")
    return {
        "bench": "samplers",
        "convention": convention(reference),
        "tasks": task_info,
        "records": records,
        "summary": summarize(records),
        "meta": meta,
    }


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # noqa: BLE001
        return "unavailable"
