"""argparse wiring for ``diffusolve bench samplers`` and ``diffusolve bench overhead``.

The top-level CLI calls :func:`register` with its ``bench`` sub-parsers; each sub-command
stores a ``handler(args) -> int`` in ``args.handler``.
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
    from .samplers import FULL_NFES, FULL_TASKS, TASKS

    p = subparsers.add_parser(
        "samplers",
        help="accuracy of our solvers vs diffusers' schedulers against exact references",
        description=(
            "Gaussian-mixture tasks with exact PF-ODE references (DDPM-linear VP and rectified "
            "flow, d=2 and d=64), every deterministic solver and diffusers scheduler in its "
            "best setting per NFE. Prints Markdown tables, writes JSON and PNG plots."
        ),
    )
    p.add_argument("--quick", action="store_true", help="small run (<2 min): 2 tasks, NFE 5 and 10")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument(
        "--out", metavar="DIR", default="bench-out", help="plots and Markdown (default bench-out/)"
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
    o.add_argument("--json", metavar="PATH", help="write the result as JSON")
    o.add_argument("--steps", type=int, default=50, help="steps per run (default 50)")
    o.add_argument("--repeats", type=int, default=15, help="timed repeats (default 15)")
    o.add_argument("--profile", action="store_true", help="profile our loop even when it is faster")
    o.set_defaults(func=overhead_main, handler=overhead_main)


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {p}")


def samplers_main(args: argparse.Namespace) -> int:
    from .report import markdown_tables, plot_errors, summary_table
    from .samplers import FULL_NFES, FULL_TASKS, QUICK_NFES, QUICK_TASKS, run_bench

    quick = bool(args.quick)
    tasks = args.tasks or (QUICK_TASKS if quick else FULL_TASKS)
    nfes = args.nfe or (QUICK_NFES if quick else FULL_NFES)
    n = args.n_samples or (128 if quick else 512)
    try:
        result = run_bench(
            tasks=tasks,
            nfes=nfes,
            n_samples=n,
            n_select=min(n, 32 if quick else 64),
            quick=quick,
            methods=args.methods,
            schedulers=args.schedulers,
            seed=args.seed,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
            f"({result['meta']['seconds']} s; skipped stochastic solvers: "
            f"{', '.join(result['meta']['skipped_stochastic'])})",
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

    result = run_overhead(steps=args.steps, repeats=args.repeats, force_profile=args.profile)
    print(format_overhead(result))
    _write_json(args.json, result)
    return 0
