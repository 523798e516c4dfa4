"""``diffusolve restore``: restore an image with a posterior sampler and a diffusion prior.

The input image is read with Pillow (greyscale for a single-channel model), mapped from
[0, 255] to the model's [-1, 1] and, when its size differs from the model's, resized
(bilinear) with a note on stderr. It is degraded with a named task's operator
(:data:`diffusolve.inverse.tasks.IMAGE_TASKS`) and Gaussian noise of std ``--sigma-y``; or
``--measurement FILE`` gives the measurement ``y`` directly. A posterior sampler
(:data:`diffusolve.inverse.samplers.SAMPLERS`) then draws ``--samples`` restorations.

Seeds: the measurement noise draws from seed ``--seed``, posterior sample ``i`` (0, 1, ...)
from seed ``--seed + 1 + i``, so a run repeats exactly and the noise of the measurement is
never the starting noise of a sample. ``--task-seed`` fixes the random parts of the task
(the random-pixel mask, the sensing matrix); a ``--measurement`` must be made with the same.

Everything that can be wrong with the arguments (method, task, options, output paths, the
method's needs against the task's operator, the input or measurement) is checked before
the sampler runs. No heavy imports at module level: ``diffusolve --help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from .inverse.base import Operator

__all__ = [
    "add_parser",
    "run_restore",
    "parse_options",
    "read_image",
    "load_measurement",
    "measurement_image",
    "psnr",
    "MEASUREMENT_SUFFIXES",
]

#: files ``--measurement`` reads and ``--save-measurement`` writes as raw ``y``
MEASUREMENT_SUFFIXES = (".npy", ".pt")
#: ``--save-measurement`` shows ``A^+ y`` when the operator's condition number is at most this
PINV_CONDITION = 100.0


# ---------------------------------------------------------------------------- helpers
def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB ``[N]`` of ``x`` (clamped to [-1, 1], as saved) against ``ref``
    for images in [-1, 1] (peak-to-peak ``data_range = 2``); ``inf`` for identical images.

    Example:
        >>> import torch
        >>> round(float(psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.2))[0]), 2)
        20.0
    """
    import torch

    x = x.detach().to(torch.float64).clamp(-1, 1)
    ref = ref.detach().to(torch.float64)
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def read_image(
    path: str | Path, shape: tuple[int, ...], flag: str = "--input"
) -> tuple[Tensor, str | None]:
    """The image at ``path`` as ``[1, C, H, W]`` float32 in [-1, 1] for a model of per-sample
    ``shape`` ``(C, H, W)`` (C = 1: greyscale, C = 3: RGB), and a note when it was resized
    (else None)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    c, h, w = shape
    if c not in (1, 3):
        raise ValueError(f"{flag} needs a model with 1 or 3 channels; this one has {c}")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB")
            note = None
            if img.size != (w, h):
                note = (
                    f"note: resized {flag} {path.name} from {img.size[0]}x{img.size[1]} to the "
                    f"model's {w}x{h} (bilinear)"
                )
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except UnidentifiedImageError:
        raise ValueError(f"{flag} {path}: not an image Pillow can read") from None
    x = torch.from_numpy(arr.copy()).reshape(h, w, c).permute(2, 0, 1)[None]
    return x / 127.5 - 1.0, note


def load_measurement(path: str | Path, operator: Operator, task: str) -> Tensor:
    """``y`` ``[1, *operator.out_shape]`` (float64) from a ``.npy`` or ``.pt`` file holding
    a tensor of the measurement shape, with or without a batch dimension of 1."""
    import numpy as np
    import torch

    path = Path(path).expanduser()
    if path.suffix.lower() not in MEASUREMENT_SUFFIXES:
        raise ValueError(
            f"--measurement {path}: expected a {' or '.join(MEASUREMENT_SUFFIXES)} file"
        )
    if not path.is_file():
        raise ValueError(f"--measurement {path}: no such file")
    try:
        if path.suffix.lower() == ".npy":
            y = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            y = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ValueError(f"--measurement {path}: cannot read it ({exc})") from None
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"--measurement {path}: holds a {type(y).__name__}, not a tensor")
    want = tuple(operator.out_shape)
    if tuple(y.shape) == want:
        y = y[None]
    if tuple(y.shape) != (1, *want):
        raise ValueError(
            f"--measurement {path} has shape {tuple(y.shape)}; task {task} on "
            f"{tuple(operator.in_shape)} images measures shape {want} (or {(1, *want)} with "
            "the batch dimension)"
        )
    if y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"--measurement {path}: expected real numbers, got dtype {y.dtype}")
    y = y.to(torch.float64)
    if not torch.isfinite(y).all():
        raise ValueError(f"--measurement {path}: holds non-finite values")
    return y


def measurement_image(operator: Operator, y: Tensor) -> tuple[Tensor, str]:
    """The measurement ``y`` shown in image space, and what it is.

    * ``A^+ y``, the pseudo-inverse (the least-norm image with ``A x`` closest to ``y``),
      when the operator has one and it is well conditioned (singular values within a factor
      :data:`PINV_CONDITION`): inpainting (hidden pixels at 0, mid-grey), ``sr4`` (4x4
      blocks), ``cs25``;
    * else ``y`` itself when it has the image's shape (``deblur``: the blurred image; its
      pseudo-inverse would amplify the noise by up to 1/s_min);
    * else ``A^T y``.

    Example:
        >>> import torch
        >>> from diffusolve.inverse.tasks import make_task
        >>> op = make_task("deblur", (1, 8, 8))
        >>> measurement_image(op, op(torch.zeros(1, 1, 8, 8)))[1]
        'y'
    """
    caps = operator.capabilities
    if "pinv" in caps:
        s = operator.svd().s if operator.has_svd else None
        if s is None or float(s.max()) <= PINV_CONDITION * float(s.min()):
            return operator.pinv(y), "A^+ y"
    if tuple(operator.out_shape) == tuple(operator.in_shape) and not operator.complex_output:
        return y, "y"
    return operator.At(y), "A^T y"


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["eta=0.5", "steps_inner=3", "clip=false"]`` -> ``{"eta": 0.5, "steps_inner": 3,
    "clip": False}`` (bool, int, float, ``none``, else the text).

    Example:
        >>> parse_options(["eta=0.5", "lambda-=7", "flag=true"])
        {'eta': 0.5, 'lambda_': 7, 'flag': True}
    """
    from .sample_cli import _value

    opts: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option takes KEY=VALUE (e.g. eta=0.5), got {item!r}")
        opts[key] = _value(text)
    return opts


def _sampler(method: str, items: list[str] | None) -> Any:
    from .inverse.samplers import get_sampler

    sampler = get_sampler(method)  # unknown name: ValueError listing the registered ones
    opts = parse_options(items)
    if not opts:
        return sampler
    try:
        return sampler.replace(**opts)
    except TypeError as err:
        raise ValueError(f"bad --option for {sampler.name}: {err}") from None


def _sigma(text: str) -> float:
    """argparse type of ``--sigma-y``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (the measurement noise std), got {text!r}"
        )
    return value


# ---------------------------------------------------------------------------- --list
def list_text(shape: tuple[int, ...] = (1, 16, 16)) -> str:
    """The text of ``diffusolve restore --list``: methods with their needs and options, tasks
    with their descriptions, and which method runs which task (on images of ``shape``)."""
    from .inverse.samplers import SAMPLERS, get_sampler
    from .inverse.tasks import IMAGE_TASKS, make_task

    names = sorted(SAMPLERS)
    tasks = sorted(IMAGE_TASKS)
    operators = {task: make_task(task, shape) for task in tasks}
    refused: dict[str, list[str]] = {task: [] for task in tasks}
    for name in names:
        for task, op in operators.items():
            try:
                get_sampler(name).check(op)
            except (NotImplementedError, TypeError):
                refused[task].append(name)
    width = max(len(n) for n in names)
    lines = ["methods (--method; what they need from the operator; the tasks they run; options):"]
    for name in names:
        s = get_sampler(name)
        needs = ", ".join(s.needs + ((s.requires,) if s.requires else ())) or "-"
        runs = [task for task in tasks if name not in refused[task]]
        runs_text = "every task" if len(runs) == len(tasks) else ", ".join(runs) or "no task"
        opts = ", ".join(f"{k}={v}" for k, v in s.options().items()) or "-"
        lines.append(f"  {name:<{width}}  needs {needs}; runs {runs_text}; options {opts}")
    twidth = max(len(t) for t in tasks)
    lines += ["", f"tasks (--task; on {shape[0]}x{shape[1]}x{shape[2]} images):"]
    for task in tasks:
        desc = IMAGE_TASKS[task][0]
        runs = "every method" if not refused[task] else f"not {', '.join(refused[task])}"
        shape_y = tuple(operators[task].out_shape)
        lines.append(f"  {task:<{twidth}}  {desc}; measures {shape_y}; {runs}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``restore`` to the ``diffusolve`` sub-parsers (the handler is set by the caller)."""
    p = sub.add_parser(
        "restore",
        help="restore a degraded image with a posterior sampler (inpainting, SR, deblurring, ...)",
        description="Degrade --input with a task's operator and Gaussian noise of std "
        "--sigma-y (or read the measurement from --measurement) and draw posterior samples "
        "with --method, the model as prior (unconditional: a class-conditional model gets "
        "its null class). `diffusolve restore --list` shows methods and tasks.",
    )
    p.add_argument("--list", action="store_true", help="list methods and tasks, then exit")
    p.add_argument(
        "--model",
        default="digits",
        help="'digits' (bundled) or a local diffusers folder, e.g. from `diffusolve train digits`",
    )
    p.add_argument("--task", default="inpaint-box", help="task name (see --list)")
    p.add_argument("--method", default=None, help="posterior sampler (see --list; default pigdm)")
    p.add_argument(
        "--input",
        default=None,
        help="the clean image (read as greyscale for a one-channel model, mapped to [-1, 1], "
        "resized to the model's size with a note); degraded by the task unless --measurement",
    )
    p.add_argument(
        "--measurement",
        default=None,
        metavar="FILE",
        help="the measurement y (.npy or .pt) of the task's measurement shape, with or without "
        "a batch dimension of 1; --input is then optional (used only for PSNR)",
    )
    p.add_argument(
        "--sigma-y",
        type=_sigma,
        default=0.05,
        help="measurement noise std in [-1, 1] units: the noise added to --input, and what "
        "the method assumes (default 0.05)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the measurement noise draws from seed SEED, posterior sample i from SEED + 1 + i",
    )
    p.add_argument(
        "--task-seed",
        type=int,
        default=0,
        help="seed of the task's random parts (random-pixel mask, sensing matrix; default 0)",
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 100)")
    p.add_argument(
        "--boundary",
        default=None,
        metavar="FILE",
        help="restore from the shared starting state searched by `diffusolve boundary` "
        "(its sampler, options and steps come from FILE; deterministic, one sample)",
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="sampler option, repeatable (e.g. eta=0.5, zeta=1.0; --list shows each "
        "method's); values are read as bool, int, float or text",
    )
    p.add_argument(
        "--samples", type=int, default=1, help="posterior samples to draw (saved as a grid)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of the sampler state (the network keeps its own, float32 for digits)",
    )
    p.add_argument(
        "--out",
        default="restored.png",
        help="output image: the restoration at the model's size, or a grid of --samples "
        "(refuses to overwrite without --force)",
    )
    p.add_argument(
        "--save-measurement",
        default=None,
        metavar="PATH",
        help="also save the measurement: an image (.png, ...) shows it in image space (the "
        "pseudo-inverse A^+ y: hidden pixels grey for inpainting, 4x4 blocks for sr4, the "
        "least-norm image for cs25; deblur shows y, the blurred image); .npy or .pt saves y "
        "itself, for --measurement",
    )
    p.add_argument(
        "--scale", type=int, default=1, help="enlarge the saved images K times (nearest)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out and --save-measurement")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.boundary is not None:
        given = [
            f
            for f, v in (
                ("--method", args.method),
                ("--steps", args.steps),
                ("--option", args.option),
            )
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with --boundary: the sampler, its "
                "options and steps come from the boundary file"
            )
        if args.samples != 1:
            raise ValueError("--boundary restores deterministically: --samples must be 1")
        return
    args.method = "pigdm" if args.method is None else args.method
    args.steps = 100 if args.steps is None else args.steps
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    if args.scale < 1:
        raise ValueError(f"--scale must be at least 1, got {args.scale}")
    if args.input is None and args.measurement is None:
        raise ValueError(
            "give --input IMG (the image to degrade and restore) or --measurement FILE "
            "(a measurement y); see `diffusolve restore --help`"
        )


def _save_measurement_path(args: argparse.Namespace) -> Path | None:
    from ._paths import IMAGE_SUFFIXES, check_file_out

    if args.save_measurement is None:
        return None
    return check_file_out(
        args.save_measurement,
        force=args.force,
        suffixes=IMAGE_SUFFIXES + MEASUREMENT_SUFFIXES,
        flag="--save-measurement",
    )


def _save(images: Tensor, path: Path, scale: int) -> None:
    from .images import save_grid

    n = images.shape[0]
    save_grid(images, path, nrow=math.ceil(math.sqrt(n)), scale=scale, pad=0 if n == 1 else 1)


def run_restore(args: argparse.Namespace) -> int:
    if args.list:
        print(list_text())
        return 0
    import torch

    from ._paths import check_file_out
    from .inverse.noise import GaussianNoise
    from .inverse.tasks import IMAGE_TASKS, make_task
    from .loading import load
    from .sample_cli import DTYPES, sample_shape

    _check_args(args)
    out = check_file_out(args.out, force=args.force)
    meas_out = _save_measurement_path(args)
    if meas_out is not None and meas_out.resolve() == out.resolve():
        raise ValueError("--save-measurement and --out name the same file")
    boundary = None
    if args.boundary is not None:
        from .inverse.boundary import Boundary

        boundary = Boundary.load(args.boundary)
        sampler, args.steps = boundary.sampler(), boundary.steps
    else:
        sampler = _sampler(args.method, args.option)
    if args.task not in IMAGE_TASKS:
        raise ValueError(
            f"unknown task {args.task!r}; choose from {', '.join(sorted(IMAGE_TASKS))}"
        )
    model = load(args.model)
    shape = sample_shape(model)
    operator = make_task(args.task, shape, seed=args.task_seed)
    try:
        sampler.check(operator)
    except NotImplementedError as err:  # the method cannot use this task's operator
        raise ValueError(f"{err} (task {args.task}; `diffusolve restore --list`)") from None
    dtype = DTYPES[args.dtype]

    x = None
    if args.input is not None:
        x, note = read_image(args.input, shape)
        if note:
            print(note, file=sys.stderr)
    if args.measurement is not None:
        y = load_measurement(args.measurement, operator, args.task)
    else:
        y = GaussianNoise(args.sigma_y).sample(operator(x.to(torch.float64)), generator=[args.seed])

    if meas_out is not None:
        if meas_out.suffix.lower() == ".npy":
            import numpy as np

            np.save(meas_out, y.numpy())
            shown = "y"
        elif meas_out.suffix.lower() == ".pt":
            torch.save(y, meas_out)
            shown = "y"
        else:
            img, shown = measurement_image(operator, y)
            _save(img, meas_out, args.scale)

    n = args.samples
    ys = y.to(dtype).expand(n, *y.shape[1:]).contiguous()
    stats: dict[str, Any] = {}
    t1 = time.perf_counter()
    start = None
    if boundary is not None:
        if tuple(boundary.x_T.shape) != tuple(shape):
            raise ValueError(
                f"--boundary {args.boundary}: its starting state has shape "
                f"{tuple(boundary.x_T.shape)}, the model's samples {tuple(shape)}"
            )
        if boundary.process != str(getattr(model.process, "name", "")):
            raise ValueError(
                f"--boundary {args.boundary} was searched on process {boundary.process!r}, "
                f"the model's is {getattr(model.process, 'name', '?')!r}"
            )
        start = boundary.start(n).to(dtype)
    with torch.no_grad():
        restored = sampler.run(
            model,
            operator,
            ys,
            args.sigma_y,
            steps=args.steps,
            x=start,
            noise=list(range(args.seed + 1, args.seed + 1 + n)),
            dtype=dtype,
            progress=not args.no_progress and sys.stderr.isatty(),
            stats=stats,
        )
    seconds = time.perf_counter() - t1
    peak = float(restored.abs().max())
    if not peak <= 10.0:  # images live in [-1, 1]
        print(
            f"warning: the restorations reach |x| = {peak:.3g}, far outside the data range "
            "[-1, 1]: the sampler probably diverged (try more --steps, smaller step-size "
            "options, another --method or --dtype float64); the image shows them clipped",
            file=sys.stderr,
        )
    _save(restored, out, args.scale)

    parts = [
        f"{sampler.name} on {args.task} (sigma_y {args.sigma_y:g})",
        f"{stats.get('steps', args.steps)} steps",
        f"{stats.get('nfe')} NFE",
        f"{seconds:.1f} s",
    ]
    if x is not None:
        scores = psnr(restored, x)
        text = f"PSNR {float(scores.mean()):.2f} dB"
        if n > 1:
            mean_score = float(psnr(restored.mean(0, keepdim=True), x)[0])
            text += f" (mean of {n} samples; their average: {mean_score:.2f} dB)"
        base, what = measurement_image(operator, y)
        if tuple(base.shape) == tuple(x.shape):
            text += f", {what}: {float(psnr(base, x)[0]):.2f} dB"
        parts.append(text)
    written = f"wrote {out}" + (f" and {meas_out} ({shown})" if meas_out is not None else "")
    print(f"{written}: " + ", ".join(parts))
    return 0
