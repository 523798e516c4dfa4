"""``diffusolve boundary``: search an optimal boundary condition (a shared starting state)
for a deterministic restoration sampler on the bundled digits model, and measure it on
held-out digits (:mod:`diffusolve.inverse.boundary`).

The reference set is the first ``--reference`` digits of the train split; the held-out
comparison uses the first ``--heldout`` digits of the held-out split, which the search never
sees. The model runs unconditionally (its null class), as in ``diffusolve restore``, which
restores from the written file with ``--boundary FILE``.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_parser", "run_boundary"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "boundary",
        help="search a shared starting noise for a restoration ODE (optimal boundary conditions)",
        description="Draw --candidates starting states, restore --reference train digits "
        "from each with a deterministic posterior sampler (default ddnm, eta=0), keep the "
        "one with the smallest mean squared error, write it (safetensors) and compare it on "
        "held-out digits with an independent noise per image and with random shared noise. "
        "Use the file with `diffusolve restore --boundary FILE`.",
    )
    p.add_argument("--model", default="digits", help="the bundled model (only 'digits')")
    p.add_argument("--task", default="sr4", help="restoration task (see `restore --list`)")
    p.add_argument("--method", default="ddnm", help="deterministic posterior sampler")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="sampler option, repeatable (default for ddnm and pigdm: eta=0)",
    )
    p.add_argument("--steps", type=_positive, default=10, help="sampler steps (default 10)")
    p.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise std")
    p.add_argument("--candidates", type=_positive, default=64, help="starting states tried")
    p.add_argument("--reference", type=_positive, default=32, help="train digits scored")
    p.add_argument("--heldout", type=_positive, default=256, help="held-out digits measured")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidates")
    p.add_argument("--out", default="boundary.safetensors", help="output file")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_boundary)
    return p


def run_boundary(args: argparse.Namespace) -> int:
    from ._paths import check_file_out
    from .inverse.boundary import evaluate_boundary, search_boundary
    from .inverse.tasks import IMAGE_TASKS, make_task
    from .loading import load
    from .models.data import load_digits
    from .restore_cli import parse_options
    from .sample_cli import sample_shape

    if args.model != "digits":
        raise ValueError(
            f"--model {args.model!r}: `diffusolve boundary` needs reference images, which only "
            "the bundled 'digits' model ships; for another model call "
            "diffusolve.inverse.boundary.search_boundary with your own images"
        )
    if args.task not in IMAGE_TASKS:
        raise ValueError(
            f"unknown task {args.task!r}; choose from {', '.join(sorted(IMAGE_TASKS))}"
        )
    if not args.sigma_y >= 0:
        raise ValueError(f"--sigma-y must be >= 0, got {args.sigma_y}")
    out = check_file_out(args.out, force=args.force, suffixes=(".safetensors",))
    options = parse_options(args.option) if args.option else None
    model = load(args.model)
    operator = make_task(args.task, sample_shape(model))
    train, _ = load_digits("train")
    held, _ = load_digits("heldout")
    if args.reference > len(train) or args.heldout > len(held):
        raise ValueError(
            f"--reference is at most {len(train)} and --heldout at most {len(held)} digits"
        )
    start = time.perf_counter()
    boundary = search_boundary(
        model,
        operator,
        train[: args.reference],
        args.sigma_y,
        method=args.method,
        options=options,
        steps=args.steps,
        candidates=args.candidates,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    boundary.save(out, force=args.force)
    res = evaluate_boundary(model, operator, held[: args.heldout], boundary, args.sigma_y)
    nfe = args.candidates * args.reference * args.steps
    print(
        f"wrote {out}: {boundary.method} on {args.task}, {args.steps} steps, best of "
        f"{args.candidates} starting states on {args.reference} train digits "
        f"({seconds:.0f} s, {nfe} image-evaluations)"
    )
    print(f"held-out PSNR over {args.heldout} digits:")
    for key, what in (
        ("boundary", "searched shared start"),
        ("shared_random", "random shared start (mean)"),
        ("independent", "independent noise per image"),
    ):
        print(f"  {what:30s} {res['psnr_' + key]:6.2f} dB  (MSE {res[key]:.4f})")
    return 0
