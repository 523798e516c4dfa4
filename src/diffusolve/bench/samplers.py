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
    ['bench', 'convention', 'fd_only', 'meta', 'moonshot', 'records', 'summary', 'tasks']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..metrics import rel_error, sliced_wasserstein
from ..solvers import get_solver, list_solvers
from . import diffusers_runner as dr
from .distributed import open_store, run_jobs_distributed
from .report import moonshot, summarize
from .runner import TIMING, Job, RecordStore, key_id, strip_timing
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
    "SEARCHED_PREFIX",
    "Searched",
    "load_searched",
    "heldout_status",
    "search_cost",
    "FD_SAMPLES",
    "QUICK_FD_SAMPLES",
]

FULL_NFES = (5, 10, 20, 50)
QUICK_NFES = (5, 10)
#: a searched schedule's method name is this prefix and the schedule's name
SEARCHED_PREFIX = "searched:"
#: FD-digits samples per method and NFE on the network task (the model card's 1,000;
#: the demo's quick run uses 300)
FD_SAMPLES = 1000
QUICK_FD_SAMPLES = 300
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
        "flagged diverged (marked in the tables) and never counts as a library's best. "
        f"A {SEARCHED_PREFIX}<name> method is a schedule found by `diffusolve search` (its "
        "timesteps, or timesteps and per-step solver decisions; the name says what was searched "
        "and on which task) run as it is, at its own NFE, from the same x_T and with no settings "
        "search on top; it runs on every task of the process it was searched for. Its record "
        "says on which data it was searched and whether this bench's prior and starts were held "
        "out from that search; one searched on this bench's own prior/starts, or whose search "
        "data is not recorded, is flagged and never counts as our best. Its search cost (proxy "
        "evaluations, model evaluations, seconds) is listed next to its gain. On the network "
        "task FD-digits is measured on fd_samples further starts with each method's winning "
        "setting (stochastic solvers are not benched: rel_error to a probability-flow "
        "reference does not apply to them)."
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

    def __init__(self, n_samples: int, seed: int, reference: str, fd_samples: int = 0) -> None:
        self.n_samples, self.seed, self.reference = n_samples, seed, reference
        self.fd_samples = fd_samples
        self._name: str | None = None
        self._task: Task | None = None
        self._fd: tuple[str, Task] | None = None

    def fd_task(self, name: str) -> Task:
        """The network task with ``fd_samples`` other starts (seed ``seed + 3``) in place
        of its ``x_T``: the samples FD-digits is computed from."""
        if self._fd is None or self._fd[0] != name:
            task = self(name)
            shape = (self.fd_samples, *task.x_T.shape[1:])
            gen = torch.Generator().manual_seed(self.seed + 3)
            x = task.model.process.prior_sample(shape, gen, dtype=torch.float64)
            self._fd = (name, dataclasses.replace(task, x_T=x))
        return self._fd[1]

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


# ----------------------------------------------------------------------------- searched schedules
@dataclass(frozen=True)
class Searched:
    """A searched schedule run as a bench method (see :func:`load_searched`).

    Attributes:
        method: the method name, :data:`SEARCHED_PREFIX` + ``name``.
        name: the schedule's name (a shipped schedule's name says what was searched and on
            which task, e.g. ``gmm-d64-vp-nfe5-usf``; a file's name is its stem).
        source: ``"shipped"`` or the file it was read from.
        schedule: the :class:`~diffusolve.solvers.search.Schedule`.
        digest: a hash of what the schedule runs (process, NFE, grid, solver, options,
            decisions, final; not its ``info``): part of the record key, so a resumed run
            re-runs a schedule whose file changed.
    """

    method: str
    name: str
    source: str
    schedule: Any
    digest: str


def _digest(schedule: Any) -> str:
    d = schedule.to_dict()
    d.pop("info", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def shipped_names() -> list[str]:
    """The shipped schedules' names (none when the package ships none)."""
    try:
        from ..solvers.search import list_shipped
    except ImportError:  # pragma: no cover - an install without shipped schedules
        return []
    return list(list_shipped())


def load_searched(schedules: Iterable[str] | None = None) -> list[Searched]:
    """The searched schedules a run benches.

    Args:
        schedules: ``None``: every shipped schedule; otherwise shipped names or paths of
            schedule files (``.json``, as ``diffusolve search`` writes them); ``[]``: none.

    Raises:
        ValueError: an unknown name, a file that is not a schedule, or two with one name.
    """
    from ..solvers.search import Schedule

    items = shipped_names() if schedules is None else list(schedules)
    out: list[Searched] = []
    for item in items:
        path = Path(item)
        if path.suffix.lower() == ".json" or path.exists():
            if not path.is_file():
                raise ValueError(f"schedule file {item} does not exist")
            sch, name, source = Schedule.load(path), path.stem, str(path)
        else:
            from ..solvers.search import load_shipped

            known = shipped_names()
            if item not in known:
                raise ValueError(
                    f"unknown schedule {item!r}: give a schedule file (.json) or a shipped "
                    f"name ({', '.join(known) or 'none shipped'})"
                )
            sch, name, source = load_shipped(item), item, "shipped"
        out.append(Searched(SEARCHED_PREFIX + name, name, source, sch, _digest(sch)))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two schedules named {', '.join(map(repr, dup))}; rename one file")
    return out


def _task_process(tname: str) -> Any:
    from ..process import get_process

    return get_process(TASKS[tname]["process"])


def _matches(s: Searched, tname: str, nfe: int) -> bool:
    """Whether ``s`` runs on task ``tname`` at NFE ``nfe``: same process, same NFE."""
    return s.schedule.nfe == nfe and s.schedule.process.mismatch(_task_process(tname)) is None


def _seen_segment(info: dict[str, Any]) -> str | None:
    """The part of a schedule's data description about what its search saw."""
    text = info.get("data")
    if not isinstance(text, str):
        return None
    return re.split(r"held[- ]out", text, maxsplit=1)[0]


def _seen_seeds(seen: str) -> set[int]:
    """Every seed a data description names (``seeds A..B`` ranges and ``seed N``)."""
    out: set[int] = set()
    for a, b in re.findall(r"seeds?\s+(\d+)\s*\.\.\s*(\d+)", seen):
        out.update(range(int(a), int(b) + 1))
    for a in re.findall(r"seed\s+(\d+)(?!\s*\.\.)", seen):
        out.add(int(a))
    return out


def _is_network(tname: str) -> bool:
    return TASKS[tname]["prior"] == "digits"


def heldout_status(schedule: Any, tname: str, seed: int) -> dict[str, Any]:
    """Whether the bench's data for ``tname`` at ``seed`` was held out from ``schedule``'s
    search.

    The bench's analytic tasks use prior ``seed`` and starts from seed ``seed + 1``; the
    network task uses the bundled model, starts from seed ``seed + 1`` and FD starts from
    seed ``seed + 3`` (a search on either is not held out). A schedule
    searched on another task (another prior or process) never saw this task's data. A
    schedule searched on this task saw the priors (analytic) or starts (network) whose seeds
    its ``info["data"]`` names before "held out"; when the bench's seed is among them, or
    when the schedule does not say what it was searched on, ``heldout`` is ``False`` /
    ``None`` and the record is flagged (it never counts as our best).

    Returns:
        ``dict(heldout, searched_on, bench_data, search_data, note)``.
    """
    info = schedule.info or {}
    on = info.get("model")
    network = _is_network(tname)
    bench_data = (
        f"bundled digits model, starts seed {seed + 1}"
        if network
        else f"{tname}: prior seed {seed}, starts seed {seed + 1}"
    )
    seen = _seen_segment(info)
    res = {
        "heldout": None,
        "searched_on": on,
        "bench_data": bench_data,
        "search_data": info.get("data"),
    }
    if not isinstance(on, str):
        res["note"] = "the schedule does not say what it was searched on: held-out not verified"
        return res
    same = on in ("digits", "digits-unet") if network else on == tname
    if not same:
        res["heldout"] = True
        res["note"] = f"searched on {on}, run on {tname} (a transfer: this task was never seen)"
        return res
    if seen is None:
        res["note"] = f"searched on {on} without a record of its data: held-out not verified"
        return res
    seeds = _seen_seeds(seen)
    mine = seed + 1 if network else seed
    what = "starts seed" if network else "prior seed"
    used = sorted(seeds & ({seed + 1, seed + 3} if network else {seed}))
    if not seeds:
        res["note"] = f"searched on {on}; its data description names no seeds: not verified"
    elif used:
        res["heldout"] = False
        res["note"] = f"SEARCHED ON THIS BENCH'S DATA: the search used {what} " + " and ".join(
            str(u) for u in used
        )
    else:
        res["heldout"] = True
        starts = "" if network else f" (starts seed {seed + 1})"
        res["note"] = (
            f"searched on {on} with {what}s {_ranges(seeds)}; this bench's {what} {mine}"
            f"{starts} was held out"
        )
    return res


def _ranges(values: set[int]) -> str:
    """``{1, 2, 3, 7}`` -> ``"1..3, 7"``."""
    out, run = [], []
    for v in sorted(values):
        if run and v != run[-1] + 1:
            out.append(run)
            run = []
        run.append(v)
    out.append(run)
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in out if r)


def _calibration_starts(info: dict[str, Any]) -> int | None:
    """Starts per proxy evaluation, from a schedule's data description (calibration only)."""
    seen = _seen_segment(info)
    if seen is None:
        return None
    cal = seen.split("validation", 1)[0]
    m = re.search(r"seeds\s+(\d+)\s*\.\.\s*(\d+)\s*\((\d+) starts each\)", cal)
    if m:
        return (int(m.group(2)) - int(m.group(1)) + 1) * int(m.group(3))
    m = re.search(r"calibration\s+(\d+)\s+starts", cal)
    return int(m.group(1)) if m else None


def search_cost(schedule: Any) -> dict[str, Any]:
    """What the search that found ``schedule`` cost, from its ``info``.

    Recorded figures (``info["cost"]`` or top-level ``proxy_evaluations``,
    ``model_evaluations``, ``seconds``) are taken as they are. Otherwise the proxy
    evaluations are the search's ``budget`` and the model evaluations are derived as
    budget x NFE x calibration starts (per-sample evaluations of the calibration runs; the
    note says so); seconds stay unknown.

    Returns:
        ``dict(proxy_evaluations, model_evaluations, seconds, note)`` (``None``: unknown).
    """
    info = schedule.info or {}
    cost = info.get("cost") if isinstance(info.get("cost"), dict) else {}

    def pick(*keys: str) -> Any:
        for k in keys:
            for src in (cost, info):
                if src.get(k) is not None:
                    return src[k]
        return None

    proxy = pick("proxy_evaluations", "evaluations")
    model = pick("model_evaluations")
    seconds = pick("seconds", "search_seconds")
    notes = []
    if proxy is None and info.get("budget") is not None:
        proxy = int(info["budget"])
        notes.append("proxy evaluations: the search's budget")
    if model is None and proxy is not None:
        starts = _calibration_starts(info)
        if starts is not None:
            model = int(proxy) * int(schedule.nfe) * starts
            notes.append(
                "model evaluations derived: proxy evaluations x NFE x calibration starts "
                "(per sample; without reference solves or validation runs)"
            )
    if seconds is None:
        notes.append("seconds not recorded in the schedule")
    if cost.get("fit_iterations") is not None:
        start = cost.get("start_cost") or {}
        notes.append(
            f"an ns fit of {cost['fit_iterations']} L-BFGS iterations "
            f"({cost.get('fit_seconds', float('nan')):.0f} s) included"
            + (
                f"; the search that found its start: {start.get('proxy_evaluations')} proxy "
                f"evaluations, {start.get('seconds')} s"
                if start
                else ""
            )
        )
    return {
        "proxy_evaluations": proxy,
        "model_evaluations": model,
        "seconds": seconds,
        "note": "; ".join(notes) or None,
    }


def searched_meta(s: Searched, task_names: list[str], nfes: list[int], seed: int) -> dict:
    """A searched schedule's entry in the result's ``meta["searched"]``."""
    info = s.schedule.info or {}
    runs = [t for t in task_names for n in nfes if _matches(s, t, n)]
    return {
        "method": s.method,
        "name": s.name,
        "source": s.source,
        "digest": s.digest,
        "process": s.schedule.process.name,
        "nfe": s.schedule.nfe,
        "solver": s.schedule.solver,
        "final": s.schedule.final,
        "mode": info.get("mode"),
        "searched_on": info.get("model"),
        "search_data": info.get("data"),
        "schedule": s.schedule.describe(),
        "cost": search_cost(s.schedule),
        "tasks": list(dict.fromkeys(runs)),
        "heldout": {t: heldout_status(s.schedule, t, seed) for t in dict.fromkeys(runs)},
    }


def _schedule_runner(s: Searched) -> Runner:
    def run(task: Task, setting: dict[str, Any], idx: slice) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        x = s.schedule.sample(
            task.model, task.x_T[idx], dtype=torch.float64, stats=stats, progress=False
        )
        return {"x": x, "nfe_used": stats["nfe"], "steps": len(s.schedule.grid) - 1, "notes": []}

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
    select: bool = True,
    extra: dict[str, Any] | None = None,
    fd: bool = False,
) -> Iterator[Job]:
    """The select jobs of one method at one NFE, then its final job (built from them).

    With ``select=False`` the one setting in ``settings`` runs on all samples without
    trials (a searched schedule). ``extra`` fields are added to the final record. With
    ``fd`` an ``fd`` job follows: FD-digits of the winner on ``tasks.fd_samples`` starts.
    """
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
    if select:
        for i, setting in enumerate(settings):
            keys.append(_key("select", tname, library, method, nfe, setting))
            yield Job(keys[-1], trial(i, setting), label)
        # every trial record is in the store now (the runner finishes a job before the next)
        trials = [store.get(k) or {} for k in keys]
        failures = [r["error"] for r in trials if r.get("error")]
        best = pick_winner(trials)
        win = None if best is None else next(i for i, r in enumerate(trials) if r is best)
    else:
        if len(settings) != 1:
            raise ValueError("a method without a settings search has exactly one setting")
        failures, win = [], 0
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
            "settings_tried": len(settings) if select else 0,
            "settings_failed": len(failures),
        }
        rec.update(extra or {})
        if win is None:
            notes.append("no setting ran: " + " | ".join(failures))
        else:
            task = tasks(tname)
            try:
                out = (
                    cache[win] if win in cache else runner(task, settings[win], slice(0, n_samples))
                )
            except Exception as e:  # noqa: BLE001 - only without a settings search
                if select:
                    raise
                notes.append(f"failed: {type(e).__name__}: {str(e)[:160]}")
                rec["note"] = "; ".join(dict.fromkeys(notes))
                return rec
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
    if fd and winner is not None:
        done = store.get(_key("final", tname, library, method, nfe, winner)) or {}
        if done.get("rel_error") is not None:
            yield _fd_job(tasks, tname, library, method, nfe, winner, runner)


def _fd_job(
    tasks: _Tasks,
    tname: str,
    library: str,
    method: str,
    nfe: int,
    setting: dict[str, Any],
    runner: Runner,
) -> Job:
    """FD-digits of a method's winning setting on the network task's FD starts."""

    def run(store: RecordStore) -> dict[str, Any]:
        from ..models import fd_digits

        task = tasks.fd_task(tname)
        out = runner(task, setting, slice(0, task.x_T.shape[0]))
        x = out["x"]
        if not bool(torch.isfinite(x).all()):
            return {"fd_digits": None, "fd_samples": x.shape[0], "fd_note": "non-finite samples"}
        return {"fd_digits": float(fd_digits(x.float())), "fd_samples": x.shape[0]}

    return Job(
        _key("fd", tname, library, method, nfe, setting), run, f"{tname} NFE {nfe} {method} FD"
    )


def _fd_floor_job(tasks: _Tasks, tname: str) -> Job:
    def run(store: RecordStore) -> dict[str, Any]:
        from ..models import fd_digits_noise_floor

        n = tasks.fd_samples
        try:
            return {"fd_floor": fd_digits_noise_floor(n), "fd_samples": n}
        except ValueError as e:  # more samples than the train split holds per class
            return {"fd_floor": None, "fd_samples": n, "fd_note": str(e)[:160]}

    return Job(_key("fd_floor", tname), run, f"{tname}: FD-digits floor")


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
    searched: list[Searched] = (),  # type: ignore[assignment]
    fd_only: list[str] = (),  # type: ignore[assignment]
) -> Iterator[Job]:
    from .samplers_fd import _Memo, fd_only_jobs

    memo = _Memo()
    for tname in task_names:
        yield _task_job(tasks, tname)
        kind = "rf" if TASKS[tname]["process"] == "rectified-flow" else "vp"
        q = quick or TASKS[tname]["prior"] == "digits"  # network: fewer settings
        only = TASKS[tname].get("methods")
        fd = _is_network(tname) and tasks.fd_samples > 0
        if fd:
            yield _fd_floor_job(tasks, tname)
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
                    fd=fd,
                )
            for sch in [x for x in searched if _matches(x, tname, nfe)]:
                status = heldout_status(sch.schedule, tname, tasks.seed)
                yield from _method_jobs(
                    store,
                    tasks,
                    tname,
                    "diffusolve",
                    sch.method,
                    nfe,
                    [{"schedule": sch.name, "digest": sch.digest}],
                    _schedule_runner(sch),
                    n_samples,
                    n_select,
                    select=False,
                    extra={
                        "searched": {
                            "schedule": sch.name,
                            "source": sch.source,
                            "solver": sch.schedule.solver,
                            "mode": (sch.schedule.info or {}).get("mode"),
                            "final": sch.schedule.final,
                            **status,
                            "cost": search_cost(sch.schedule),
                        }
                    },
                    extra_notes=(
                        "searched schedule run as it is (its own grid, solver and final; no "
                        "settings search)",
                    ),
                    fd=fd,
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
                    fd=fd,
                )
            if fd and fd_only:
                yield from fd_only_jobs(tasks, tname, nfe, list(fd_only), tasks.seed, memo)


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
    schedules: Iterable[str] | None = None,
    fd_samples: int | None = None,
    fd_only: Iterable[str] | None = None,
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
        schedules: searched schedules to bench (:func:`load_searched`: ``None`` every
            shipped one, ``[]`` none, else shipped names or schedule files); each runs as the
            method ``searched:<name>`` on every task whose process it was searched for, at
            its own NFE when that NFE is in ``nfes``.
        fd_samples: FD-digits samples per method and NFE on the network task (default
            :data:`FD_SAMPLES`, quick :data:`QUICK_FD_SAMPLES`; 0: no FD-digits).
        fd_only: samplers measured by FD-digits alone on the network task (stochastic solvers,
            DMCMC, DPM-OT; :mod:`.samplers_fd`); default: all of
            :data:`~.samplers_fd.FD_ONLY_METHODS` when FD-digits is measured, ``[]``: none.

    Raises:
        ValueError: unknown task / method / reference / schedule, non-positive sizes, or a
            records file of another configuration.
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
    searched = load_searched(schedules)
    if fd_samples is None:
        fd_samples = QUICK_FD_SAMPLES if quick else FD_SAMPLES
    if fd_samples < 0 or fd_samples == 1:
        raise ValueError(f"fd_samples must be 0 (no FD-digits) or >= 2, got {fd_samples}")
    network = any(_is_network(t) for t in task_names)
    from .samplers_fd import FD_ONLY_METHODS, check_fd_only

    fd_only = list(FD_ONLY_METHODS) if fd_only is None else list(fd_only)
    check_fd_only(fd_only)
    if not (network and fd_samples):
        fd_only = []
    config = {
        "n_samples": n_samples,
        "n_select": n_select,
        "quick": quick,
        "seed": seed,
        "reference": reference,
    }
    if network and fd_samples:
        config["fd_samples"] = fd_samples  # only then: older records files still resume
    store = open_store(
        records,
        bench="samplers",
        key_fields=KEY_FIELDS,
        config=config,
        mode="resume" if resume else ("overwrite" if overwrite else "new"),
    )
    total = sum(
        len(nfes) * (len([m for m in ours if m in TASKS[t].get("methods", ours)]) + len(specs))
        + sum(_matches(x, t, n) for x in searched for n in nfes)
        for t in task_names
    )
    bar = tqdm(total=total, desc="bench samplers", unit="run", disable=not progress)

    def on_record(job: Job, rec: dict[str, Any], skipped: bool) -> None:
        if rec.get("phase") == "final":
            bar.update(1)
        bar.set_postfix_str(job.label)

    task_cache = _Tasks(n_samples, seed, reference, fd_samples if network else 0)
    start = time.perf_counter()
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # the bench is the caller: no autograd graphs of the UNet
    try:
        n_run, n_skipped = run_jobs_distributed(
            _plan(
                store,
                task_cache,
                task_names,
                nfes,
                ours,
                specs,
                n_samples,
                n_select,
                quick,
                searched,
                fd_only,
            ),
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
            "fd_samples": fd_samples if network else None,
            "searched": [searched_meta(x, task_names, nfes, seed) for x in searched],
            "fd_only": fd_only,
            "torch": torch.__version__,
            "diffusers": _diffusers_version(),
        },
        searched=searched,
        fd_only=fd_only,
    )


def result_from_records(
    store: RecordStore,
    task_names: list[str],
    nfes: list[int],
    ours: list[str],
    theirs: list[str],
    meta: dict[str, Any],
    searched: list[Searched] = (),  # type: ignore[assignment]
    fd_only: list[str] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """The JSON-ready result (tasks, final records, summary) from a run's records.

    Records are taken in plan order (task, NFE, our methods, searched schedules, diffusers
    methods), whatever order the file has them in, so a resumed run gives the same result
    as an uninterrupted one. FD-digits records (network task) are merged into their final
    records (``fd_digits``, ``fd_samples``); the FD-only methods' records are ``fd_only``.
    """
    finals = {
        (r["task"], r["library"], r["method"], r["nfe"]): r for r in store.select(phase="final")
    }
    for x in searched:  # the exact key: a changed schedule file is another record
        for r in store.select(phase="final", method=x.method):
            if (r.get("setting") or {}).get("digest") == x.digest:
                finals[(r["task"], r["library"], r["method"], r["nfe"])] = r
    fds = {
        (r["task"], r["library"], r["method"], r["nfe"], key_id(r, ("setting",))): r
        for r in store.select(phase="fd")
    }
    task_info: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for tname in task_names:
        trec = store.get(_key("task", tname))
        if trec is not None:
            info = dict(trec["info"])
            info["reference_seconds"] = trec.get(TIMING, {}).get("reference_seconds")
            floor = store.get(_key("fd_floor", tname))
            if floor is not None:
                info["fd_floor"] = floor.get("fd_floor")
                info["fd_samples"] = floor.get("fd_samples")
                info["fd_data"] = (
                    "FD-digits of fd_samples unconditional samples (starts seed + 3, the winning "
                    "setting) against the held-out digits; fd_floor: real train digits vs the "
                    "held-out split at the same size"
                )
            task_info[tname] = info
        only = TASKS[tname].get("methods")
        mine = [m for m in ours if only is None or m in only]
        mine += [x.method for x in searched]
        for nfe in nfes:
            for lib, names in (("diffusolve", mine), ("diffusers", theirs)):
                for m in names:
                    r = finals.get((tname, lib, m, nfe))
                    if r is None:
                        continue
                    pub = _public(r)
                    fd = fds.get((tname, lib, m, nfe, key_id(r, ("setting",))))
                    if fd is not None:
                        pub["fd_digits"] = fd.get("fd_digits")
                        pub["fd_samples"] = fd.get("fd_samples")
                    records.append(pub)
    from .samplers_fd import _setting

    fd_records = []
    for tname in task_names:
        for nfe in nfes:
            for m in fd_only:
                r = store.get(
                    _key("fdonly", tname, "diffusolve", m, nfe, _setting(m, meta.get("seed", 0)))
                )
                if r is not None:
                    fd_records.append(_public(r))
    reference = meta.get("reference", "zero")
    return {
        "bench": "samplers",
        "convention": convention(reference),
        "tasks": task_info,
        "records": records,
        "fd_only": fd_records,
        "summary": summarize(records, fd_records),
        "moonshot": moonshot(records),
        "meta": meta,
    }


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # noqa: BLE001
        return "unavailable"
