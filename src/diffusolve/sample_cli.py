"""``diffusolve sample``: sample a grid of images from the bundled or a local diffusers model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_sample", "sample_shape"]


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


def run_sample(args: argparse.Namespace) -> int:
    from .images import save_grid
    from .process import make_grid
    from .solvers import get_solver, sample
    from .solvers.noise import SeededNoise

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it or choose another --out")
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.model == "digits":
        from .models import load

        model = load("digits", guidance=args.guidance)
        label_count = 10
    else:
        from .guidance import ClassifierFreeGuidance
        from .models.diffusers_adapter import load_diffusers

        model = load_diffusers(args.model)
        label_count = getattr(getattr(model, "unet", None), "config", {}).get("num_class_embeds")
        if args.guidance is not None:
            if not label_count:
                raise ValueError("--guidance needs a class-conditional model (num_class_embeds)")
            model = ClassifierFreeGuidance(model, args.guidance, null_cond=label_count - 1)
    cond = None
    if args.label is not None:
        if not label_count:
            raise ValueError("--label needs a class-conditional model")
        if not 0 <= args.label < label_count:
            raise ValueError(f"--label must be in [0, {label_count - 1}], got {args.label}")
        cond = torch.full((args.n,), args.label, dtype=torch.long)
    elif label_count and args.model == "digits":
        cond = torch.arange(args.n) % 10
    solver = get_solver(args.solver)
    grid = make_grid(model.process, args.steps, args.grid or solver.natural_grid)
    shape = (args.n, *sample_shape(model))
    xT = model.process.prior_sample(shape, noise=SeededNoise(range(args.seed, args.seed + args.n)))
    stats: dict[str, Any] = {}
    with torch.no_grad():
        x = sample(model, xT, grid, solver, cond=cond, stats=stats, progress=True)
    save_grid(x, out)
    print(f"wrote {out}: {args.n} samples, solver {solver.name}, {stats['nfe']} model evaluations")
    return 0
