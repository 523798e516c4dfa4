"""``diffusolve bench inverse``: posterior samplers on exact Gaussian-mixture posteriors and
on restoration tasks with the bundled digits model.

**GMM part** (:mod:`.inverse_tasks`, the MCGdiff set-up): for every ``(d, dy)`` and every
problem, each registered posterior sampler draws ``n_samples`` posterior samples (one
measurement repeated) at each step count; the metric is the sliced Wasserstein distance
(``n_projections`` random directions, fixed per problem) to ``n_samples`` exact posterior
samples, next to its noise floor: the same distance between two independent exact sets of
that size. Every sampler of :data:`~diffusolve.inverse.samplers.SAMPLERS` takes part; one
whose ``check(operator)`` refuses the operator is recorded as skipped.

**Tuning.** A sampler with free options (``search_space()`` non-empty) is tuned per
``(d, dy, steps)`` on separate tuning problems (seeds disjoint from the reported ones,
:func:`.inverse_tasks.problem_seed`) with ``tune_samples`` samples each: the candidate with
the lowest mean SW / floor over the tuning problems wins (ties: the first tried) and runs on
the reported problems. Candidates (:func:`candidates`) are the defaults and one option
changed at a time (``"one-at-a-time"``: every value of the search space; ``"neighbours"``:
only the values next to the default), at most ``max_candidates``.

**Image part**: held-out digits restored on the tasks of
:data:`~diffusolve.inverse.tasks.IMAGE_TASKS` (measurement noise ``image_sigma``); PSNR and
SSIM (scikit-image, ``data_range=2``) against the ground truth, FD-digits of the
restorations, class agreement with the ground truth by the bundled classifier, seconds per
image. Restorations are clipped to [-1, 1] before every metric. Image tuning (when on) uses
training-split images only, by mean PSNR.

Every unit of work is a job of :mod:`.runner` (records appended to a JSONL file as they
finish; ``--resume`` skips recorded jobs). Records are deterministic except their
``timing`` field (wall times; the image records keep seconds per image there, shown as
``seconds`` in the result's records).

Example:
    >>> from diffusolve.bench.inverse import run_inverse
    >>> out = run_inverse(methods=["ddrm"], dims=[8], dys=[1], steps=[5], problems=1,
    ...                   n_samples=64, n_projections=50, tune_problems=1, tune_samples=32,
    ...                   image_tasks=[], progress=False)
    >>> [(r["method"], r["task"], r["nfe"]) for r in out["gmm"]]
    [('ddrm', 'gmm-d8-dy1', 5)]
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distributed import open_store, run_jobs_distributed
from .inverse_tasks import (
    GMM_DIMS,
    GMM_DYS,
    MAX_PROBLEMS,
    GMMProblem,
    exact_samples,
    make_problem,
)
from .runner import TIMING, Job, RecordStore, strip_timing

__all__ = [
    "BENCH",
    "KEY_FIELDS",
    "FULL",
    "QUICK",
    "STRATEGIES",
    "candidates",
    "known_methods",
    "check_methods",
    "run_inverse",
    "MERGEABLE",
    "merge_records",
    "result_from_records",
    "markdown_report",
    "plot_results",
    "describe",
]

BENCH = "inverse"
#: the fields of a record's key (see :mod:`.runner`)
KEY_FIELDS = ("bench", "phase", "task", "method", "steps", "problem", "setting")
#: candidate strategies of the tuning (see :func:`candidates`)
STRATEGIES = ("one-at-a-time", "neighbours", "defaults")
#: per-sample noise seeds of problem ``p`` start at ``p.seed * NOISE_STRIDE``
NOISE_STRIDE = 1 << 16
#: a sampler whose rows are independent runs a problem's samples in pieces of at most this
#: many elements per ``[rows * particles, d]`` state (same rows; bounded memory: MCGdiff at
#: d = 800 needs 10 GB in one piece)
ROW_BUDGET = 1 << 25
#: the same for the digit restorations, in network rows (images x particles) per piece
IMAGE_ROW_BUDGET = 1600
#: images shown per task in the restoration panel
PANEL_IMAGES = 4

#: the full run's options
FULL: dict[str, Any] = dict(
    dims=list(GMM_DIMS),
    dys=list(GMM_DYS),
    steps=[20, 100],
    problems=20,
    n_samples=2000,
    n_projections=1000,
    tune_problems=3,
    tune_samples=500,
    strategy="one-at-a-time",
    max_candidates=16,
    image_tasks=["inpaint-box", "inpaint-random", "sr4", "deblur", "cs25"],
    n_images=100,
    image_sigma=0.05,
    image_tune="one-at-a-time",
    n_tune_images=8,
)
#: ``--quick``: d = 8 and 80, dy = 1, 20 steps, 5 problems of 256 samples, one tuning
#: problem of 128 samples with at most 3 candidates (the defaults and neighbouring values);
#: two image tasks on 4 images with default options
QUICK: dict[str, Any] = dict(
    FULL,
    dims=[8, 80],
    dys=[1],
    steps=[20],
    problems=5,
    n_samples=256,
    tune_problems=1,
    tune_samples=128,
    strategy="neighbours",
    max_candidates=3,
    image_tasks=["inpaint-box", "sr4"],
    n_images=4,
    image_tune="defaults",
)


# ----------------------------------------------------------------------------- methods
def known_methods() -> list[str]:
    """The registered posterior samplers, in registry order."""
    from ..inverse.samplers import SAMPLERS

    return list(SAMPLERS)


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """``methods`` (default: every registered sampler); ``ValueError`` for unknown names."""
    known = known_methods()
    if methods is None:
        return known
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(
            f"unknown posterior sampler {', '.join(map(repr, bad))}; choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(methods))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def candidates(method: str, strategy: str = "one-at-a-time", cap: int = 16) -> list[dict]:
    """The settings tried when tuning ``method``: the defaults first, then one option of
    ``search_space()`` changed at a time; each setting maps every searched option to its
    value. ``[{}]`` when the sampler declares nothing to tune.

    ``strategy``: ``"one-at-a-time"`` (every listed value), ``"neighbours"`` (the values
    next to the default in the sorted list, or the two nearest ends when the default is not
    listed) or ``"defaults"`` (the defaults only). At most ``cap`` settings (the first).

    Example:
        >>> from diffusolve.bench.inverse import candidates
        >>> [c["zeta"] for c in candidates("dps", "neighbours")]
        [1.0, 0.3, 3.0]
    """
    from ..inverse.samplers import get_sampler

    sampler = get_sampler(method)
    space = {k: tuple(v) for k, v in sampler.search_space().items()}
    if not space:
        return [{}]
    opts = sampler.options()
    default = {k: _jsonable(opts[k]) for k in space}
    out = [default]
    if strategy == "defaults":
        return out
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    for k, values in space.items():
        vals = [_jsonable(v) for v in values]
        if strategy == "neighbours":
            try:
                order = sorted(vals)
            except TypeError:
                order = vals
            if default[k] in order:
                i = order.index(default[k])
                vals = order[max(0, i - 1) : i + 2]
            else:
                below = [v for v in order if _lt(v, default[k])]
                above = [v for v in order if not _lt(v, default[k])]
                vals = below[-1:] + above[:1]
        for v in vals:
            if v != default[k]:
                out.append({**default, k: v})
    return out[: max(1, int(cap))]


def _lt(a: Any, b: Any) -> bool:
    try:
        return bool(a < b)
    except TypeError:
        return False


def describe(setting: dict[str, Any] | None) -> str:
    """``zeta=0.3, eta=1.0`` (``defaults`` for an empty setting)."""
    if not setting:
        return "defaults"
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()
    )


def _key(phase: str, task: str, method=None, steps=None, problem=None, setting=None) -> dict:
    return {
        "bench": BENCH,
        "phase": phase,
        "task": task,
        "method": method,
        "steps": steps,
        "problem": problem,
        "setting": setting,
    }


def _skip_reason(method: str, operator: Any) -> str | None:
    from ..inverse.samplers import get_sampler

    try:
        get_sampler(method).check(operator)
    except NotImplementedError as e:
        return str(e).splitlines()[0]
    return None


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ----------------------------------------------------------------------------- GMM
class _Problems:
    """GMM problems and their exact sample sets, built on first use (an LRU of a few)."""

    def __init__(self, size: int = 5) -> None:
        self.size = size
        self._cache: OrderedDict[tuple, GMMProblem] = OrderedDict()
        self._sets: dict[tuple, Tensor] = {}

    def problem(self, d: int, dy: int, index: int, tuning: bool) -> GMMProblem:
        key = (d, dy, index, tuning)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        p = make_problem(d, dy, index, tuning=tuning)
        self._cache[key] = p
        while len(self._cache) > self.size:
            old, _ = self._cache.popitem(last=False)
            for k in [k for k in self._sets if k[0] == old]:
                del self._sets[k]
        return p

    def exact(self, p: GMMProblem, n: int, which: int) -> Tensor:
        key = ((p.d, p.dy, p.index, p.tuning), n, which)
        if key not in self._sets:
            self._sets[key] = exact_samples(p, n, which)
        return self._sets[key]


def _problem_id(index: int, tuning: bool) -> int | str:
    return f"tune-{index}" if tuning else index


def _run_gmm(
    method: str, setting: dict, p: GMMProblem, n: int, steps: int
) -> tuple[Tensor, dict[str, Any]]:
    from ..inverse.samplers import get_sampler

    sampler = get_sampler(method, **setting)
    stats: dict[str, Any] = {}
    y = p.y.reshape(1, -1).expand(n, -1)
    x = _run_in_pieces(
        sampler, p.prior, p.operator, y, p.sigma_y, steps, p.seed * NOISE_STRIDE,
        ROW_BUDGET // p.d, dtype=torch.float64, stats=stats,
    )  # fmt: skip
    return x, {"nfe": sampler.nfe(steps), "nfe_used": stats.get("nfe")}


def _run_in_pieces(
    sampler: Any,
    model: Any,
    operator: Any,
    y: Tensor,
    sigma_y: float,
    steps: int,
    seed: int,
    budget: int,
    **kw: Any,
) -> Tensor:
    """``sampler.run`` on the rows of ``y`` with per-sample seeds ``seed + i``; a sampler
    with independent rows runs in pieces of at most ``budget`` rows x particles (the same
    rows, bit for bit: each piece gets its own rows' seeds)."""
    n = y.shape[0]
    rows = n
    if sampler.rows_independent:
        rows = max(1, min(n, budget // int(getattr(sampler, "particles", 1))))
    pieces = []
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        noise = seed if rows == n else list(range(seed + i0, seed + i1))
        part = y[i0:i1].contiguous()
        pieces.append(
            sampler.run(
                model, operator, part, sigma_y, steps=steps, noise=noise, progress=False, **kw
            )
        )
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _sw(x: Tensor, ref: Tensor, n_projections: int, seed: int) -> float:
    from ..metrics.sliced import sliced_wasserstein

    return sliced_wasserstein(x, ref, n_projections=n_projections, seed=seed)


def _floor_job(cfg: dict, probs: _Problems, d: int, dy: int, index: int, tuning: bool) -> Job:
    n = cfg["tune_samples"] if tuning else cfg["n_samples"]
    pid = _problem_id(index, tuning)

    def run(store: RecordStore) -> dict[str, Any]:
        p = probs.problem(d, dy, index, tuning)
        a, b = probs.exact(p, n, 0), probs.exact(p, n, 1)
        return {
            "d": d,
            "dy": dy,
            "n_samples": n,
            "sw_floor": _sw(b, a, cfg["n_projections"], p.seed),
            **p.info(),
        }

    label = f"gmm-d{d}-dy{dy} problem {pid}: exact sets"
    return Job(_key("floor", f"gmm-d{d}-dy{dy}", problem=pid), run, label)


def _gmm_run_job(
    cfg: dict,
    probs: _Problems,
    phase: str,
    d: int,
    dy: int,
    index: int,
    tuning: bool,
    method: str,
    steps: int,
    setting: dict,
    extra: dict[str, Any] | None = None,
) -> Job:
    task = f"gmm-d{d}-dy{dy}"
    n = cfg["tune_samples"] if tuning else cfg["n_samples"]
    pid = _problem_id(index, tuning)

    def run(store: RecordStore) -> dict[str, Any]:
        floor = (store.get(_key("floor", task, problem=pid)) or {}).get("sw_floor")
        p = probs.problem(d, dy, index, tuning)
        rec: dict[str, Any] = {"d": d, "dy": dy, "nfe": None, "sw": None, "sw_floor": floor}
        rec["ratio"] = None
        rec["error"] = None
        rec.update(extra or {})
        start = time.perf_counter()
        try:
            x, info = _run_gmm(method, setting, p, n, steps)
            rec["nfe"] = info["nfe"]
            sw = _sw(x, probs.exact(p, n, 0), cfg["n_projections"], p.seed)
            rec["sw"] = sw if math.isfinite(sw) else None
        except Exception as e:  # noqa: BLE001 - recorded, never dropped
            rec["error"] = _short(e)
        if rec["sw"] is not None and floor:
            rec["ratio"] = rec["sw"] / floor
        rec[TIMING] = {"run_seconds": time.perf_counter() - start}
        return rec

    label = f"{task} steps={steps} {method} problem {pid}"
    if phase == "tune":
        label += f" [{describe(setting)}]"
    return Job(_key(phase, task, method, steps, pid, setting), run, label)


def _pick(store: RecordStore, keys: list[list[dict]], cands: list[dict], higher: bool = False):
    """The candidate with the best mean score over its trial records, and that score."""
    best, best_score = 0, None
    field = "psnr" if higher else "ratio"
    for i, ks in enumerate(keys):
        vals = [(store.get(k) or {}).get(field) for k in ks]
        if not vals or any(v is None or not math.isfinite(v) for v in vals):
            continue
        score = sum(vals) / len(vals)
        if best_score is None or (score > best_score if higher else score < best_score):
            best, best_score = i, score
    return cands[best], best_score


def _gmm_plan(cfg: dict, store: RecordStore, probs: _Problems) -> Iterator[Job]:
    from ..inverse.matrix import MatrixOperator

    for d in cfg["dims"]:
        for dy in cfg["dys"]:
            task = f"gmm-d{d}-dy{dy}"
            op = MatrixOperator(torch.zeros(dy, d), (d,))
            chosen: dict[tuple[int, str], tuple[dict, dict]] = {}
            skipped = {m: _skip_reason(m, op) for m in cfg["methods"]}
            tuned = [m for m in cfg["methods"] if not skipped[m] and len(_cands(cfg, m, "gmm")) > 1]
            if tuned:
                for j in range(cfg["tune_problems"]):
                    yield _floor_job(cfg, probs, d, dy, j, True)
            for steps in cfg["steps"]:
                for m in cfg["methods"]:
                    if skipped[m]:
                        note = skipped[m]
                        yield Job(
                            _key("skip", task, m, steps),
                            lambda s, note=note, d=d, dy=dy: {"d": d, "dy": dy, "note": note},
                            f"{task} steps={steps} {m}: skipped",
                        )
                        continue
                    cands = _cands(cfg, m, "gmm")
                    if len(cands) == 1:
                        chosen[(steps, m)] = (cands[0], {"tuned": False})
                        continue
                    keys: list[list[dict]] = []
                    for c in cands:
                        keys.append([])
                        for j in range(cfg["tune_problems"]):
                            job = _gmm_run_job(cfg, probs, "tune", d, dy, j, True, m, steps, c)
                            keys[-1].append(job.key)
                            yield job
                    win, score = _pick(store, keys, cands)
                    chosen[(steps, m)] = (
                        win,
                        {"tuned": True, "candidates": len(cands), "tune_ratio": score},
                    )
            for i in range(cfg["problems"]):
                yield _floor_job(cfg, probs, d, dy, i, False)
                for steps in cfg["steps"]:
                    for m in cfg["methods"]:
                        if skipped[m]:
                            continue
                        setting, extra = chosen[(steps, m)]
                        yield _gmm_run_job(
                            cfg, probs, "gmm", d, dy, i, False, m, steps, setting, extra
                        )


def _cands(cfg: dict, method: str, part: str) -> list[dict]:
    strategy = cfg["strategy"] if part == "gmm" else cfg["image_tune"]
    return candidates(method, strategy, cfg["max_candidates"])


# ----------------------------------------------------------------------------- images
class _Images:
    """The digits model, classifier, images and measurements, loaded on first use."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self._model = self._classifier = None
        self._data: dict[str, Tensor] = {}
        self._ops: dict[str, Any] = {}

    @property
    def model(self) -> Any:
        if self._model is None:
            from ..models import load

            self._model = load("digits")
        return self._model

    @property
    def classifier(self) -> Any:
        if self._classifier is None:
            from ..models.bundled import load_classifier

            self._classifier = load_classifier("digits")
        return self._classifier

    def images(self, split: str) -> Tensor:
        if split not in self._data:
            from ..models.data import load_digits

            n = self.cfg["n_images"] if split == "heldout" else self.cfg["n_tune_images"]
            x, _ = load_digits(split)
            self._data[split] = x[:n].clone()
        return self._data[split]

    def operator(self, task: str) -> Any:
        if task not in self._ops:
            from ..inverse.tasks import make_task

            self._ops[task] = make_task(task, (1, 16, 16), seed=0)
        return self._ops[task]

    def measurement(self, task: str, split: str) -> Tensor:
        from ..inverse.tasks import IMAGE_TASKS

        key = f"y:{task}:{split}"
        if key not in self._data:
            x = self.images(split)
            clean = self.operator(task).A(x)
            seed = list(IMAGE_TASKS).index(task) + (100 if split == "heldout" else 200)
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(clean.shape, generator=g, dtype=clean.dtype)
            self._data[key] = clean + self.cfg["image_sigma"] * noise
        return self._data[key]

    def image_space(self, task: str, y: Tensor) -> Tensor:
        """The measurement shown as an image: ``A^+ y`` where available, else ``A^T y``."""
        op = self.operator(task)
        return op.pinv(y) if op.has_pinv else op.At(y)

    def labels(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.classifier(x.to(torch.float32), 0.0).argmax(1)


def _image_metrics(x: Tensor, truth: Tensor) -> dict[str, float]:
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError as e:  # pragma: no cover - dependency message
        raise ImportError(
            "bench inverse's image part needs scikit-image: pip install 'diffusolve[bench]'"
        ) from e
    a = truth.detach().double().cpu().numpy()
    b = x.detach().double().clamp(-1, 1).cpu().numpy()
    psnr = [peak_signal_noise_ratio(a[i, 0], b[i, 0], data_range=2.0) for i in range(len(a))]
    ssim = [structural_similarity(a[i, 0], b[i, 0], data_range=2.0) for i in range(len(a))]
    return {
        "psnr": float(sum(min(v, 100.0) for v in psnr) / len(psnr)),
        "ssim": float(sum(ssim) / len(ssim)),
    }


def _panel(x: Tensor) -> list:
    return [[round(float(v), 3) for v in img.flatten()] for img in x[:PANEL_IMAGES]]


def _image_task_job(imgs: _Images, task: str) -> Job:
    def run(store: RecordStore) -> dict[str, Any]:
        from ..inverse.tasks import IMAGE_TASKS

        x = imgs.images("heldout")
        shown = imgs.image_space(task, imgs.measurement(task, "heldout"))
        return {
            "description": IMAGE_TASKS[task][0],
            "n_images": int(x.shape[0]),
            "measurement": "pinv" if imgs.operator(task).has_pinv else "adjoint",
            **_image_metrics(shown, x),
            "truth_panel": _panel(x),
            "measurement_panel": _panel(shown.clamp(-1, 1)),
        }

    return Job(_key("image-task", task), run, f"{task}: measurement")


def _image_run(imgs: _Images, task: str, method: str, steps: int, setting: dict, split: str):
    from ..inverse.samplers import get_sampler

    sampler = get_sampler(method, **setting)
    y = imgs.measurement(task, split)
    start = time.perf_counter()
    x = _run_in_pieces(
        sampler, imgs.model, imgs.operator(task), y, imgs.cfg["image_sigma"], steps,
        0 if split == "heldout" else 1 << 20, IMAGE_ROW_BUDGET,
    )  # fmt: skip
    return x, sampler.nfe(steps), time.perf_counter() - start


def _image_tune_job(imgs: _Images, task: str, method: str, steps: int, setting: dict) -> Job:
    def run(store: RecordStore) -> dict[str, Any]:
        try:
            x, nfe, _ = _image_run(imgs, task, method, steps, setting, "train")
            return {"nfe": nfe, **_image_metrics(x, imgs.images("train")), "error": None}
        except Exception as e:  # noqa: BLE001
            return {"nfe": None, "psnr": None, "ssim": None, "error": _short(e)}

    label = f"{task} steps={steps} {method} train [{describe(setting)}]"
    return Job(_key("image-tune", task, method, steps, "train", setting), run, label)


def _image_job(
    imgs: _Images, task: str, method: str, steps: int, setting: dict, extra: dict
) -> Job:
    def run(store: RecordStore) -> dict[str, Any]:
        from scipy.linalg import LinAlgWarning

        from ..models.digits_metric import fd_digits

        rec: dict[str, Any] = {
            "nfe": None,
            "psnr": None,
            "ssim": None,
            "fd": None,
            "class_agreement": None,
            "error": None,
            **extra,
        }
        truth = imgs.images("heldout")
        try:
            x, nfe, seconds = _image_run(imgs, task, method, steps, setting, "heldout")
        except Exception as e:  # noqa: BLE001
            rec["error"] = _short(e)
            return rec
        x = x.detach().float().clamp(-1, 1)
        rec.update(nfe=nfe, **_image_metrics(x, truth))
        with warnings.catch_warnings():  # few images: singular covariances, regularised
            warnings.simplefilter("ignore", LinAlgWarning)
            rec["fd"] = fd_digits(x) if x.shape[0] >= 2 else None
        agree = imgs.labels(x) == imgs.labels(truth)
        rec["class_agreement"] = float(agree.double().mean())
        rec["panel"] = _panel(x)
        rec[TIMING] = {"seconds_per_image": seconds / x.shape[0]}
        return rec

    label = f"{task} steps={steps} {method} heldout"
    return Job(_key("image", task, method, steps, "heldout", setting), run, label)


def _image_plan(cfg: dict, store: RecordStore, imgs: _Images) -> Iterator[Job]:
    for task in cfg["image_tasks"]:
        yield _image_task_job(imgs, task)
        op = imgs.operator(task)
        skipped = {m: _skip_reason(m, op) for m in cfg["methods"]}
        for steps in cfg["steps"]:
            for m in cfg["methods"]:
                if skipped[m]:
                    note = skipped[m]
                    yield Job(
                        _key("skip", task, m, steps),
                        lambda s, note=note: {"note": note},
                        f"{task} steps={steps} {m}: skipped",
                    )
                    continue
                cands = _cands(cfg, m, "image")
                extra: dict[str, Any] = {"tuned": False}
                setting = cands[0]
                if len(cands) > 1:
                    keys = []
                    for c in cands:
                        job = _image_tune_job(imgs, task, m, steps, c)
                        keys.append([job.key])
                        yield job
                    setting, score = _pick(store, keys, cands, higher=True)
                    extra = {"tuned": True, "candidates": len(cands), "tune_psnr": score}
                yield _image_job(imgs, task, m, steps, setting, extra)


# ----------------------------------------------------------------------------- the run
def _progress_line(k: int, total: int, job: Job, rec: dict[str, Any]) -> str:
    seconds = (rec.get(TIMING) or {}).get("seconds")
    bits = []
    if rec.get("error"):
        bits.append(f"failed ({rec['error'][:80]})")
    elif rec.get("note"):
        bits.append(rec["note"][:80])
    elif rec.get("phase") == "floor":
        bits.append(f"floor {rec['sw_floor']:.3g}")
    elif rec.get("sw") is not None:
        bits.append(f"sw {rec['sw']:.3g}")
        if rec.get("ratio") is not None:
            bits.append(f"({rec['ratio']:.2f}x floor)")
    elif rec.get("psnr") is not None:
        bits.append(f"psnr {rec['psnr']:.2f} ssim {rec['ssim']:.3f}")
    if seconds is not None:
        bits.append(f"{seconds:.1f} s")
    return f"[{k}/{total}] {job.label}: " + " ".join(bits)


#: configuration fields that may differ between runs whose records are merged: the records
#: are keyed by task, method, steps and problem, so these choose which records exist, never
#: their values
MERGEABLE = ("dims", "dys", "steps", "problems", "image_tasks")


def merge_records(store: RecordStore, path: str | Path) -> int:
    """Add the records of another run's records file that ``store`` lacks; returns how
    many. The other run must be of this bench with the same configuration apart from
    :data:`MERGEABLE` (and the methods): the same sample sizes, directions and tuning, so its
    records are what this run would have written.

    Raises:
        ValueError: ``path`` is not a records file of this bench, or its configuration
            differs in a field that changes record values.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--merge: {path} is not a file")
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0])["header"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        head = None
    if not isinstance(head, dict) or head.get("bench") != BENCH:
        raise ValueError(f"--merge: {path} is not a records file of bench {BENCH!r}")
    if tuple(head.get("key_fields", ())) != KEY_FIELDS:
        raise ValueError(f"--merge: {path} uses other key fields {head.get('key_fields')}")
    mine, theirs = store.header["config"], head.get("config", {})
    for k in sorted(set(mine) | set(theirs)):
        if k not in MERGEABLE and mine.get(k) != theirs.get(k):
            raise ValueError(
                f"--merge: {path} was written with {k}={theirs.get(k)!r}, this run has "
                f"{k}={mine.get(k)!r}; only runs that differ in methods, "
                f"{', '.join(MERGEABLE)} can be merged"
            )
    added = 0
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break  # a last line cut by a kill
            raise ValueError(f"--merge: {path}: line {i} is not JSON") from None
        if rec not in store:
            store.append(rec)
            added += 1
    return added


def run_inverse(
    *,
    methods: Sequence[str] | None = None,
    dims: Sequence[int] = FULL["dims"],
    dys: Sequence[int] = FULL["dys"],
    steps: Sequence[int] = FULL["steps"],
    problems: int = FULL["problems"],
    n_samples: int = FULL["n_samples"],
    n_projections: int = FULL["n_projections"],
    tune_problems: int = FULL["tune_problems"],
    tune_samples: int = FULL["tune_samples"],
    strategy: str = FULL["strategy"],
    max_candidates: int = FULL["max_candidates"],
    image_tasks: Sequence[str] = FULL["image_tasks"],
    n_images: int = FULL["n_images"],
    image_sigma: float = FULL["image_sigma"],
    image_tune: str = FULL["image_tune"],
    n_tune_images: int = FULL["n_tune_images"],
    quick: bool = False,
    records: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    merge: Sequence[str | Path] = (),
    report_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the inverse-problem bench and return the JSON-ready result.

    Args:
        methods: posterior samplers (default: every registered one).
        dims, dys: GMM data and measurement dimensions (subsets of
            :data:`~.inverse_tasks.GMM_DIMS`, :data:`~.inverse_tasks.GMM_DYS`).
        steps: step counts (GMM and images).
        problems: reported GMM problems per ``(d, dy)``.
        n_samples: samples per method and problem (and the size of each exact set).
        n_projections: SW directions.
        tune_problems, tune_samples: tuning problems per ``(d, dy)`` and their sample size.
        strategy, max_candidates: GMM candidate settings (:func:`candidates`).
        image_tasks: image task names (empty: no image part).
        n_images: held-out digits restored per task; ``image_sigma``: measurement noise.
        image_tune: candidate strategy for images (``"defaults"``: no tuning), on
            ``n_tune_images`` training digits.
        quick: recorded in the configuration (for the report).
        records: JSONL records file (``None``: in memory only).
        resume, overwrite: continue / restart an existing records file.
        merge: records files of other runs of this bench to take finished jobs from (runs
            split by method, dimension or step count; see :func:`merge_records`); with a
            records file they are appended to it.
        report_only: run nothing: the result of ``records`` (if it exists) and ``merge``
            alone, read in memory (no file is written). Cells with fewer finished problems
            than ``problems`` say so in the report.
        progress: print one line per finished job (to ``log``, default stderr).

    Raises:
        ValueError: bad sizes, names or dimensions, or a records file of another configuration.
        runner.RecordsExistError: ``records`` exists and neither ``resume`` nor ``overwrite``.
    """
    from ..inverse.tasks import IMAGE_TASKS

    cfg: dict[str, Any] = dict(
        methods=check_methods(methods),
        dims=[int(d) for d in dims],
        dys=[int(v) for v in dys],
        steps=[int(s) for s in steps],
        problems=int(problems),
        n_samples=int(n_samples),
        n_projections=int(n_projections),
        tune_problems=int(tune_problems),
        tune_samples=int(tune_samples),
        strategy=strategy,
        max_candidates=int(max_candidates),
        image_tasks=list(image_tasks),
        n_images=int(n_images),
        image_sigma=float(image_sigma),
        image_tune=image_tune,
        n_tune_images=int(n_tune_images),
        quick=bool(quick),
    )
    _validate(cfg, IMAGE_TASKS)
    config = {k: v for k, v in cfg.items() if k != "methods"}
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if report_only:
        own = [Path(records)] if records is not None and Path(records).exists() else []
        sources = own + [Path(p) for p in merge]
        if not sources:
            raise ValueError("report only: no records to report (give --records or --merge)")
        store = RecordStore(None, bench=BENCH, key_fields=KEY_FIELDS, config=config)
        added = sum(merge_records(store, p) for p in sources)
        meta = {
            **cfg,
            "records": ", ".join(map(str, sources)),
            "records_run": 0,
            "records_resumed": added,
            "report_only": True,
            "seconds": 0.0,
            "registered": known_methods(),
            "torch": torch.__version__,
        }
        return result_from_records(store, meta)
    store = open_store(
        records,
        bench=BENCH,
        key_fields=KEY_FIELDS,
        config=config,
        mode="resume" if resume else ("overwrite" if overwrite else "new"),
    )
    for p in merge:
        n_added = merge_records(store, p)
        log(f"merged {n_added} finished jobs from {p}")

    def plan(st: RecordStore) -> Iterator[Job]:
        yield from _gmm_plan(cfg, st, _Problems())
        if cfg["image_tasks"]:
            yield from _image_plan(cfg, st, _Images(cfg))

    # the plan's shape does not depend on results: count it against an empty store
    total = sum(1 for _ in plan(RecordStore(None, bench=BENCH, key_fields=KEY_FIELDS)))
    count = [0]

    def on_record(job: Job, rec: dict[str, Any], skipped: bool) -> None:
        count[0] += 1
        if progress and not skipped:
            log(_progress_line(count[0], total, job, rec))

    start = time.perf_counter()
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # samplers that need gradients enable them themselves
    try:
        n_run, n_skipped = run_jobs_distributed(plan(store), store, on_record=on_record)
    finally:
        torch.set_grad_enabled(grad_was)
    meta = {
        **cfg,
        "records": None if records is None else str(records),
        "records_run": n_run,
        "records_resumed": n_skipped,
        "seconds": round(time.perf_counter() - start, 1),
        "registered": known_methods(),
        "torch": torch.__version__,
    }
    return result_from_records(store, meta)


def _validate(cfg: dict, image_tasks: dict) -> None:
    for name in ("problems", "n_samples", "n_projections", "tune_samples", "max_candidates"):
        if cfg[name] < 1:
            raise ValueError(f"{name} must be a positive integer; got {cfg[name]}")
    if cfg["problems"] > MAX_PROBLEMS:
        raise ValueError(f"problems must be at most {MAX_PROBLEMS}; got {cfg['problems']}")
    if cfg["n_samples"] > NOISE_STRIDE or cfg["tune_samples"] > NOISE_STRIDE:
        raise ValueError(f"at most {NOISE_STRIDE} samples per problem")
    if cfg["tune_problems"] < 0 or cfg["n_tune_images"] < 1 or cfg["n_images"] < 1:
        raise ValueError("tune_problems must be >= 0 and the image counts >= 1")
    if not cfg["steps"] or min(cfg["steps"]) < 1:
        raise ValueError(f"steps must be positive integers; got {cfg['steps']}")
    for d in cfg["dims"]:
        if d not in GMM_DIMS:
            raise ValueError(f"GMM dimensions must be among {GMM_DIMS}; got {d}")
    for dy in cfg["dys"]:
        if dy not in GMM_DYS:
            raise ValueError(f"measurement dimensions must be among {GMM_DYS}; got {dy}")
    bad = [t for t in cfg["image_tasks"] if t not in image_tasks]
    if bad:
        raise ValueError(
            f"unknown image task {', '.join(map(repr, bad))}; choose from {', '.join(image_tasks)}"
        )
    for k in ("strategy", "image_tune"):
        if cfg[k] not in STRATEGIES:
            raise ValueError(f"{k} must be one of {STRATEGIES}; got {cfg[k]!r}")
    if cfg["tune_problems"] == 0 and cfg["strategy"] != "defaults":
        raise ValueError("tuning needs tune_problems >= 1 (or strategy='defaults')")
    if not (cfg["image_sigma"] >= 0 and math.isfinite(cfg["image_sigma"])):
        raise ValueError(f"image_sigma must be finite and >= 0; got {cfg['image_sigma']}")


# ----------------------------------------------------------------------------- results
def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def _tuned_setting(
    store: RecordStore, meta: dict[str, Any], task: str, method: str, steps: int, part: str
) -> dict | None:
    """The setting that the current search space picks from the finished tuning records of
    a cell, as the run's plan picks it; ``None`` when the method is not tuned or a
    candidate's tuning is missing."""
    cands = _cands(meta, method, part)
    if len(cands) < 2:
        return None
    if part == "gmm":
        keys = [
            [
                _key("tune", task, method, steps, _problem_id(j, True), c)
                for j in range(meta["tune_problems"])
            ]
            for c in cands
        ]
    else:
        keys = [[_key("image-tune", task, method, steps, "train", c)] for c in cands]
    if any(store.get(k) is None for ks in keys for k in ks):
        return None
    return _pick(store, keys, cands, higher=part != "gmm")[0]


def _current_setting(recs: list[dict[str, Any]], tuned: dict | None = None) -> list[dict[str, Any]]:
    """The records of one setting: where a cell holds results of several (a search space
    that grew since a merged run was tuned), the one the current search space picks from
    the tuning records (``tuned``), else the one chosen from the most candidates (then by
    its tuning score); never a mean over settings."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(json.dumps(r.get("setting"), sort_keys=True), []).append(r)
    if len(groups) <= 1:
        return recs
    if tuned is not None:
        mine = groups.get(json.dumps(tuned, sort_keys=True))
        if mine:
            return mine

    def rank(g: list[dict[str, Any]]) -> tuple[float, float]:
        tr = g[0].get("tune_ratio")
        return (-float(g[0].get("candidates") or 0), float(tr) if tr is not None else math.inf)

    return min(groups.values(), key=rank)


def result_from_records(store: RecordStore, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready result from a run's records, in plan order whatever the file order.

    ``gmm``: one record per method, setting and problem; ``gmm_summary``: per ``(d, dy,
    steps)`` each method's mean SW, the mean floor and the best method; ``images``: one
    record per task, method and steps; ``skipped``: methods a task's operator refused.
    """
    methods, steps_list = meta["methods"], meta["steps"]
    gmm: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for d in meta["dims"]:
        for dy in meta["dys"]:
            task = f"gmm-d{d}-dy{dy}"
            floors = [
                r["sw_floor"]
                for i in range(meta["problems"])
                if (r := store.get(_key("floor", task, problem=i))) is not None
            ]
            for steps in steps_list:
                row: dict[str, Any] = {
                    "task": task,
                    "d": d,
                    "dy": dy,
                    "steps": steps,
                    "sw_floor": _mean(floors),
                    "methods": {},
                }
                for m in methods:
                    skip = store.get(_key("skip", task, m, steps))
                    if skip is not None:
                        skipped.append(
                            {"task": task, "method": m, "steps": steps, "note": skip["note"]}
                        )
                        row["methods"][m] = {"skipped": skip["note"]}
                        continue
                    recs = [
                        r
                        for r in store.select(phase="gmm", task=task, method=m, steps=steps)
                        if isinstance(r.get("problem"), int) and r["problem"] < meta["problems"]
                    ]
                    recs = _current_setting(
                        recs, _tuned_setting(store, meta, task, m, steps, "gmm")
                    )
                    recs.sort(key=lambda r: r["problem"])
                    for r in recs:
                        gmm.append(_public(r))
                    ok = [r for r in recs if r.get("sw") is not None]
                    fl = [r["sw_floor"] for r in ok if r.get("sw_floor")]
                    sw = _mean([r["sw"] for r in ok])
                    row["methods"][m] = {
                        "sw": sw,
                        "ratio": None if sw is None or not fl else sw / _mean(fl),
                        "problems": len(ok),
                        "failed": len(recs) - len(ok),
                        "errors": sorted({r["error"] for r in recs if r.get("error")}),
                        "setting": recs[0]["setting"] if recs else None,
                        "nfe": next((r["nfe"] for r in recs if r.get("nfe") is not None), None),
                        "tune_ratio": recs[0].get("tune_ratio") if recs else None,
                        "candidates": recs[0].get("candidates") if recs else None,
                    }
                ranked = [
                    (v["ratio"], m)
                    for m, v in row["methods"].items()
                    if v.get("ratio") is not None and not v.get("failed")
                ]
                row["best"] = min(ranked)[1] if ranked else None
                row["best_ratio"] = min(ranked)[0] if ranked else None
                summary.append(row)
    images: list[dict[str, Any]] = []
    tasks: dict[str, Any] = {}
    for task in meta["image_tasks"]:
        info = store.get(_key("image-task", task))
        if info is not None:
            tasks[task] = strip_timing(info)
        for steps in steps_list:
            for m in methods:
                skip = store.get(_key("skip", task, m, steps))
                if skip is not None:
                    skipped.append(
                        {"task": task, "method": m, "steps": steps, "note": skip["note"]}
                    )
                    continue
                recs = store.select(phase="image", task=task, method=m, steps=steps)
                if recs:
                    tuned = _tuned_setting(store, meta, task, m, steps, "image")
                    recs = _current_setting(recs, tuned)
                    images.append(_public(recs[-1]))
    return {
        "bench": BENCH,
        "gmm": gmm,
        "gmm_summary": summary,
        "images": images,
        "image_tasks": tasks,
        "skipped": skipped,
        "meta": meta,
    }


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in strip_timing(rec).items() if k not in ("bench", "phase")}
    timing = rec.get(TIMING) or {}
    out["seconds"] = timing.get("seconds_per_image", timing.get("run_seconds"))
    return out


# ----------------------------------------------------------------------------- report
def _f(v: float | None, digits: int = 3) -> str:
    return "--" if v is None else f"{v:.{digits}g}"


def protocol_text(meta: dict[str, Any]) -> str:
    """The set-up and tuning protocol of a run, as Markdown paragraphs."""
    strat = {
        "one-at-a-time": "the defaults and each option changed alone to every value of the "
        "sampler's search space",
        "neighbours": "the defaults and each option changed alone to the search-space values "
        "next to its default",
        "defaults": "the defaults only (no tuning)",
    }
    q = (
        "**Quick run** (`--quick`): a reduced configuration (fewer dimensions, problems, "
        "samples, tuning problems and candidates, two image tasks on a few images, image "
        "options at their defaults); its numbers are a smoke test, not the benchmark.\n\n"
        if meta.get("quick")
        else ""
    )
    return (
        q + "**GMM set-up** (MCGdiff): 25-component mixture, means on the 5x5 grid (-8i, -8j) "
        "tiled to dimension d, identity covariances, weights from squared standard normals; "
        "A = U diag(s) V[:dy] with s sorted U(0,1) draws; sigma_y = U(0,1) x s_max; y = A x* + "
        "sigma_y eps with x* from the prior; the process is DDPM-linear and the mixture is the "
        "exact denoiser (float64). Each problem has its own seed (2^i_d 3^i_dy 10^4 + i). "
        f"Every method draws {meta['n_samples']} samples per problem; sw = sliced Wasserstein "
        f"distance ({meta['n_projections']} random directions) to {meta['n_samples']} exact "
        "posterior samples; floor = the same distance between two independent exact sets of "
        f"that size. {meta['problems']} problems per (d, dy); ratio = mean sw / mean floor.\n\n"
        f"**Tuning protocol.** A sampler with free options is tuned per (d, dy, steps) on "
        f"{meta['tune_problems']} separate tuning problem(s) (seeds + 5000: never a reported "
        f"problem) with {meta['tune_samples']} samples each; candidates are "
        f"{strat[meta['strategy']]} (at most {meta['max_candidates']}); the candidate with "
        "the lowest mean sw/floor over the tuning problems is run on the reported problems "
        "(its setting is in the records and the settings table). Images: "
        + (
            "options at their defaults (no tuning)."
            if meta["image_tune"] == "defaults"
            else f"{strat[meta['image_tune']]}, scored by mean PSNR on the first "
            f"{meta['n_tune_images']} training-split digits (never the held-out ones)."
        )
        + "\n\n"
        f"**Images**: the first {meta['n_images']} held-out digits, sigma_y = "
        f"{meta['image_sigma']:g}; PSNR / SSIM (scikit-image, data_range 2) against the ground "
        "truth, FD-digits of the restorations against the held-out split (biased upward at "
        "small sizes; below 65 images the covariances are singular and regularised), class "
        "agreement = share of restorations the bundled classifier labels like the ground "
        "truth; restorations clipped to [-1, 1]; s/img = wall seconds per image of a batched "
        "run (seconds depend on the machine's load)."
    )


def markdown_report(result: dict[str, Any]) -> str:
    """The Markdown report: protocol, GMM table, chosen settings, image table, notes."""
    meta = result["meta"]
    methods = meta["methods"]
    lines = ["## diffusolve bench inverse", "", protocol_text(meta), ""]
    if result["gmm_summary"]:
        lines += [
            "### GMM: mean sliced Wasserstein to the exact posterior (ratio to the floor)",
            "",
            "| d | dy | steps | floor | " + " | ".join(methods) + " | best (ratio) |",
            "|---|---|---|---|" + "---|" * len(methods) + "---|",
        ]
        for row in result["gmm_summary"]:
            cells = []
            for m in methods:
                v = row["methods"].get(m, {})
                if "skipped" in v:
                    cells.append("n/a¹")
                elif v.get("sw") is None:
                    cells.append("failed²" if v.get("failed") else "--")
                else:
                    c = f"{_f(v['sw'])} ({_f(v['ratio'])}x)"
                    if v.get("problems", meta["problems"]) < meta["problems"]:
                        c += f" [{v['problems']}/{meta['problems']}]"
                    if v.get("failed"):
                        c += f" ({v['failed']} failed²)"
                    if m == row["best"]:
                        c = f"**{c}**"
                    cells.append(c)
            best = "--" if row["best"] is None else f"{row['best']} ({_f(row['best_ratio'])}x)"
            lines.append(
                f"| {row['d']} | {row['dy']} | {row['steps']} | {_f(row['sw_floor'])} | "
                + " | ".join(cells)
                + f" | {best} |"
            )
        lines += ["", "### GMM: settings used (chosen on the tuning problems)", ""]
        lines += ["| d | dy | steps | method | NFE | setting | tuning sw/floor | candidates |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for row in result["gmm_summary"]:
            for m in methods:
                v = row["methods"].get(m, {})
                if "skipped" in v or v.get("setting") is None:
                    continue
                lines.append(
                    f"| {row['d']} | {row['dy']} | {row['steps']} | {m} | {v.get('nfe') or '--'} "
                    f"| {describe(v['setting'])} | {_f(v.get('tune_ratio'))} | "
                    f"{v.get('candidates') or 1} |"
                )
        lines.append("")
    if result["images"] or result["image_tasks"]:
        lines += [
            f"### Images: held-out digits, sigma_y = {meta['image_sigma']:g}",
            "",
            "| task | steps | method | NFE | setting | PSNR | SSIM | FD-digits | class agreement | s/img |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for task in meta["image_tasks"]:
            info = result["image_tasks"].get(task)
            if info is not None:
                name = "A^+ y" if info["measurement"] == "pinv" else "A^T y"
                lines.append(
                    f"| {task} | -- | {name} (measurement) | -- | -- | {info['psnr']:.2f} | "
                    f"{info['ssim']:.3f} | -- | -- | -- |"
                )
            for r in [r for r in result["images"] if r["task"] == task]:
                if r.get("error"):
                    lines.append(
                        f"| {task} | {r['steps']} | {r['method']} | -- | {describe(r['setting'])} "
                        "| failed² | | | | |"
                    )
                    continue
                lines.append(
                    f"| {task} | {r['steps']} | {r['method']} | {r['nfe']} | "
                    f"{describe(r['setting'])} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                    f"{_f(r['fd'])} | {r['class_agreement']:.2f} | {_f(r['seconds'], 2)} |"
                )
        lines.append("")
    notes = []
    if result["skipped"]:
        seen = dict.fromkeys((s["task"], s["method"], s["note"]) for s in result["skipped"])
        notes.append("¹ skipped (the operator lacks what the sampler needs):")
        notes += [f"- {t} / {m}: {n}" for t, m, n in seen]
    errors = []
    for row in result["gmm_summary"]:
        for m, v in row["methods"].items():
            for e in v.get("errors") or []:
                errors.append((row["task"], row["steps"], m, e))
    errors += [
        (r["task"], r["steps"], r["method"], r["error"]) for r in result["images"] if r.get("error")
    ]
    if errors:
        notes.append("² failed runs (recorded with their error):")
        notes += [f"- {t} steps={s} {m}: {e}" for t, s, m, e in dict.fromkeys(errors)]
    if notes:
        lines += notes + [""]
    partial = any(
        v.get("problems", meta["problems"]) < meta["problems"]
        for row in result["gmm_summary"]
        for v in row["methods"].values()
        if "skipped" not in v and v.get("sw") is not None
    )
    if partial:
        lines += [
            f"[k/{meta['problems']}]: the mean over the k problems finished so far (the floor "
            "and the ratio over the same problems).",
            "",
        ]
    if meta.get("report_only"):
        lines.append(
            f"(report of {meta['records_resumed']} records from {meta['records']}, no job "
            f"run; registered samplers: {', '.join(meta['registered'])})"
        )
    else:
        lines.append(
            f"({meta['seconds']} s; {meta['records_run']} jobs run, {meta['records_resumed']} "
            f"resumed from {meta['records']}; registered samplers: "
            f"{', '.join(meta['registered'])})"
        )
    return "\n".join(lines)


def plot_results(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``inverse_gmm_sw.png`` (mean SW vs steps per (d, dy), floor dashed) and one
    ``inverse_panel_<task>.png`` per image task (measurement, each method, ground truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta, paths = result["meta"], []
    methods = meta["methods"]
    # tab20's saturated colours first, then its pale ones
    colours = [plt.cm.tab20.colors[i] for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    markers = "osD^v<>pP*Xh"
    if result["gmm_summary"]:
        dims, dys = meta["dims"], meta["dys"]
        fig, axes = plt.subplots(
            len(dims), len(dys), figsize=(4.6 * len(dys) + 1.8, 3.6 * len(dims)), squeeze=False
        )
        for a, d in enumerate(dims):
            for b, dy in enumerate(dys):
                ax = axes[a][b]
                rows = [r for r in result["gmm_summary"] if r["d"] == d and r["dy"] == dy]
                for i, m in enumerate(methods):
                    pts = [
                        (r["steps"], r["methods"][m]["sw"])
                        for r in rows
                        if r["methods"].get(m, {}).get("sw") is not None
                    ]
                    if pts:
                        xs, ys = zip(*sorted(pts), strict=True)
                        ax.plot(
                            xs,
                            ys,
                            "-",
                            marker=markers[i % len(markers)],
                            ms=4,
                            color=colours[i % len(colours)],
                            label=m,
                        )
                fl = [(r["steps"], r["sw_floor"]) for r in rows if r["sw_floor"] is not None]
                if fl:
                    xs, ys = zip(*sorted(fl), strict=True)
                    ax.plot(xs, ys, "k--", marker="_", ms=14, lw=1.5, label="noise floor")
                ax.set_yscale("log")
                ax.set_xticks(meta["steps"], [str(s) for s in meta["steps"]])
                ax.set_title(f"d={d}, dy={dy}", fontsize=9)
                ax.set_xlabel("steps")
                ax.set_ylabel("mean sliced W2 to exact posterior")
                ax.grid(True, alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 1 - 1.8 / (4.6 * len(dys) + 1.8), 1))
        path = out / "inverse_gmm_sw.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    last = max(meta["steps"])
    for task, info in result["image_tasks"].items():
        recs = [
            r
            for r in result["images"]
            if r["task"] == task and r["steps"] == last and r.get("panel")
        ]
        cols = [("measurement", info["measurement_panel"])]
        cols += [(r["method"], r["panel"]) for r in recs]
        cols.append(("ground truth", info["truth_panel"]))
        n = len(info["truth_panel"])
        fig, axes = plt.subplots(n, len(cols), figsize=(1.2 * len(cols), 1.25 * n), squeeze=False)
        for j, (title, panel) in enumerate(cols):
            for i in range(n):
                ax = axes[i][j]
                ax.imshow(
                    torch.tensor(panel[i]).reshape(16, 16).numpy(), cmap="gray", vmin=-1, vmax=1
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=7)
        fig.suptitle(f"{task} (sigma_y={meta['image_sigma']:g}, {last} steps)", fontsize=8)
        fig.tight_layout()
        path = out / f"inverse_panel_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
