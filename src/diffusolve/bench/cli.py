"""argparse wiring for ``diffusolve bench samplers`` and ``diffusolve bench overhead``.

The top-level CLI calls :func:`register` with its ``bench`` sub-parsers; each sub-command
stores a ``handler(args) -> int`` in ``args.handler``. Handlers check every argument and
output path before any work starts and report a bad one as a single ``error: ...`` line on
stderr (exit status 2); existing output files are replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "samplers_main", "overhead_main"]


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def register(subparsers: Any) -> None:
    """Add ``samplers`` and ``overhead`` to the ``bench`` sub-parsers."""
    from .samplers import FULL_NFES
    from .tasks import FULL_TASKS, REFERENCES, TASKS

    p = subparsers.add_parser(
        "samplers",
        help="accuracy of our solvers vs diffusers' schedulers against exact references",
        description=(
            "Gaussian-mixture tasks with exact probability-flow references (DDPM-linear VP, "
            "Stable Diffusion's scaled-linear betas and rectified flow; d=2, 32, 64) and the "
            "bundled digits UNet, every deterministic solver and diffusers scheduler in its "
            "best setting per NFE. Every finished run is appended to a JSONL records file "
            "(--records), so an interrupted run continues with --resume. Prints Markdown "
            "tables, writes JSON and PNG plots."
        ),
    )
    p.add_argument("--quick", action="store_true", help="small run (<2 min): 2 tasks, NFE 5 and 10")
    p.add_argument(
        "--json", metavar="PATH", help="write the full result as JSON (refused if PATH exists)"
    )
    p.add_argument(
        "--out", metavar="DIR", default="bench-out", help="plots and Markdown (default bench-out/)"
    )
    p.add_argument(
        "--records",
        metavar="PATH.jsonl",
        help="append every finished run (settings trials included) to this JSONL file as it "
        "finishes (default: --json's path with .jsonl, else DIR/samplers.jsonl)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --records: skip every run already there (same "
        "options required); replaces that run's --json",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite an existing --records and --json file"
    )
    p.add_argument(
        "--reference",
        choices=REFERENCES,
        default="zero",
        help="zero: exact probability-flow endpoint at sigma -> 0 (default); tmin: PF-ODE to "
        "t_min followed by the exact denoiser there",
    )
    p.add_argument(
        "--tasks",
        type=_csv,
        help=f"comma-separated tasks (default: {','.join(FULL_TASKS)}; known: {','.join(TASKS)})",
    )
    p.add_argument(
        "--nfe",
        type=_ints,
        help=f"comma-separated NFE budgets (default {','.join(map(str, FULL_NFES))})",
    )
    p.add_argument("--n-samples", type=int, help="samples per task (default 512, quick 128)")
    p.add_argument("--methods", type=_csv, help="our solvers (default: all deterministic)")
    p.add_argument("--schedulers", type=_csv, help="diffusers methods (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=samplers_main, handler=samplers_main)

    o = subparsers.add_parser(
        "overhead",
        help="per-step wall time of our sampling loop vs diffusers' step() loop",
        description=(
            "A trivial model (zeros) on a small tensor: per-step time of diffusolve.sample vs "
            "a diffusers scheduler loop for DDIM and DPM-Solver++ 2M (median of repeats), with "
            "a profile of our loop when it is slower."
        ),
    )
    o.add_argument(
        "--json", metavar="PATH", help="write the result as JSON (refused if PATH exists)"
    )
    o.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    o.add_argument("--steps", type=int, default=50, help="steps per run (default 50)")
    o.add_argument("--repeats", type=int, default=15, help="timed repeats (default 15)")
    o.add_argument("--profile", action="store_true", help="profile our loop even when it is faster")
    o.set_defaults(func=overhead_main, handler=overhead_main)


class UsageError(ValueError):
    """A bad argument or output path, reported as one line before any work starts."""


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def _check_file(path: Path, flag: str, *, force: bool, may_exist: bool = False) -> None:
    """An output file path: not a directory, parent not a file, not existing unless allowed."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    if path.exists() and not (force or may_exist):
        raise UsageError(f"{flag} {path} already exists; pass --force to overwrite it")


def _check_dir(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
            break


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {p}")


def records_path(args: argparse.Namespace) -> Path:
    """``--records``, else ``--json`` with suffix ``.jsonl``, else ``--out/samplers.jsonl``."""
    if args.records:
        return Path(args.records)
    if args.json:
        return Path(args.json).with_suffix(".jsonl")
    return Path(args.out) / "samplers.jsonl"


def _samplers_options(args: argparse.Namespace) -> dict[str, Any]:
    """Validated run options of ``bench samplers`` (raises :class:`UsageError`)."""
    from .samplers import FULL_NFES, QUICK_NFES, check_methods
    from .tasks import FULL_TASKS, QUICK_TASKS, check_tasks

    quick = bool(args.quick)
    tasks = (
        list(args.tasks) if args.tasks is not None else list(QUICK_TASKS if quick else FULL_TASKS)
    )
    if not tasks:
        raise UsageError("--tasks is empty; name at least one task")
    nfes = list(args.nfe) if args.nfe is not None else list(QUICK_NFES if quick else FULL_NFES)
    if not nfes:
        raise UsageError("--nfe is empty; give comma-separated positive integers, e.g. 5,10")
    for n in nfes:
        if n < 1:
            raise UsageError(f"--nfe budgets must be positive integers, got {n}")
    _positive("--n-samples", args.n_samples)
    n = args.n_samples or (128 if quick else 512)
    for flag, check in (
        ("--tasks", lambda: check_tasks(tasks)),
        ("--methods", lambda: check_methods(args.methods, None)),
        ("--schedulers", lambda: check_methods(None, args.schedulers)),
    ):
        try:
            check()
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    if args.resume and args.force:
        raise UsageError("--resume continues a run and --force starts it over; pass one of them")
    if args.json:
        _check_file(Path(args.json), "--json", force=args.force, may_exist=args.resume)
    _check_dir(Path(args.out), "--out")
    rec = records_path(args)
    _check_file(rec, "--records", force=True)  # existence is handled by --resume / --force
    if rec.exists() and not (args.resume or args.force):
        raise UsageError(
            f"records file {rec} already exists: pass --resume to continue that run or --force "
            "to start it over"
        )
    if args.json and rec.resolve() == Path(args.json).resolve():
        raise UsageError(f"--records and --json are the same file {rec}")
    return dict(
        tasks=tasks,
        nfes=nfes,
        n_samples=n,
        n_select=min(n, 32 if quick else 64),
        quick=quick,
        methods=args.methods,
        schedulers=args.schedulers,
        seed=args.seed,
        reference=args.reference,
        records=rec,
        resume=bool(args.resume),
        overwrite=bool(args.force),
    )


def samplers_main(args: argparse.Namespace) -> int:
    from .report import markdown_tables, plot_errors, summary_table
    from .samplers import run_bench

    try:
        opts = _samplers_options(args)
    except UsageError as e:
        return _error(str(e))
    try:
        result = run_bench(progress=not args.no_progress and sys.stderr.isatty(), **opts)
    except KeyboardInterrupt:
        _error(
            f"interrupted; the finished runs are in {opts['records']}: rerun the same command "
            "with --resume to continue"
        )
        return 130
    except (ValueError, FileExistsError) as e:
        return _error(str(e).splitlines()[0])
    meta = result["meta"]
    text = "\n".join(
        [
            "## diffusolve bench samplers",
            "",
            "Convention: " + result["convention"],
            "",
            markdown_tables(result),
            "### Summary: best rel_error per library (ratio < 1: diffusolve more accurate)",
            "",
            summary_table(result["summary"]),
            "",
            f"({meta['seconds']} s; {meta['records_run']} runs, {meta['records_resumed']} "
            f"resumed from {meta['records']}; skipped stochastic solvers: "
            f"{', '.join(meta['skipped_stochastic'])})",
        ]
    )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.md").write_text(text + "\n")
    for path in plot_errors(result, out):
        print(f"wrote {path}")
    _write_json(args.json, result)
    return 0


def overhead_main(args: argparse.Namespace) -> int:
    from .overhead import format_overhead, run_overhead

    try:
        _positive("--steps", args.steps)
        _positive("--repeats", args.repeats)
        if args.json:
            _check_file(Path(args.json), "--json", force=args.force)
    except UsageError as e:
        return _error(str(e))
    result = run_overhead(steps=args.steps, repeats=args.repeats, force_profile=args.profile)
    print(format_overhead(result))
    _write_json(args.json, result)
    return 0
