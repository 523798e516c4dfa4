"""The ``diffusolve`` command line: a thin argparse front end over the library.

Sub-commands: ``solvers``, ``sample``, ``restore``, ``demo``, ``bench``, ``train``. Heavy
imports (torch included) are made inside the handlers, and the ``bench`` sub-commands are
registered only when ``bench`` is asked for, so that ``diffusolve --help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "package_version"]


def _cmd_solvers(args: argparse.Namespace) -> int:
    import shutil

    from .solvers.table import solver_table

    if args.markdown:
        print(solver_table(markdown=True))
        return 0
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    print(solver_table(markdown=False, width=width))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sample_cli import run_sample

    return run_sample(args)


def _cmd_restore(args: argparse.Namespace) -> int:
    from .restore_cli import run_restore

    return run_restore(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        out=args.out,
        quick=args.quick,
        progress=not args.no_progress and sys.stderr.isatty(),
        force=args.force,
    )


def _scale(text: str) -> float:
    """argparse type of ``--guidance``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (0 = unconditional, 1 = conditional, > 1 = guided), "
            f"got {text!r}"
        )
    return value


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample from a model and save an image grid",
        description="Sample a grid of images. Without --label a class-conditional model "
        "cycles through its classes (0, 1, 2, ... in reading order). The time grid is the "
        "solver's natural grid (the `grid` column of `diffusolve solvers`), as in "
        "diffusolve.sample(model, x, steps, solver).",
    )
    p.add_argument(
        "--model",
        default="digits",
        help="'digits' (bundled) or a local diffusers folder, e.g. from `diffusolve train digits`",
    )
    p.add_argument("--solver", default="dpmpp_2m", help="solver name (see `diffusolve solvers`)")
    p.add_argument(
        "--solver-option",
        action="append",
        metavar="KEY=VALUE",
        help="solver option, repeatable (e.g. eta=0.5, lower_order_final=false; the preset "
        "column of `diffusolve solvers` shows each solver's); values are read as bool, int, "
        "float or text",
    )
    p.add_argument("--steps", type=int, default=20, help="number of grid steps")
    p.add_argument(
        "--grid",
        default=None,
        help="grid kind: logsnr, time_uniform, time_quadratic, karras (default: the solver's)",
    )
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument(
        "--label", type=int, default=None, help="class label (default: every class in turn)"
    )
    p.add_argument(
        "--guidance",
        type=_scale,
        default=None,
        help="classifier-free guidance scale s >= 0: x0 = x0_null + s (x0_label - x0_null); "
        "0 = unconditional, 1 = conditional, > 1 = guided (diffusers' guidance_scale)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of the solver state (the network keeps its own, float32 for digits)",
    )
    p.add_argument(
        "--net-dtype",
        choices=("float32", "float64", "bfloat16", "float16"),
        default="float32",
        help="dtype of the network's weights (bfloat16/float16: a half network; the solver "
        "state keeps --dtype and the x0 conversion runs in it)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the network through torch.compile (the first batch pays the compilation; "
        "falls back to eager with a warning when no compiler works)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="per-sample seeds seed, seed+1, ...: starting noise and stochastic steps",
    )
    p.add_argument(
        "--out", default="grid.png", help="output image (refuses to overwrite without --force)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="K",
        help="write the --n samples as safetensors shards of K samples into the folder --out "
        "with manifest.json (model, solver, options, seeds, shard ranges, checksums); "
        "rerunning the same command resumes (finished shards are verified and kept); runs "
        "unchanged under torchrun (shard s on rank s %% world, same samples for any world)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="with --shard-size: samples per network batch inside a shard (default: the shard)",
    )
    p.set_defaults(func=_cmd_sample)


def build_parser(*, bench: bool = True) -> argparse.ArgumentParser:
    """The ``diffusolve`` parser. With ``bench=False`` the ``bench`` group is a stub (its
    sub-commands import torch), which is what ``diffusolve --help`` uses."""
    parser = argparse.ArgumentParser(
        prog="diffusolve",
        description="Training-free diffusion algorithms, checked against exact references.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("solvers", help="list the registered solvers")
    p.add_argument(
        "--markdown", action="store_true", help="print the full Markdown table (as in README)"
    )
    p.set_defaults(func=_cmd_solvers)

    _add_sample(sub)

    from .restore_cli import add_parser as add_restore

    add_restore(sub).set_defaults(func=_cmd_restore)

    from .boundary_cli import add_parser as add_boundary

    add_boundary(sub)

    from .invert_cli import add_parsers as add_invert

    add_invert(sub)

    from .search_cli import add_parser as add_search

    add_search(sub)

    p = sub.add_parser("demo", help="the main job: a tour of the library on the bundled model")
    p.add_argument("--out", default="diffusolve-demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer samples (for tests)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--force", action="store_true", help="overwrite an earlier report and panels in --out"
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks against exact references and other libraries")
    bsub = p.add_subparsers(dest="bench_command")
    if bench:
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


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def package_version() -> str:
    """The installed distribution's version (package metadata), or ``diffusolve.__version__``
    when running from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusolve")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(bench=_command(argv) == "bench")
    args = parser.parse_args(argv)
    if args.version:
        print(f"diffusolve {package_version()}")
        return 0
    func = getattr(args, "func", None)
    if func is None:
        if args.command is None:
            parser.print_help()
            return 0
        # a group without a sub-command: its usage on stderr, exit status 2
        group = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        group.print_usage(sys.stderr)
        print(
            f"diffusolve {args.command}: error: a sub-command is required "
            f"(see `diffusolve {args.command} --help`)",
            file=sys.stderr,
        )
        return 2
    from ._alloc import keep_freed_memory

    keep_freed_memory()  # sampling loops reuse large blocks (see diffusolve._alloc)
    try:
        return int(func(args) or 0)
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"diffusolve: error: {exc}", file=sys.stderr)
        return 2
