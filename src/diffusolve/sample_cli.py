"""``diffusolve sample``: sample a grid of images from the bundled model or a model folder.

Everything that can be wrong with the arguments (output path, counts, guidance scale,
solver and its options) is checked before the model runs. Randomness comes only from the
per-sample seeds ``seed, seed+1, ...``: the starting noise of sample ``i`` and every
stochastic step draw from seed ``seed + i``, so a run is reproducible and a sample does not
depend on ``--n``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "run_sample",
    "run_sample_shards",
    "generate",
    "sample_shape",
    "parse_solver_options",
    "divergence_warning",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
NET_DTYPES = {**DTYPES, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: images live in [-1, 1]; a result this many times larger has left the data range
DIVERGENCE_FACTOR = 10.0


def sample_shape(model: Any) -> tuple[int, ...]:
    """The per-sample shape of a diffusers-backed denoiser (from its UNet config)."""
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    inner = getattr(model, "model", None)
    if inner is not None and inner is not model:
        return sample_shape(inner)
    unet = getattr(model, "unet", None)
    if unet is None:
        raise ValueError("cannot tell the sample shape of this model; it has no UNet config")
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, *size)


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_solver_options(items: list[str] | None) -> dict[str, Any]:
    """``["eta=0.5", "lower_order_final=false"]`` -> ``{"eta": 0.5, "lower_order_final":
    False}`` (bool, int, float, ``none`` or else the string).

    Example:
        >>> parse_solver_options(["eta=0.5", "order=2", "lower_order_final=false", "variant=bh1"])
        {'eta': 0.5, 'order': 2, 'lower_order_final': False, 'variant': 'bh1'}
    """
    opts: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--solver-option takes KEY=VALUE (e.g. eta=0.5), got {item!r}")
        opts[key] = _value(text)
    return opts


def divergence_warning(x: Tensor, data_range: float = 1.0) -> str | None:
    """A warning when samples left the data range ``[-data_range, data_range]`` by an order
    of magnitude or more (a diverged solve), else None."""
    peak = float(x.detach().abs().max()) if x.numel() else 0.0
    if peak <= DIVERGENCE_FACTOR * data_range:
        return None
    return (
        f"warning: the samples reach |x| = {peak:.3g}, far outside the data range "
        f"[-{data_range:g}, {data_range:g}]: the solver probably diverged (try more --steps, "
        "another --solver, or --dtype float64); the image shows them clipped"
    )


def _solver(args: argparse.Namespace) -> Any:
    from .solvers import get_solver

    opts = parse_solver_options(getattr(args, "solver_option", None))
    try:
        return get_solver(args.solver, **opts)
    except TypeError as err:
        raise ValueError(f"bad --solver-option for {args.solver}: {err}") from None


def _check_args(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None:
        from .guidance import check_scale

        try:
            check_scale(args.guidance)
        except ValueError as err:
            raise ValueError(f"--guidance: {err}") from None


def load_model(args: argparse.Namespace) -> Any:
    """The model of ``--model`` with ``--guidance``, ``--net-dtype`` and ``--compile``."""
    from .loading import load

    net_dtype = NET_DTYPES[getattr(args, "net_dtype", None) or "float32"]
    return load(
        args.model,
        guidance=args.guidance,
        dtype=net_dtype,
        compile=bool(getattr(args, "compile", False)),
    )


def generate(args: argparse.Namespace) -> tuple[Tensor, dict[str, Any]]:
    """The samples ``[n, C, H, W]`` that ``diffusolve sample`` saves, and a summary."""
    from .models import LabelConditioned
    from .process import make_grid
    from .solvers import sample

    _check_args(args)
    solver = _solver(args)
    dtype = DTYPES[getattr(args, "dtype", None) or "float32"]
    grid_kind = args.grid or solver.natural_grid
    model = load_model(args)
    cond = None
    if isinstance(model, LabelConditioned):
        classes = model.num_classes
        if args.label is not None:
            if not 0 <= args.label < classes:
                raise ValueError(f"--label must be in [0, {classes - 1}], got {args.label}")
            cond = torch.full((args.n,), args.label, dtype=torch.long)
        else:
            cond = torch.arange(args.n) % classes  # every class in turn
    elif args.label is not None:
        raise ValueError(f"--label needs a class-conditional model; {args.model} is not one")
    grid = make_grid(model.process, args.steps, grid_kind)
    seeds = list(range(args.seed, args.seed + args.n))
    xT = model.process.prior_sample((args.n, *sample_shape(model)), noise=seeds, dtype=dtype)
    stats: dict[str, Any] = {}
    with torch.no_grad():
        x = sample(
            model,
            xT,
            grid,
            solver,
            cond=cond,
            noise=seeds,
            stats=stats,
            progress=sys.stderr.isatty(),
        )
    info = {"solver": solver.name, "grid": grid_kind, "nfe": stats.get("nfe"), "labels": cond}
    return x, info


def run_sample(args: argparse.Namespace) -> int:
    from ._paths import check_file_out
    from .images import save_grid

    if getattr(args, "shard_size", None) is not None:
        return run_sample_shards(args)
    out = check_file_out(args.out, force=args.force)
    x, info = generate(args)
    warning = divergence_warning(x)
    if warning:
        print(warning, file=sys.stderr)
    save_grid(x, out)
    nrow = math.ceil(math.sqrt(x.shape[0]))
    labels = "" if info["labels"] is None else f", labels {_describe(info['labels'], nrow)}"
    print(
        f"wrote {out}: {x.shape[0]} samples, solver {info['solver']} on its {info['grid']} "
        f"grid, {info['nfe']} model evaluations{labels}"
    )
    return 0


def _describe(labels: Tensor, nrow: int) -> str:
    values = labels.tolist()
    if len(set(values)) == 1:
        return str(values[0])
    return f"{values[0]}, {values[1]}, ... in reading order ({nrow} a row)"


def run_sample_shards(args: argparse.Namespace) -> int:
    """``diffusolve sample --shard-size K --out DIR``: ``--n`` samples as safetensors shards
    with ``DIR/manifest.json``, resumable, split over the ranks under ``torchrun``
    (:mod:`diffusolve.distributed`). Sample ``i`` has seed ``seed + i`` and, without
    ``--label``, class ``i % classes``, so the set does not depend on the world size."""
    from pathlib import Path

    from .distributed import init, sample_shards
    from .loading import load
    from .models import LabelConditioned

    _check_args(args)
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {args.shard_size}")
    batch = getattr(args, "batch_size", None)
    if batch is not None and batch < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch}")
    out = Path(args.out).expanduser()
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(
            f"--out {out} looks like an image; with --shard-size it is the folder for the "
            "shards and manifest.json (e.g. --out samples/)"
        )
    solver = _solver(args)
    dtype = DTYPES[getattr(args, "dtype", None) or "float32"]
    ctx = init()
    try:
        model = load(args.model, guidance=args.guidance)
        cond_of = None
        labels = "none"
        if isinstance(model, LabelConditioned):
            classes = model.num_classes
            if args.label is not None:
                if not 0 <= args.label < classes:
                    raise ValueError(f"--label must be in [0, {classes - 1}], got {args.label}")
                label = int(args.label)
                cond_of, labels = (lambda idx: torch.full_like(idx, label)), str(label)
            else:
                cond_of, labels = (lambda idx: idx % classes), f"i % {classes}"
        elif args.label is not None:
            raise ValueError(f"--label needs a class-conditional model; {args.model} is not one")
        config = {"model": str(args.model), "guidance": args.guidance, "labels": labels}
        shown = {"written": 0, "skipped": 0}

        def on_shard(shard: int, how: str) -> None:
            shown[how] += 1
            if sys.stderr.isatty():
                print(f"rank {ctx.rank}: shard {shard} {how}", file=sys.stderr)

        report = sample_shards(
            model,
            out,
            n=args.n,
            shape=sample_shape(model),
            steps=args.steps,
            solver=solver,
            seed=args.seed,
            shard_size=args.shard_size,
            batch_size=batch,
            cond_of=cond_of,
            dtype=dtype,
            grid_kind=args.grid,
            config=config,
            force=args.force,
            ctx=ctx,
            on_shard=on_shard,
        )
        if ctx.is_main:
            print(
                f"wrote {len(report.written)} shards, kept {len(report.skipped)} finished ones "
                f"({args.n} samples in shards of {args.shard_size}, {ctx.world} process"
                f"{'es' if ctx.world > 1 else ''}, solver {solver.name}) to {out}; "
                f"checksum {report.checksum}"
            )
    finally:
        if ctx.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
