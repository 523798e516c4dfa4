"""``diffusolve invert``, ``diffusolve reconstruct`` and ``diffusolve edit``.

``invert`` writes the inversion (latent, grid, the method's extra state, and what
``reconstruct`` needs to rebuild the model: its name, guidance scale and dtype) as one
safetensors file; ``reconstruct`` regenerates the image from it, under the same condition
(a reconstruction) or another one (``--label`` / ``--prompt``: an edit along the exact
path); ``edit`` inverts and regenerates in one go with an editing method.

A condition is ``--label N`` (class-conditional models such as ``digits``) or
``--prompt TEXT`` (token-conditioned models such as ``digits-tokens``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["add_parsers", "run_invert", "run_reconstruct", "run_edit", "guided_model"]

INVERSION_SUFFIXES = (".safetensors",)


def _guidance(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (1 = conditional, no guidance), got {text!r}"
        )
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="bundled model name or diffusers folder")
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=1.0,
        help="classifier-free guidance scale (1 = conditional model, the default)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _cond_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label", type=int, help=f"{what} class label (class-conditional models)")
    g.add_argument("--prompt", help=f"{what} caption (token-conditioned models)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``invert``, ``reconstruct`` and ``edit`` to the top-level sub-parsers."""
    p = sub.add_parser(
        "invert",
        help="invert an image to the noise that regenerates it (exact or accurate methods)",
        description=(
            "Invert IMG under a condition with an inversion method (see --list) and write the "
            "inversion as safetensors; `diffusolve reconstruct` regenerates it. Exact methods "
            "(edict, bdia, belm, direct, ddcm) reconstruct to rounding error in float64."
        ),
    )
    p.add_argument("--list", action="store_true", help="list the inversion methods, then exit")
    p.add_argument("--image", help="the image to invert (PNG etc.; resized to the model)")
    _cond_args(p, "the source")
    p.add_argument("--method", default="edict", help="inverter or deterministic solver name")
    p.add_argument("--steps", type=int, default=50, help="grid steps (default 50)")
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)"
    )
    p.add_argument("--out", default="latent.safetensors", help="inversion file (.safetensors)")
    _common(p)
    p.set_defaults(func=run_invert)

    p = sub.add_parser(
        "reconstruct",
        help="regenerate an image from `diffusolve invert`'s file (another condition: an edit)",
    )
    p.add_argument("--inversion", required=True, help="file written by `diffusolve invert`")
    _cond_args(p, "the target (default: the inversion's own)")
    p.add_argument("--out", default="reconstruction.png", help="output image")
    p.add_argument("--scale", type=int, default=8, help="pixel upscaling of the PNG")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_reconstruct)

    p = sub.add_parser(
        "edit",
        help="edit an image: invert under --source, regenerate under --target",
        description=(
            "diffusolve.edit: invert IMG under the source condition and regenerate it under "
            "the target with the method's preservation mechanism (see --list)."
        ),
    )
    p.add_argument("--list", action="store_true", help="list the editing methods, then exit")
    p.add_argument("--image", help="the image to edit")
    p.add_argument("--source", help="source condition: a caption, or a label for label models")
    p.add_argument("--target", help="target condition: a caption, or a label for label models")
    p.add_argument("--method", default="direct", help="editing method (see --list)")
    p.add_argument("--steps", type=int, default=50, help="grid steps (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)"
    )
    p.add_argument("--out", default="edited.png", help="output image")
    p.add_argument("--scale", type=int, default=8, help="pixel upscaling of the PNG")
    _common(p)
    p.set_defaults(func=run_edit)


def guided_model(name: str, guidance: float, dtype: Any) -> Any:
    """The model ``name`` with classifier-free guidance at ``guidance`` (1: none), as
    :func:`diffusolve.load` builds it (label and caption models know their null input)."""
    from .loading import load

    return load(name, guidance=None if guidance == 1.0 else guidance, dtype=dtype)


def _cond(args: argparse.Namespace, model: Any, *, default: Any = None) -> Any:
    from .models import LabelConditioned

    label, prompt = getattr(args, "label", None), getattr(args, "prompt", None)
    if label is None and prompt is None:
        return default
    inner = model
    while not isinstance(inner, LabelConditioned) and getattr(inner, "model", None) is not None:
        if hasattr(inner, "tokenizer"):
            break
        inner = inner.model
    if label is not None:
        if not isinstance(inner, LabelConditioned):
            raise ValueError("--label needs a class-conditional model; use --prompt for captions")
        inner.labels(label, 1, __import__("torch").device("cpu"))  # range check, clear error
        return label
    if isinstance(inner, LabelConditioned):
        raise ValueError("--prompt needs a token-conditioned model (e.g. digits-tokens)")
    return prompt


def _options(items: list[str] | None) -> dict[str, Any]:
    from .restore_cli import parse_options

    return parse_options(items)


def run_invert(args: argparse.Namespace) -> int:
    if args.list:
        from .inversion import INVERTERS, list_inverters

        for name in list_inverters():
            cls = INVERTERS[name]
            kind = "exact" if cls.exact else "accurate"
            print(f"{name:16s} {kind:8s} {cls.citation}")
        print("any deterministic solver (ddim, dpmpp_2m, ...) inverts on the reversed grid")
        return 0
    import torch

    from ._paths import check_file_out
    from .inversion import invert, reconstruct
    from .restore_cli import read_image
    from .sample_cli import DTYPES, sample_shape

    if args.image is None:
        raise ValueError("give --image IMG (the image to invert)")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    out = check_file_out(args.out, force=args.force, suffixes=INVERSION_SUFFIXES)
    dtype = DTYPES[args.dtype]
    model = guided_model(args.model, args.guidance, dtype)
    x, note = read_image(args.image, sample_shape(model), "--image")
    if note:
        print(note, file=sys.stderr)
    cond = _cond(args, model)
    options = _options(args.option)
    progress = not args.no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    inv = invert(
        model, x.to(dtype), args.steps, args.method, cond=cond, progress=progress, **options
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        rec = reconstruct(model, inv, progress=False)
    err = float((rec - x.to(dtype)).norm() / x.to(dtype).norm())
    inv.aux["cli"] = {"model": args.model, "guidance": args.guidance, "dtype": args.dtype}
    inv.save(out, force=args.force)
    print(
        f"wrote {out}: {inv.method.name} inversion, {args.steps} steps, {inv.nfe} NFE, "
        f"{seconds:.1f} s; round-trip relative error {err:.2e}"
    )
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from ._paths import check_file_out
    from .images import save_grid
    from .inversion import load_inversion, reconstruct
    from .sample_cli import DTYPES

    out = check_file_out(args.out, force=args.force)
    inv = load_inversion(args.inversion)
    meta = inv.aux.get("cli")
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(
            f"{args.inversion} was not written by `diffusolve invert` (no model recorded); "
            "reconstruct it in Python with diffusolve.inversion.reconstruct"
        )
    dtype = DTYPES[meta["dtype"]]
    model = guided_model(meta["model"], float(meta["guidance"]), dtype)
    cond = _cond(args, model, default=inv.cond)
    inv.latent = inv.latent.to(dtype)
    for key, value in list(inv.aux.items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            inv.aux[key] = value.to(dtype)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            inv.aux[key] = [v.to(dtype) if v.is_floating_point() else v for v in value]
    with torch.no_grad():
        img = reconstruct(
            model, inv, cond=cond, progress=not args.no_progress and sys.stderr.isatty()
        )
    save_grid(img, out, scale=args.scale, pad=0 if img.shape[0] == 1 else 1)
    print(f"wrote {out}: {inv.method.name} reconstruction under {cond!r}")
    return 0


def run_edit(args: argparse.Namespace) -> int:
    if args.list:
        from .edit.methods import EDIT_METHODS, list_methods

        for name in list_methods():
            cls = EDIT_METHODS[name]
            kind = "attention" if cls.needs_attention else "inversion"
            print(f"{name:14s} {kind:9s} guidance {cls.default_guidance:<4g} {cls.citation}")
        print("attention methods need a model with cross-attention (e.g. digits-tokens)")
        return 0
    from ._paths import check_file_out
    from .edit import edit
    from .images import save_grid
    from .models import LabelConditioned
    from .restore_cli import read_image
    from .sample_cli import DTYPES, sample_shape

    for flag in ("image", "source", "target"):
        if getattr(args, flag) is None:
            raise ValueError(f"give --{flag}; see `diffusolve edit --help`")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    out = check_file_out(args.out, force=args.force)
    dtype = DTYPES[args.dtype]
    from .models import load as load_model

    model = load_model(args.model, dtype=dtype)
    x, note = read_image(args.image, sample_shape(model), "--image")
    if note:
        print(note, file=sys.stderr)
    source, target = args.source, args.target
    if isinstance(model, LabelConditioned):
        try:
            source, target = int(source), int(target)
        except ValueError:
            raise ValueError(
                f"{args.model} is class-conditional: --source and --target must be labels"
            ) from None
    t0 = time.perf_counter()
    edited = edit(
        model,
        x.to(dtype),
        source=source,
        target=target,
        method=args.method,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        **_options(args.option),
    )
    save_grid(edited, out, scale=args.scale, pad=0)
    print(
        f"wrote {out}: {args.method} edit {args.source!r} -> {args.target!r}, {args.steps} "
        f"steps, {time.perf_counter() - t0:.1f} s"
    )
    return 0
