"""``diffusolve bench guidance``: guidance, composition and analysis against exact answers.

The bench is a list of **phases**, each produced by one module that knows its own area and
nothing about the others:

=====================  ====================================================================
module                 phases
=====================  ====================================================================
``guidance_digits``    ``digits``: FD-digits against target-class accuracy for every
                       guidance method over its scale, same solver and NFE
``guidance_compose``   ``compose`` (SW of OR / AND / product samples to exact targets, with
                       the noise floor), ``density`` (the Ito log-density estimator against
                       the exact noised GMM log-density), ``compose-digits`` ("3 OR 8",
                       "3 AND 8")
``guidance_analysis``  ``likelihood`` (probability-flow log-likelihood against the exact
                       GMM log-density), ``intrinsic-dim`` (estimated against true
                       dimension on low-rank mixtures), ``digits-analysis`` (bits per
                       dimension, per-class dimension, conservativity of the learned score)
``guidance_transfer``  ``transfer``: which attributes a filtered image prompt transfers
=====================  ====================================================================

A phase module exposes ``PHASES``, ``jobs(quick, seed)`` (runner jobs whose keys are
``bench, phase, task, method, setting``), ``tables(records)``, ``plots(records, out_dir)``
and ``goals(records)`` (the issue's goals: text, met or not, the measured figure). This
module runs the chosen phases on one resumable records file (:mod:`.runner`) and joins
their tables, plots and goals into one report.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .distributed import open_store, run_jobs_distributed
from .runner import Job

__all__ = ["BENCH", "KEY_FIELDS", "MODULES", "phase_owners", "run_guidance", "markdown_report"]

BENCH = "guidance"
KEY_FIELDS = ("bench", "phase", "task", "method", "setting")
#: the phase modules, in report order
MODULES = ("guidance_digits", "guidance_compose", "guidance_analysis", "guidance_transfer")


def _module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{name}")


def phase_owners() -> dict[str, str]:
    """Every phase name -> the module that produces it, in report order."""
    out: dict[str, str] = {}
    for name in MODULES:
        for phase in _module(name).PHASES:
            if phase in out:
                raise RuntimeError(f"phase {phase!r} is produced by {out[phase]} and {name}")
            out[phase] = name
    return out


def check_phases(selected: Sequence[str] | None) -> list[str]:
    """The phases to run (all when ``None``), or a ``ValueError`` naming the known ones."""
    known = phase_owners()
    if selected is None:
        return list(known)
    bad = [p for p in selected if p not in known]
    if bad:
        raise ValueError(f"unknown phase {bad[0]!r}; choose from {', '.join(known)}")
    return [p for p in known if p in set(selected)]


def run_guidance(
    *,
    phases: Sequence[str] | None = None,
    quick: bool = False,
    seed: int = 0,
    records: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen phases (all by default); returns ``{"meta", "records", "goals"}``.

    Every finished job is appended to ``records`` (JSONL) at once; ``resume=True`` skips
    the jobs already there (the configuration must match).
    """
    selected = check_phases(phases)
    owner = phase_owners()
    mode = "resume" if resume else ("overwrite" if overwrite else "new")
    config = {"quick": bool(quick), "seed": int(seed), "phases": selected}
    store = open_store(records, bench=BENCH, key_fields=KEY_FIELDS, config=config, mode=mode)
    start = time.perf_counter()
    modules = [m for m in MODULES if any(owner[p] == m for p in selected)]

    def all_jobs() -> Iterator[Job]:
        for name in modules:
            for job in _module(name).jobs(quick, seed):
                if job.key.get("phase") not in owner or owner[job.key["phase"]] != name:
                    raise RuntimeError(f"{name} made a job of another phase: {job.key}")
                if job.key["phase"] in selected:
                    yield job

    def show(job: Job, record: dict[str, Any], skipped: bool) -> None:
        if not progress:
            return
        k = job.key
        what = job.label or f"{k['phase']} {k['task']} {k['method']} {k['setting']}"
        tag = " (resumed)" if skipped else ""
        print(f"[{time.perf_counter() - start:7.1f}s] {what}{tag}", file=sys.stderr)

    run_jobs_distributed(all_jobs(), store, on_record=show)
    recs = list(store.records)
    goals: list[dict[str, Any]] = []
    for name in modules:
        mine = [r for r in recs if owner.get(r.get("phase")) == name]
        for text, met, figure in _module(name).goals(mine):
            goals.append({"module": name, "goal": text, "met": bool(met), "measured": figure})
    meta = {
        "bench": BENCH,
        "quick": bool(quick),
        "seed": int(seed),
        "phases": selected,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return {"meta": meta, "records": recs, "goals": goals}


def markdown_report(result: dict[str, Any]) -> str:
    """The goals first, then every phase module's tables."""
    meta = result["meta"]
    owner = phase_owners()
    lines = [
        f"# bench guidance{' (quick)' if meta['quick'] else ''}",
        "",
        f"seed {meta['seed']}; phases: {', '.join(meta['phases'])}",
        "",
        "## Goals",
        "",
        "| goal | met | measured |",
        "|---|---|---|",
    ]
    for g in result["goals"]:
        lines.append(f"| {g['goal']} | {'yes' if g['met'] else 'no'} | {g['measured']} |")
    for name in MODULES:
        mine = [r for r in result["records"] if owner.get(r.get("phase")) == name]
        if not mine:
            continue
        for title, table in _module(name).tables(mine):
            lines += ["", f"## {title}", "", table.rstrip()]
    return "\n".join(lines)


def plot_results(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every phase module's plots, written under ``out_dir``."""
    owner = phase_owners()
    paths: list[Path] = []
    for name in MODULES:
        mine = [r for r in result["records"] if owner.get(r.get("phase")) == name]
        if mine:
            paths += list(_module(name).plots(mine, Path(out_dir)))
    return paths
