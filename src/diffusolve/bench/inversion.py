"""``diffusolve bench inversion``: round-trip error of every inversion method, with diffusers'
DDIM inversion side by side, and edits on digits.

**Round trips.** For every task, guidance scale, step count and dtype, each method inverts
the task's data under its condition (:func:`diffusolve.inversion.invert`) and regenerates
it (:func:`diffusolve.inversion.reconstruct`); ``recon_error`` is the relative L2 error
``|x_rec - x| / |x|`` per sample, averaged (its maximum is kept as ``recon_error_max``).
``nfe_used`` counts the network's forward evaluations of the inversion and the
reconstruction together (a guided evaluation is one batched call; the backward passes of
optimising methods are not counted). ``seconds`` is their wall time. Every registered
inverter takes part, plus plain reversed solvers (``ddim``, ``dpmpp_2m`` by default); a
method that refuses a task (a flow-only method on a VP process, an optimisation that needs
a float null condition) is recorded as skipped with its reason.

**Side by side**: diffusers' ``DDIMInverseScheduler`` then ``DDIMScheduler`` (configured
as a Stable Diffusion pipeline configures them: ``set_alpha_to_one=False``,
``clip_sample=False``, ``"leading"`` spacing) driven on the same guided model (epsilon from
our x0 at diffusers' integer timesteps, which are our DDPM times), at the same number of
steps, on the DDPM tasks.

**Tasks**: ``gmm-d64`` (an exact class-conditional Gaussian mixture, d = 64, DDPM-linear
process, 2 classes of 3 full-covariance components; data drawn exactly from class 1),
``gmm-d64-rf`` (the same mixture on the rectified-flow process, for flow inversions) and
``digits`` (the bundled class-conditional model on held-out digits with their labels) and
``digits-tokens`` (the caption-conditioned model on the same digits with their measured
captions; the one task where null-text inversion has a float null condition to optimise).
Guidance scales 1, 3 and 7.5; steps 10, 20, 50; float32 and float64, and for digits
``mixed``: the float32 network driving float64 latents (the network's input is cast to
float32 and its output back), which keeps exact schemes exact without a float64 network.

Records (JSON lines, :mod:`.runner`): ``{"library", "method", "task", "nfe", "cfg",
"dtype", "recon_error", "seconds", "nfe_used"}`` (``nfe`` is the number of steps;
``seconds`` also sits in ``timing``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distributed import open_store, run_jobs_distributed
from .runner import Job

__all__ = [
    "BENCH",
    "KEY_FIELDS",
    "FULL",
    "QUICK",
    "TASKS",
    "known_methods",
    "check_methods",
    "run_inversion",
    "markdown_report",
    "plot_results",
    "edit_data",
    "edit_conds",
    "edit_scores",
    "edit_panels",
]

BENCH = "inversion"
KEY_FIELDS = ("bench", "phase", "task", "library", "method", "nfe", "cfg", "dtype")
TASKS = ("gmm-d64", "gmm-d64-rf", "digits", "digits-tokens")
#: reversed solvers run besides the registered inverters
EXTRA_SOLVERS = ("ddim", "dpmpp_2m")
#: dtype name -> (network dtype, state dtype); "mixed" = a float32 network driving float64
#: latents (the network input is cast to float32 and its output back), digits only
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "mixed": (torch.float32, torch.float64),
}

FULL: dict[str, Any] = dict(
    tasks=list(TASKS),
    cfgs=[1.0, 3.0, 7.5],
    steps=[10, 20, 50],
    dtypes=["float32", "float64", "mixed"],
    n_gmm=64,
    n_digits=16,
    diffusers=True,
    edit_tasks=["3to8", "thin2thick"],
    edit_models=["digits-tokens", "digits"],
    edit_methods=None,
    n_edit=16,
    edit_steps=50,
)
#: ``--quick``: guidance 3, 10 steps; the GMM tasks in both dtypes, 2 digits with a
#: float32 network (float32 and float64 latents; the caption model in float32 only); the
#: editing phase with direct inversion and prompt-to-prompt on 4 digits at 20 steps
QUICK: dict[str, Any] = dict(
    FULL,
    cfgs=[3.0],
    steps=[10],
    n_gmm=32,
    n_digits=2,
    quick_dtypes={"digits": ["float32", "mixed"], "digits-tokens": ["float32"]},
    edit_models=["digits-tokens"],
    edit_methods=["direct", "p2p"],
    n_edit=4,
    edit_steps=20,
)


# ----------------------------------------------------------------------------- methods
def known_methods() -> list[str]:
    """The registered inverters, then :data:`EXTRA_SOLVERS` (reversed solvers; the generic
    reversed-solver inverter itself is not listed twice)."""
    from ..inversion import INVERTERS, list_inverters
    from ..inversion.reverse import SolverInversion

    # the generic reversed-solver inverter runs as the named solvers of EXTRA_SOLVERS
    names = [n for n in list_inverters() if INVERTERS[n] is not SolverInversion]
    return names + [s for s in EXTRA_SOLVERS if s not in names]


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """``methods`` (default: :func:`known_methods`); a name may also be any deterministic
    solver. ``ValueError`` for unknown names."""
    if methods is None:
        return known_methods()
    from ..inversion import get_inverter

    for m in methods:
        get_inverter(m)  # raises a clear ValueError for an unknown name
    return list(dict.fromkeys(methods))


# ----------------------------------------------------------------------------- tasks
class _Counter:
    """Counts forward calls of a denoiser's ``denoise`` (patched on the instance)."""

    def __init__(self, target: Any) -> None:
        self.calls = 0
        inner = target.denoise

        def denoise(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            self.calls += 1
            return inner(x, t, cond)

        target.denoise = denoise


class _Task:
    """A task's data, condition and guided models (built once per dtype)."""

    def __init__(self, name: str, dtypes: tuple, n_gmm: int, n_digits: int) -> None:
        self.name = name
        net, dtype = dtypes
        if name.startswith("gmm"):
            from ..models.analytic import ClassConditionalMixture
            from ..process import ddpm, rectified_flow

            process = rectified_flow() if name.endswith("-rf") else ddpm()
            self.base = ClassConditionalMixture.random(64, 2, 3, process=process, seed=0)
            gen = torch.Generator().manual_seed(1)
            self.x = self.base.sample(n_gmm, 1, generator=gen).to(dtype)
            self.cond = torch.ones(n_gmm, dtype=torch.long)
            self.counter = _Counter(self.base)
            self.null = self.base.null_cond
        else:
            from ..models import load
            from ..models.attributes import captions
            from ..models.data import load_digits

            self.base = load(name, dtype=net)
            images, labels = load_digits("test")
            self.x = images[:n_digits].to(dtype)
            self.cond = labels[:n_digits].to(torch.long)
            if name == "digits-tokens":  # each digit's own caption
                self.cond = captions(images[:n_digits], labels[:n_digits])
            self.counter = _Counter(self.base.model)
            self.null = None
        self.ddpm = self.base.process.name.startswith("ddpm")

    def guided(self, scale: float) -> Any:
        from ..guidance import classifier_free

        return classifier_free(self.base, scale, null_cond=self.null)


def _rel_error(rec: Tensor, x: Tensor) -> tuple[float, float]:
    err = (rec.to(torch.float64) - x.to(torch.float64)).flatten(1).norm(dim=1)
    rel = err / x.to(torch.float64).flatten(1).norm(dim=1).clamp_min(1e-300)
    return float(rel.mean()), float(rel.max())


def _ours(task: _Task, method: str, steps: int, scale: float) -> dict[str, Any]:
    from ..inversion import invert, reconstruct

    model = task.guided(scale)
    task.counter.calls = 0
    start = time.perf_counter()
    try:
        inv = invert(model, task.x, steps, method, cond=task.cond, progress=False)
    except (ValueError, TypeError) as e:
        return {"skipped": str(e).splitlines()[0]}
    with torch.no_grad():
        rec = reconstruct(model, inv, progress=False)
    seconds = time.perf_counter() - start
    mean, worst = _rel_error(rec, task.x)
    return _result(mean, worst, seconds, task.counter.calls)


def _result(mean: float, worst: float, seconds: float, calls: int) -> dict[str, Any]:
    finite = math.isfinite(mean)
    return {
        "recon_error": mean if finite else None,
        "recon_error_max": worst if finite else None,
        "failed": None if finite else "non-finite reconstruction",
        "seconds": round(seconds, 4),
        "nfe_used": calls,
        "timing": {"seconds": seconds},
    }


def _diffusers_ddim(task: _Task, steps: int, scale: float) -> dict[str, Any]:
    """diffusers' DDIMInverseScheduler + DDIMScheduler round trip on the same model."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from .diffusers_runner import DDPM_LINEAR

    config = dict(DDPM_LINEAR, clip_sample=False, set_alpha_to_one=False)
    inverse, forward = DDIMInverseScheduler(**config), DDIMScheduler(**config)
    inverse.set_timesteps(steps)
    forward.set_timesteps(steps)
    model, process = task.guided(scale), task.base.process

    def eps(x: Tensor, t: Any) -> Tensor:
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, s = float(process.alpha(tt)), float(process.sigma(tt))
        return (x - a * model(x, tt, task.cond)) / s

    task.counter.calls = 0
    start = time.perf_counter()
    with torch.no_grad():
        z = task.x.clone()
        for t in inverse.timesteps:
            z = inverse.step(eps(z, t), t, z).prev_sample
        for t in forward.timesteps:
            z = forward.step(eps(z, t), t, z).prev_sample
    seconds = time.perf_counter() - start
    mean, worst = _rel_error(z, task.x)
    return _result(mean, worst, seconds, task.counter.calls)


# ----------------------------------------------------------------------------- editing
#: editing tasks on held-out digits: (source class or None, what changes)
EDIT_TASKS = {
    "3to8": "threes into eights, keeping thickness, slant and position",
    "thin2thick": "thin digits made thick, keeping their class",
}
#: pixels this far (in pixels) outside the source digit's ink box count as "unchanged"
EDIT_MARGIN = 1
#: ink above this level (in [0, 1]) marks the digit
INK_LEVEL = 0.25


def edit_data(task: str, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` held-out digits of the task (threes; thin digits of any class)."""
    from ..models.attributes import attribute_bins
    from ..models.data import load_digits

    images, labels = load_digits("heldout")
    if task == "3to8":
        keep = labels == 3
    else:
        keep = attribute_bins(images, labels)[:, 0] == 0  # the thin tercile of its class
    idx = torch.nonzero(keep).flatten()[:n]
    return images[idx], labels[idx]


def edit_conds(task: str, model_name: str, images: Tensor, labels: Tensor) -> tuple:
    """Source and target conditions (captions for the token model, labels otherwise) and
    the target class and thickness bin (``None`` where the edit does not set them)."""
    from ..models.attributes import ATTRIBUTE_WORDS, DIGIT_WORDS, captions

    if model_name == "digits":
        if task != "3to8":
            return None
        return labels.clone(), torch.full_like(labels, 8), 8, None
    src = captions(images, labels)
    if task == "3to8":
        tgt = [c.replace(DIGIT_WORDS[3], DIGIT_WORDS[8]) for c in src]
        return src, tgt, 8, None
    thin, thick = ATTRIBUTE_WORDS["thickness"][0], ATTRIBUTE_WORDS["thickness"][2]
    tgt = [c.replace(thin, thick, 1) for c in src]
    return src, tgt, None, 2


def _outside_mask(images: Tensor, margin: int = EDIT_MARGIN) -> Tensor:
    """``[B, 1, H, W]`` True outside the source digit's ink box grown by ``margin`` pixels:
    pixels an edit that keeps position and size has no need to change."""
    ink = (images + 1) / 2 > INK_LEVEL
    b, _, h, w = images.shape
    mask = torch.ones_like(images, dtype=torch.bool)
    for i in range(b):
        rows = torch.nonzero(ink[i, 0].any(1)).flatten()
        cols = torch.nonzero(ink[i, 0].any(0)).flatten()
        if len(rows) == 0:
            continue
        r0, r1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, h)
        c0, c1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, w)
        mask[i, 0, r0:r1, c0:c1] = False
    return mask


def edit_scores(
    edited: Tensor,
    source: Tensor,
    labels: Tensor,
    target_class: int | None,
    target_thickness: int | None,
) -> dict[str, Any]:
    """Target accuracy and preservation of edits.

    * ``target_accuracy``: the share of edits the bundled classifier labels
      ``target_class`` (class edits), or whose measured thickness falls in the requested
      tercile of their class (attribute edits);
    * ``class_kept`` (attribute edits): the share still classified as their source class;
    * ``attributes_kept`` (class edits): the share of the other attributes (thickness,
      slant, size) whose tercile under the target class equals the source's under its own;
    * ``psnr_outside``: PSNR to the source on pixels outside the source digit's ink box
      (grown by :data:`EDIT_MARGIN`), which an edit keeping position and size leaves alone;
    * ``feature_distance``: the mean L2 distance between the classifier's 64-d features of
      edit and source (class edits also get ``feature_distance_baseline``: the distance from
      each source to the mean feature of the held-out digits of the target class, for
      scale).
    """
    from ..models.attributes import attribute_bins
    from ..models.bundled import load_classifier
    from ..models.data import load_digits
    from ..models.digits_metric import digits_features

    x = edited.detach().to(torch.float32).clamp(-1, 1)
    src = source.to(torch.float32)
    with torch.no_grad():
        pred = load_classifier()(x, 0.0).argmax(1)
    out: dict[str, Any] = {}
    if target_class is not None:
        out["target_accuracy"] = float((pred == target_class).double().mean())
        before = attribute_bins(src, labels)
        after = attribute_bins(x, torch.full_like(labels, target_class))
        out["attributes_kept"] = float((before == after).double().mean())
    else:
        after = attribute_bins(x, labels)
        out["target_accuracy"] = float((after[:, 0] == target_thickness).double().mean())
        out["class_kept"] = float((pred == labels).double().mean())
    mask = _outside_mask(src)
    se = ((x - src) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    out["psnr_outside"] = float((10 * torch.log10(4.0 / se.clamp_min(1e-12))).mean())
    f_edit, f_src = digits_features(x), digits_features(src)
    out["feature_distance"] = float((f_edit - f_src).norm(dim=1).mean())
    if target_class is not None:
        images, lab = load_digits("heldout")
        f_tgt = digits_features(images[lab == target_class]).mean(0)
        out["feature_distance_baseline"] = float((f_src - f_tgt).norm(dim=1).mean())
    return out


def _edit_job(
    task: str, model_name: str, method: str, n: int, steps: int, cache: dict
) -> dict[str, Any]:
    from ..edit import edit
    from ..models import load

    key = (task, model_name)
    if key not in cache:
        images, labels = edit_data(task, n)
        conds = edit_conds(task, model_name, images, labels)
        cache[key] = (load(model_name), images, labels, conds)
    model, images, labels, conds = cache[key]
    if conds is None:
        return {"skipped": f"{model_name} has no condition for {task}"}
    source, target, target_class, target_thick = conds
    start = time.perf_counter()
    try:
        edited = edit(model, images, source=source, target=target, method=method, steps=steps)
    except (ValueError, TypeError) as e:
        return {"skipped": str(e).splitlines()[0]}
    seconds = time.perf_counter() - start
    if not torch.isfinite(edited).all():
        return {"failed": "non-finite edit", "seconds": round(seconds, 3)}
    scores = edit_scores(edited, images, labels, target_class, target_thick)
    cache[(task, model_name, method)] = edited.detach().to(torch.float32)
    return dict(
        scores,
        seconds=round(seconds / len(images), 4),
        timing={"seconds": seconds},
        n=len(images),
    )


def _edit_jobs(opts: dict[str, Any], cache: dict) -> Iterator[Job]:
    from ..edit import list_methods

    methods = opts.get("edit_methods") or list_methods()
    for task in opts["edit_tasks"]:
        for model_name in opts["edit_models"]:
            if model_name == "digits" and task != "3to8":
                continue  # a label model has no thickness condition
            for m in methods:
                key = dict(
                    bench=BENCH,
                    phase="edit",
                    task=f"edit-{task}-{model_name}",
                    library="diffusolve",
                    method=m,
                    nfe=opts["edit_steps"],
                    cfg=None,
                    dtype="float32",
                )
                yield Job(
                    key,
                    lambda store, t=task, mn=model_name, m=m: _edit_job(
                        t, mn, m, opts["n_edit"], opts["edit_steps"], cache
                    ),
                    label=f"edit {task} {model_name} {m}",
                )


# ----------------------------------------------------------------------------- run
def _jobs(opts: dict[str, Any], methods: list[str], tasks: dict) -> Iterator[Job]:
    """Step counts outermost (fewest first), so an interrupted run has whole tables at the
    smaller counts; then task, dtype, guidance scale, method."""
    for steps in sorted(opts["steps"]):
        for name in opts["tasks"]:
            dtypes = opts["dtypes"]
            if opts.get("quick_dtypes") and name in opts["quick_dtypes"]:
                dtypes = opts["quick_dtypes"][name]
            if not name.startswith("digits"):  # an analytic model computes in float64 anyway
                dtypes = [d for d in dtypes if d != "mixed"]
            for dtype in dtypes:
                for scale in opts["cfgs"]:
                    yield from _task_jobs(opts, methods, tasks, name, dtype, scale, steps)


def _task_jobs(
    opts: dict[str, Any],
    methods: list[str],
    tasks: dict,
    name: str,
    dtype: str,
    scale: float,
    steps: int,
) -> Iterator[Job]:
    base = dict(bench=BENCH, phase="roundtrip", task=name, nfe=steps, cfg=scale, dtype=dtype)

    def task_of() -> _Task:
        key = (name, dtype)
        if key not in tasks:
            n = opts["n_digits"] if name.startswith("digits") else opts["n_gmm"]
            tasks[key] = _Task(name, DTYPES[dtype], opts["n_gmm"], n)
        return tasks[key]

    label = f"{name} {dtype} cfg={scale:g} steps={steps}"
    for m in methods:
        yield Job(
            dict(base, library="diffusolve", method=m),
            lambda store, m=m: _ours(task_of(), m, steps, scale),
            label=f"{label} {m}",
        )
    if opts["diffusers"] and not name.endswith("-rf"):
        yield Job(
            dict(base, library="diffusers", method="DDIMInverseScheduler"),
            lambda store: _diffusers_ddim(task_of(), steps, scale),
            label=f"{label} diffusers DDIM",
        )


def run_inversion(
    *,
    methods: Sequence[str] | None = None,
    records: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quick: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run the round-trip bench; returns ``{"meta", "records", "summary"}``.

    ``options`` override :data:`FULL` (or :data:`QUICK`): ``tasks``, ``cfgs``, ``steps``,
    ``dtypes``, ``n_gmm``, ``n_digits``, ``diffusers``.

    Example:
        >>> from diffusolve.bench.inversion import run_inversion
        >>> out = run_inversion(methods=["edict"], tasks=["gmm-d64"], cfgs=[3.0], steps=[5],
        ...                     dtypes=["float64"], n_gmm=4, diffusers=False, edit_tasks=[],
        ...                     progress=False)
        >>> out["records"][0]["recon_error"] < 1e-10
        True
    """
    opts = dict(QUICK if quick else FULL)
    unknown = set(options) - set(QUICK)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(FULL)}")
    opts.update(options)
    if "dtypes" in options:  # an explicit choice applies to every task
        opts["quick_dtypes"] = None
    bad = [t for t in opts["tasks"] if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    bad = [d for d in opts["dtypes"] if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype {bad[0]!r}; choose from {', '.join(DTYPES)}")
    methods = check_methods(methods)
    mode = "resume" if resume else ("overwrite" if overwrite else "new")
    config = {k: v for k, v in opts.items()}
    config["methods"] = methods
    store = open_store(records, bench=BENCH, key_fields=KEY_FIELDS, config=config, mode=mode)
    start = time.perf_counter()

    def show(job: Job, record: dict[str, Any], skipped: bool) -> None:
        if not progress:
            return
        if "skipped" in record:
            what = "n/a"
        elif record.get("phase") == "edit":
            what = "failed" if record.get("failed") else f"target {record['target_accuracy']:.2f}"
        elif record.get("recon_error") is None:
            what = "failed"
        else:
            what = f"{record['recon_error']:.3g}"
        tag = " (resumed)" if skipped else ""
        print(f"[{time.perf_counter() - start:7.1f}s] {job.label}: {what}{tag}", file=sys.stderr)

    edits: dict = {}

    def all_jobs() -> Iterator[Job]:
        yield from _jobs(opts, methods, {})
        yield from _edit_jobs(opts, edits)

    n_run, n_skipped = run_jobs_distributed(all_jobs(), store, on_record=show)
    recs = [r for r in store.records if r.get("phase") == "roundtrip"]
    edit_recs = [r for r in store.records if r.get("phase") == "edit"]
    return {
        "meta": dict(
            config,
            seconds=round(time.perf_counter() - start, 1),
            records=str(records) if records else None,
            records_run=n_run,
            records_resumed=n_skipped,
            torch=torch.__version__,
        ),
        "records": recs,
        "summary": _summary(recs),
        "edits": edit_recs,
        "_edited": edits,
    }


def _summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, dtype, cfg, steps): each method's error, skip or failure."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["task"], r["dtype"], r["cfg"], r["nfe"])
        row = rows.setdefault(
            key, dict(task=r["task"], dtype=r["dtype"], cfg=r["cfg"], nfe=r["nfe"], methods={})
        )
        name = r["method"] if r["library"] == "diffusolve" else f"diffusers {r['method']}"
        row["methods"][name] = {
            k: r.get(k) for k in ("recon_error", "recon_error_max", "nfe_used", "skipped", "failed")
        } | {"seconds": r.get("seconds")}
    return sorted(rows.values(), key=lambda r: (r["cfg"], r["nfe"]))


# ----------------------------------------------------------------------------- report
def _e(v: Any) -> str:
    return "--" if v is None else f"{v:.1e}"


def markdown_report(result: dict[str, Any]) -> str:
    """Markdown: one table per task and dtype (rows: guidance and steps; cells: mean
    relative round-trip error, and network evaluations)."""
    meta = result["meta"]
    lines = [
        "## diffusolve bench inversion",
        "",
        "Mean relative round-trip error |x_rec - x| / |x| (invert, then reconstruct under the "
        "same condition), with the network evaluations of both in brackets. n/a: the method "
        "refuses the task (reason in the records).",
        "",
    ]
    summary = result["summary"]
    groups: dict[tuple, list] = {}
    for row in summary:
        groups.setdefault((row["task"], row["dtype"]), []).append(row)
    for (task, dtype), rows in groups.items():
        names = list(dict.fromkeys(m for row in rows for m in row["methods"]))
        lines += [f"### {task}, {dtype}", ""]
        lines += ["| cfg | steps | " + " | ".join(names) + " |"]
        lines += ["|---|---|" + "---|" * len(names)]
        for row in rows:
            cells = []
            for m in names:
                v = row["methods"].get(m)
                if v is None:
                    cells.append("--")
                elif v.get("skipped"):
                    cells.append("n/a")
                elif v.get("recon_error") is None:
                    cells.append("failed")
                else:
                    cells.append(f"{_e(v['recon_error'])} ({v['nfe_used']})")
            lines.append(f"| {row['cfg']:g} | {row['nfe']} | " + " | ".join(cells) + " |")
        lines.append("")
    edits = result.get("edits") or []
    if edits:
        lines += [
            "### Editing on held-out digits",
            "",
            "target = share reaching the target (classifier: the target class; thickness: "
            "the requested tercile); kept = other attributes' terciles kept (class edits) or "
            "class kept (thickness edits); PSNR outside = PSNR to the source outside its "
            "ink box (+1 px); feature distance = classifier features, edit to source "
            "(in brackets, source to the mean target-class digit).",
            "",
            "| task | method | steps | n | target | kept | PSNR outside (dB) | feature distance "
            "| s/img |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in edits:
            if r.get("skipped") or r.get("failed"):
                why = "n/a" if r.get("skipped") else "failed"
                lines.append(
                    f"| {r['task']} | {r['method']} | {r['nfe']} | -- | {why} | -- | -- | -- | -- |"
                )
                continue
            kept = r.get("attributes_kept", r.get("class_kept"))
            base = r.get("feature_distance_baseline")
            dist = f"{r['feature_distance']:.2f}" + (f" ({base:.2f})" if base else "")
            lines.append(
                f"| {r['task']} | {r['method']} | {r['nfe']} | {r['n']} | "
                f"{r['target_accuracy']:.2f} | {kept:.2f} | {r['psnr_outside']:.1f} | {dist} "
                f"| {r['seconds']:.2f} |"
            )
        lines.append("")
    skipped = sorted(
        {
            (r["method"], r["skipped"])
            for r in result["records"] + edits
            if r.get("skipped") and r["library"] == "diffusolve"
        }
    )
    if skipped:
        lines += ["Skipped (the method's own refusal):", ""]
        lines += [f"- {m}: {why}" for m, why in skipped]
        lines.append("")
    lines.append(
        f"({meta['seconds']} s; {meta['records_run']} jobs run, {meta['records_resumed']} "
        f"resumed; torch {meta['torch']})"
    )
    return "\n".join(lines)


def plot_results(result: dict[str, Any], out: str | Path) -> list[Path]:
    """``out/inversion_<task>_<dtype>.png``: error against steps per method (cfg curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    groups: dict[tuple, list] = {}
    for r in result["records"]:
        if r.get("recon_error") is None or r["recon_error"] <= 0:
            continue
        groups.setdefault((r["task"], r["dtype"]), []).append(r)
    for (task, dtype), recs in groups.items():
        cfgs = sorted({r["cfg"] for r in recs})
        fig, axes = plt.subplots(1, len(cfgs), figsize=(4.5 * len(cfgs), 3.6), squeeze=False)
        for ax, scale in zip(axes[0], cfgs, strict=True):
            by: dict[str, list] = {}
            for r in recs:
                if r["cfg"] == scale:
                    name = r["method"] if r["library"] == "diffusolve" else "diffusers DDIM"
                    by.setdefault(name, []).append((r["nfe"], r["recon_error"]))
            for name, pts in sorted(by.items()):
                pts.sort()
                ax.loglog(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_title(f"{task} {dtype} cfg={scale:g}")
            ax.set_xlabel("steps")
            ax.set_ylabel("relative round-trip error")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        path = out / f"inversion_{task}_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    paths += edit_panels(result, out)
    return paths


def edit_panels(result: dict[str, Any], out: str | Path, n: int = 6) -> list[Path]:
    """``out/edit_<task>.png`` per editing task run in this invocation: a row per digit
    (at most ``n``); columns: the source, then each method's edit (methods in the order of
    the report)."""
    from ..images import save_grid

    edited = result.get("_edited") or {}
    paths = []
    tasks = [k for k in edited if len(k) == 2]
    for task, model_name in tasks:
        _, images, _, _ = edited[(task, model_name)]
        methods = [k[2] for k in edited if len(k) == 3 and k[:2] == (task, model_name)]
        if not methods:
            continue
        cols = [images[:n].to(torch.float32)] + [edited[(task, model_name, m)][:n] for m in methods]
        panel = torch.stack(cols, 1).flatten(0, 1)
        path = Path(out) / f"edit_{task}_{model_name}.png"
        save_grid(panel, path, nrow=len(cols), scale=3)
        paths.append(path)
    return paths
