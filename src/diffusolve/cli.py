"""The ``diffusolve`` command line: a thin argparse front end over the library.

Sub-commands: ``solvers``, ``sample``, ``demo``, ``bench``, ``train``. Heavy imports are
made inside the handlers so that ``diffusolve --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _cmd_solvers(args: argparse.Namespace) -> int:
    from .solvers.table import solver_table

    print(solver_table(markdown=args.markdown))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sample_cli import run_sample

    return run_sample(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        out=args.out, quick=args.quick, progress=not args.no_progress and sys.stderr.isatty()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusolve",
        description="Training-free diffusion algorithms, checked against exact references.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("solvers", help="list the registered solvers")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=_cmd_solvers)

    p = sub.add_parser("sample", help="sample from a model and save an image grid")
    p.add_argument(
        "--model", default="digits", help="'digits' (bundled) or a local diffusers folder"
    )
    p.add_argument("--solver", default="dpmpp_2m", help="solver name (see `diffusolve solvers`)")
    p.add_argument("--steps", type=int, default=20, help="number of grid steps")
    p.add_argument("--grid", default=None, help="grid kind (default: the solver's natural grid)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed (per-sample seeds seed, seed+1, ...)")
    p.add_argument(
        "--out", default="grid.png", help="output PNG (refuses to overwrite without --force)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("demo", help="the main job: a tour of the library on the bundled model")
    p.add_argument("--out", default="diffusolve-demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer samples (for tests)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks against exact references and other libraries")
    bsub = p.add_subparsers(dest="bench_command")
    try:
        from .bench.cli import register as register_bench

        register_bench(bsub)
    except ImportError as exc:  # pragma: no cover - only while the bench is missing
        p.set_defaults(func=lambda a, exc=exc: _missing("bench", exc))

    p = sub.add_parser("train", help="train the bundled models")
    tsub = p.add_subparsers(dest="train_command")
    try:
        from .train.cli import register as register_train

        register_train(tsub)
    except ImportError as exc:  # pragma: no cover
        p.set_defaults(func=lambda a, exc=exc: _missing("train", exc))
    return parser


def _missing(what: str, exc: Exception) -> int:
    print(f"diffusolve {what} is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    func = getattr(args, "func", None)
    if func is None:
        # a group without a sub-command: print its help
        if args.command in ("bench", "train"):
            parser.parse_args([args.command, "--help"])
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"diffusolve: error: {exc}", file=sys.stderr)
        return 2
