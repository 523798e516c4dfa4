"""argparse wiring for ``diffusolve bench samplers``, ``bench overhead`` and ``bench inverse``.

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

__all__ = ["register", "samplers_main", "overhead_main", "inverse_main", "inversion_main"]


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _ints_or_none(text: str) -> list[int] | str:
    """Comma-separated integers, or the word ``none``."""
    return "none" if text.strip().lower() == "none" else _ints(text)


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
            "best setting per NFE, and every searched schedule (shipped, or --schedules) on "
            "the tasks of its process at its own NFE, with its search cost and whether the "
            "bench's data was held out from its search. FD-digits on the digits task. Every "
            "finished run is appended to a JSONL records file (--records), so an interrupted "
            "run continues with --resume. Prints Markdown tables, writes JSON and PNG plots."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run (a few minutes): 2 tasks, NFE 5 and 10, 128 samples, fewer settings",
    )
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
    p.add_argument(
        "--schedules",
        type=_csv,
        help="searched schedules run as methods searched:<name>: shipped names or schedule "
        "files (.json from `diffusolve search`), comma-separated, or 'none' (default: every "
        "shipped schedule); each runs on the tasks of its process at its own NFE",
    )
    p.add_argument(
        "--fd-samples",
        type=int,
        help="FD-digits samples per method and NFE on digits-unet (default 1000, quick 300; "
        "0: no FD-digits)",
    )
    p.add_argument(
        "--fd-only",
        type=_csv,
        help="samplers benched by FD-digits alone on digits-unet (no probability-flow "
        "reference applies): ddpm, sde_dpmpp_2m, dpmpp_2s_ancestral, si_sde, dmcmc, dpm_ot, "
        "dpm_ot_ddpm, "
        "comma-separated, or 'none' (default: all of them when FD-digits is measured)",
    )
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
    _register_inverse(subparsers)
    _register_inversion(subparsers)
    _register_guidance(subparsers)
    _register_accel(subparsers)
    _register_devices(subparsers)


def _floats(text: str) -> list[float]:
    try:
        return [float(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _register_inversion(subparsers: Any) -> None:
    from .inversion import FULL, TASKS

    p = subparsers.add_parser(
        "inversion",
        help="round-trip error of every inversion method, with diffusers' DDIM inversion",
        description=(
            "Every registered inverter (and reversed ddim / dpmpp_2m) inverts data and "
            "regenerates it: an exact class-conditional Gaussian mixture (d=64, DDPM and "
            "rectified flow) and held-out digits with the bundled model, at classifier-free "
            "guidance 1, 3 and 7.5, 10, 20 and 50 steps, float32 and float64; relative L2 "
            "round-trip error, seconds, network evaluations. diffusers' DDIMInverseScheduler "
            "+ DDIMScheduler run on the same models at the same steps. Every finished job is "
            "appended to a JSONL records file (--records); --resume continues. Writes "
            "DIR/inversion.md and DIR/inversion_<task>_<dtype>.png."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: guidance 3, 10 steps, the GMM tasks in both dtypes, 2 digits with "
        "the float32 networks (float32 and mixed latents), direct and P2P edits on 4 digits",
    )
    p.add_argument("--out", metavar="DIR", default="bench-out", help="report and plots")
    p.add_argument("--records", metavar="PATH.jsonl", help="default DIR/inversion.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --records")
    p.add_argument("--force", action="store_true", help="start over: overwrite outputs")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--methods", type=_csv, help="inverters or solvers (default: every inverter)")
    p.add_argument("--tasks", type=_csv, help=f"round-trip tasks among {_join(TASKS)}, or 'none'")
    p.add_argument("--cfg", type=_floats, help=f"guidance scales (default {_join(FULL['cfgs'])})")
    p.add_argument("--steps", type=_ints, help=f"step counts (default {_join(FULL['steps'])})")
    p.add_argument("--dtypes", type=_csv, help="float32,float64 (default both)")
    p.add_argument("--n-gmm", type=int, help=f"GMM samples (default {FULL['n_gmm']})")
    p.add_argument("--n-digits", type=int, help=f"held-out digits (default {FULL['n_digits']})")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' DDIM inversion")
    p.add_argument(
        "--edit-tasks",
        type=_csv,
        help="editing tasks among 3to8,thin2thick, or 'none' (default both)",
    )
    p.add_argument(
        "--edit-models", type=_csv, help="models for the edits (default digits-tokens,digits)"
    )
    p.add_argument("--edit-methods", type=_csv, help="edit methods (default: every registered)")
    p.add_argument("--n-edit", type=int, help="held-out digits per editing task (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no per-job progress lines")
    p.set_defaults(func=inversion_main, handler=inversion_main)


def _inversion_options(args: argparse.Namespace) -> dict[str, Any]:
    from .inversion import DTYPES, TASKS, check_methods

    opts: dict[str, Any] = {"quick": bool(args.quick)}
    try:
        opts["methods"] = check_methods(args.methods)
    except ValueError as e:
        raise UsageError(f"--methods: {str(e).splitlines()[0]}") from None
    if args.tasks == ["none"]:  # the editing phase alone
        args.tasks = None
        opts["tasks"] = []
    for flag, key, value, known in (
        ("--tasks", "tasks", args.tasks, TASKS),
        ("--dtypes", "dtypes", args.dtypes, tuple(DTYPES)),
    ):
        if value is not None:
            bad = [v for v in value if v not in known]
            if not value or bad:
                raise UsageError(f"{flag}: choose from {_join(known)}")
            opts[key] = list(value)
    if args.cfg is not None:
        if not args.cfg or min(args.cfg) < 0:
            raise UsageError(f"--cfg must be numbers >= 0, got {args.cfg}")
        opts["cfgs"] = list(args.cfg)
    if args.steps is not None:
        if not args.steps or min(args.steps) < 1:
            raise UsageError(f"--steps must be positive integers, got {args.steps}")
        opts["steps"] = list(args.steps)
    for flag, key, value in (
        ("--n-gmm", "n_gmm", args.n_gmm),
        ("--n-digits", "n_digits", args.n_digits),
    ):
        _positive(flag, value)
        if value is not None:
            opts[key] = value
    if args.no_diffusers:
        opts["diffusers"] = False
    from ..edit import list_methods
    from .inversion import EDIT_TASKS

    if args.edit_tasks is not None:
        tasks = [] if args.edit_tasks == ["none"] else list(args.edit_tasks)
        bad = [t for t in tasks if t not in EDIT_TASKS]
        if bad:
            raise UsageError(f"--edit-tasks: choose from {_join(EDIT_TASKS)} or none")
        opts["edit_tasks"] = tasks
    if args.edit_models is not None:
        bad = [m for m in args.edit_models if m not in ("digits", "digits-tokens")]
        if bad or not args.edit_models:
            raise UsageError("--edit-models: choose from digits,digits-tokens")
        opts["edit_models"] = list(args.edit_models)
    if args.edit_methods is not None:
        bad = [m for m in args.edit_methods if m not in list_methods()]
        if bad or not args.edit_methods:
            raise UsageError(f"--edit-methods: choose from {_join(list_methods())}")
        opts["edit_methods"] = list(args.edit_methods)
    _positive("--n-edit", args.n_edit)
    if args.n_edit is not None:
        opts["n_edit"] = args.n_edit
    if args.resume and args.force:
        raise UsageError("--resume continues a run and --force starts it over; pass one of them")
    out = Path(args.out)
    _check_dir(out, "--out")
    report = out / "inversion.md"
    if report.exists() and not (args.force or args.resume):
        raise UsageError(f"report {report} already exists; pass --force to overwrite it")
    if args.json:
        _check_file(Path(args.json), "--json", force=args.force, may_exist=args.resume)
    rec = Path(args.records) if args.records else out / "inversion.jsonl"
    _check_file(rec, "--records", force=True)
    if rec.exists() and not (args.resume or args.force):
        raise UsageError(
            f"records file {rec} already exists: pass --resume to continue that run or --force "
            "to start it over"
        )
    opts.update(records=rec, resume=bool(args.resume), overwrite=bool(args.force))
    return opts


def inversion_main(args: argparse.Namespace) -> int:
    from .inversion import markdown_report, plot_results, run_inversion

    return _run_report_bench(
        args, "inversion", _inversion_options, run_inversion, markdown_report, plot_results
    )


def _register_guidance(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "guidance",
        help="guidance, composition and analysis against exact answers",
        description=(
            "Guidance on the bundled digits model (FD-digits against target-class accuracy "
            "for every guidance method over its scale, same solver and NFE, judged by an "
            "independent classifier); composition on Gaussian mixtures (SW of OR / AND / "
            "product samples to exact targets with the noise floor; the Ito log-density "
            "estimator against the exact noised log-density) and on digits ('3 OR 8', "
            "'3 AND 8'); analysis (probability-flow log-likelihood against the exact GMM "
            "log-density, intrinsic dimension on low-rank mixtures of known ranks, bits per "
            "dimension, per-class dimension and conservativity of the digits model); which "
            "attributes filtered image prompts transfer. Every finished job is appended to a "
            "JSONL records file (--records); --resume continues. Writes DIR/guidance.md and "
            "PNG plots."
        ),
    )
    _report_bench_args(p, "guidance", "under 3 minutes", "write the full result as JSON")
    p.add_argument(
        "--phases",
        type=_csv,
        help="phases to run (default all): digits, compose, density, compose-digits, "
        "likelihood, intrinsic-dim, digits-analysis, transfer",
    )
    p.set_defaults(func=guidance_main, handler=guidance_main)


def _report_bench_args(p: argparse.ArgumentParser, name: str, quick: str, json_help: str) -> None:
    """The options every records-and-report bench shares (``guidance``, ``accel``)."""
    p.add_argument("--quick", action="store_true", help=f"small run, {quick}")
    p.add_argument("--out", metavar="DIR", default="bench-out", help="report and plots")
    p.add_argument("--records", metavar="PATH.jsonl", help=f"default DIR/{name}.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --records")
    p.add_argument("--force", action="store_true", help="start over: overwrite outputs")
    p.add_argument("--json", metavar="PATH", help=json_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no per-job progress lines")


def _guidance_options(args: argparse.Namespace) -> dict[str, Any]:
    from .guidance import check_phases

    try:
        phases = check_phases(args.phases)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {"phases": phases, **_report_bench_run(args, "guidance")}


def _report_bench_run(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Check --out, --records (default DIR/<name>.jsonl) and --json before any work; the
    run options every records-and-report bench shares."""
    out = Path(args.out)
    _check_dir(out, "--out")
    rec = Path(args.records) if args.records else out / f"{name}.jsonl"
    _check_file(rec, "--records", force=args.force, may_exist=args.resume)
    if args.json:
        _check_file(Path(args.json), "--json", force=args.force, may_exist=args.resume)
        if rec.resolve() == Path(args.json).resolve():
            raise UsageError(f"--records and --json are the same file {rec}")
    return {
        "quick": bool(args.quick),
        "seed": int(args.seed),
        "records": rec,
        "resume": bool(args.resume),
        "overwrite": bool(args.force),
    }


def guidance_main(args: argparse.Namespace) -> int:
    from .guidance import markdown_report, plot_results, run_guidance

    return _run_report_bench(
        args, "guidance", _guidance_options, run_guidance, markdown_report, plot_results
    )


def _register_accel(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "accel",
        help="quantization, feature caching and few-step models against the float model",
        description=(
            "On the bundled digits model: the float baseline (dpmpp_2m, 20 steps), the "
            "teacher's best solver at NFE 5, 10, 50, post-training quantization (W8A8 "
            "uniform / PTQ4DM / TDAC calibration, W4A8, EDA-DM block reconstruction, the CPU "
            "int8 paths), feature caching (DeepCache, encoder "
            "propagation) and the few-step models at NFE 1, 2, 4: FD-digits with its noise "
            "floor, class agreement at CFG 2, CPU time per sample as a speed-up over the "
            "baseline measured in the same run, size on disk and peak memory. Every finished "
            "job is appended to a JSONL records file (--records); --resume continues. Writes "
            "DIR/accel.md, DIR/accel.json and DIR/accel_quality_speed.png."
        ),
    )
    _report_bench_args(p, "accel", "about 2 minutes", "the JSON summary (default DIR/accel.json)")
    p.add_argument(
        "--methods",
        type=_csv,
        help="methods to run (default all; the float baseline always runs): families teacher, "
        "quant, cache, fewstep or method names such as w8a8-tdac, deepcache-3, digits-lcm",
    )
    p.set_defaults(func=accel_main, handler=accel_main)


def _accel_options(args: argparse.Namespace) -> dict[str, Any]:
    from .accel import check_methods

    try:
        check_methods(args.methods)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.json = args.json or str(Path(args.out) / "accel.json")
    return {"methods": args.methods, **_report_bench_run(args, "accel")}


def accel_main(args: argparse.Namespace) -> int:
    from .accel import markdown_report, plot_results, run_accel

    return _run_report_bench(
        args, "accel", _accel_options, run_accel, markdown_report, plot_results
    )


def _register_devices(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "devices",
        help="throughput, loop overhead, bf16, torch.compile and CUDA-vs-CPU agreement",
        description=(
            "The bundled digits model at batch --batch: samples/s of the bare network for the "
            "solve's evaluations against the full sampling loop (overhead in percent), a "
            "bfloat16 network with a float32 state, torch.compile (--compile; first call "
            "reported separately) and a 64-d GMM sampler, on the CPU and on CUDA when "
            "present, with the CUDA-vs-CPU distance of the samples. Writes DIR/devices.json "
            "and DIR/devices.md (scripts/gpu_check.py runs this)."
        ),
    )
    from .devices import add_arguments, main

    add_arguments(p)
    p.set_defaults(func=main, handler=main)


def _register_inverse(subparsers: Any) -> None:
    from .inverse import FULL, QUICK

    p = subparsers.add_parser(
        "inverse",
        help="posterior samplers on exact Gaussian-mixture posteriors and digit restoration",
        description=(
            "Every registered posterior sampler on the MCGdiff Gaussian-mixture problems "
            "(d=8, 80, 800; dy=1, 2, 4; 20 random problems each; exact posterior) at 20 and 100 "
            "steps, scored by the sliced Wasserstein distance (1,000 directions) of 2,000 "
            "samples to 2,000 exact posterior samples next to its noise floor; and on "
            "held-out digits with the bundled model (inpaint-box, inpaint-random, sr4, deblur, "
            "cs25 at sigma_y 0.05: PSNR, SSIM, FD-digits, class agreement, seconds per image). "
            "Samplers with free options are tuned on separate problems (GMM: 3 tuning problems "
            "per (d, dy, steps) of 500 samples, the defaults and each option changed alone; "
            "images: 8 training digits, by PSNR), never on the reported ones. Every finished "
            "job is appended to a JSONL records file (--records), so an interrupted run "
            "continues with --resume. Writes DIR/inverse.md (Markdown tables), "
            "DIR/inverse_gmm_sw.png and DIR/inverse_panel_<task>.png. The full run is long (an "
            "estimated week on 2 cores, mostly MCGdiff and DAPS at d=800): run parts with "
            "--methods, --dims and --steps."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=(
            "small run: d=8 and 80, dy=1, 20 steps, 5 problems of "
            f"{QUICK['n_samples']} samples, one tuning problem of {QUICK['tune_samples']} "
            f"samples with at most {QUICK['max_candidates']} candidates (the defaults and the "
            "values next to them); inpaint-box and sr4 on "
            f"{QUICK['n_images']} digits with default options (no image tuning); about 2 "
            "minutes on 2 idle cores"
        ),
    )
    p.add_argument(
        "--out", metavar="DIR", default="bench-out", help="report and plots (default bench-out/)"
    )
    p.add_argument(
        "--records",
        metavar="PATH.jsonl",
        help="append every finished job (tuning runs included) to this JSONL file (default: "
        "--json's path with .jsonl, else DIR/inverse.jsonl)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --records (same options required); replaces that "
        "run's report and --json",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start over: overwrite existing --records, report (DIR/inverse.md) and --json",
    )
    p.add_argument(
        "--json", metavar="PATH", help="write the full result as JSON (refused if PATH exists)"
    )
    p.add_argument(
        "--merge",
        type=_csv,
        metavar="FILE[,FILE...]",
        help="records files of other runs of this bench to take finished jobs from: runs "
        "split by --methods, --dims, --dy, --steps, --problems or --image-tasks (for example "
        "on two cores or machines) with the same sample sizes; their jobs are added to "
        "--records and not run again",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the report of --records (when it exists) and --merge as "
        "they stand; a cell with fewer finished problems than --problems shows [k/N]",
    )
    p.add_argument("--methods", type=_csv, help="posterior samplers (default: every registered)")
    p.add_argument(
        "--dims",
        type=_ints_or_none,
        help=f"GMM dimensions among 8,80,800, 'none' for no GMM part (default "
        f"{_join(FULL['dims'])})",
    )
    p.add_argument(
        "--dy",
        type=_ints,
        help=f"measurement dimensions among 1,2,4 (default {_join(FULL['dys'])})",
    )
    p.add_argument("--steps", type=_ints, help=f"step counts (default {_join(FULL['steps'])})")
    p.add_argument(
        "--problems", type=int, help=f"GMM problems per (d, dy) (default {FULL['problems']})"
    )
    p.add_argument(
        "--n-samples",
        type=int,
        help=f"samples per method and problem (default {FULL['n_samples']}, quick "
        f"{QUICK['n_samples']})",
    )
    p.add_argument(
        "--image-tasks",
        type=_csv,
        help=f"image tasks, 'none' for no image part (default {_join(FULL['image_tasks'])})",
    )
    p.add_argument(
        "--n-images",
        type=int,
        help=f"held-out digits per image task (default {FULL['n_images']}, quick {QUICK['n_images']})",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-job progress lines")
    p.set_defaults(func=inverse_main, handler=inverse_main)


def _join(values: Any) -> str:
    return ",".join(map(str, values))


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
    from .samplers import FULL_NFES, QUICK_NFES, check_methods, load_searched
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
    schedules = None if args.schedules is None else list(args.schedules)
    if schedules == ["none"]:
        schedules = []
    elif schedules is not None and not schedules:
        raise UsageError("--schedules is empty; name schedules or pass 'none'")
    try:
        load_searched(schedules)
    except (ValueError, OSError) as e:
        raise UsageError(f"--schedules: {str(e).splitlines()[0]}") from None
    if args.fd_samples is not None and (args.fd_samples < 0 or args.fd_samples == 1):
        raise UsageError(f"--fd-samples must be 0 (none) or at least 2, got {args.fd_samples}")
    fd_only = None if args.fd_only is None else list(args.fd_only)
    if fd_only == ["none"]:
        fd_only = []
    elif fd_only is not None:
        from .samplers_fd import check_fd_only

        if not fd_only:
            raise UsageError("--fd-only is empty; name samplers or pass 'none'")
        try:
            check_fd_only(fd_only)
        except ValueError as e:
            raise UsageError(f"--fd-only: {e}") from None
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
        schedules=schedules,
        fd_samples=args.fd_samples,
        fd_only=fd_only,
    )


def samplers_main(args: argparse.Namespace) -> int:
    from .report import (
        fd_summary_table,
        markdown_tables,
        moonshot_table,
        plot_errors,
        searched_table,
        summary_table,
    )
    from .samplers import run_bench

    ctx = _ranks()
    try:
        opts = _samplers_options(args)
    except UsageError as e:
        return _error(str(e))
    ctx.barrier()  # every rank checked the outputs before rank 0 creates any
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
    if not ctx.is_main:
        return 0
    meta = result["meta"]
    parts = [
        "## diffusolve bench samplers",
        "",
        "Convention: " + result["convention"],
        "",
        markdown_tables(result),
        "### Summary: best rel_error per library (ratio < 1: diffusolve more accurate)",
        "",
        "ours (best) includes held-out searched schedules; ours fixed-schedule leaves them out.",
        "",
        summary_table(result["summary"]),
        "",
    ]
    for title, table in (
        (
            "### Searched schedules: gain (ratio > 1: the searched schedule is more accurate) "
            "and search cost",
            searched_table(result["summary"]),
        ),
        (
            "### FD-digits: best searched schedule, and our best method of any kind, vs the best "
            "fixed-schedule method",
            fd_summary_table(result["summary"]),
        ),
        (
            "### Ours at NFE 5 vs diffusers' best at NFE 10 (ratio < 1: ours more accurate "
            "with half the evaluations)",
            moonshot_table(result["moonshot"]),
        ),
    ):
        if table:
            parts += [title, "", table, ""]
    parts.append(
        f"({meta['seconds']} s; {meta['records_run']} runs, {meta['records_resumed']} "
        f"resumed from {meta['records']}; searched schedules: "
        f"{', '.join(s['name'] for s in meta.get('searched', [])) or 'none'}; stochastic "
        f"solvers have no rel_error (a probability-flow reference does not apply): "
        f"{', '.join(meta['skipped_stochastic'])}; benched by FD-digits alone: "
        f"{', '.join(meta.get('fd_only') or []) or 'none'})"
    )
    text = "\n".join(parts)
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


def _inverse_options(args: argparse.Namespace) -> dict[str, Any]:
    """Validated options of ``bench inverse`` (raises :class:`UsageError`)."""
    from ..inverse.tasks import IMAGE_TASKS
    from .inverse import FULL, QUICK, check_methods
    from .inverse_tasks import GMM_DIMS, GMM_DYS

    base = dict(QUICK if args.quick else FULL)
    for flag, value in (
        ("--problems", args.problems),
        ("--n-samples", args.n_samples),
        ("--n-images", args.n_images),
    ):
        _positive(flag, value)
    try:
        methods = check_methods(args.methods)
    except ValueError as e:
        raise UsageError(f"--methods: {e}") from None
    if not methods:
        raise UsageError("--methods is empty; name at least one posterior sampler")
    opts = dict(base, methods=methods, quick=bool(args.quick))
    for flag, key, known in (("--dims", "dims", GMM_DIMS), ("--dy", "dys", GMM_DYS)):
        value = getattr(args, key if key == "dims" else "dy")
        if value is not None:
            if value == "none":  # --dims none: no GMM part
                opts[key] = []
                continue
            if not value:
                raise UsageError(f"{flag} is empty; choose from {_join(known)}")
            bad = [v for v in value if v not in known]
            if bad:
                raise UsageError(f"{flag}: {bad[0]} is not one of {_join(known)}")
            opts[key] = list(value)
    if args.steps is not None:
        if not args.steps or min(args.steps) < 1:
            raise UsageError(f"--steps must be positive integers, got {args.steps}")
        opts["steps"] = list(args.steps)
    if args.problems is not None:
        opts["problems"] = args.problems
    if args.n_samples is not None:
        opts["n_samples"] = args.n_samples
        opts["tune_samples"] = min(opts["tune_samples"], args.n_samples)
    if args.n_images is not None:
        opts["n_images"] = args.n_images
    if args.image_tasks is not None:
        tasks = [] if args.image_tasks == ["none"] else list(args.image_tasks)
        bad = [t for t in tasks if t not in IMAGE_TASKS]
        if bad:
            raise UsageError(
                f"--image-tasks: unknown task {bad[0]!r}; choose from {_join(IMAGE_TASKS)} or none"
            )
        opts["image_tasks"] = tasks
    if args.resume and args.force:
        raise UsageError("--resume continues a run and --force starts it over; pass one of them")
    out = Path(args.out)
    _check_dir(out, "--out")
    report = out / "inverse.md"
    if report.exists() and not (args.force or args.resume):
        raise UsageError(f"report {report} already exists; pass --force to overwrite it")
    if args.json:
        _check_file(Path(args.json), "--json", force=args.force, may_exist=args.resume)
    rec = (
        Path(args.records)
        if args.records
        else (Path(args.json).with_suffix(".jsonl") if args.json else out / "inverse.jsonl")
    )
    _check_file(rec, "--records", force=True)
    merge = [Path(p) for p in (args.merge or [])]
    for p in merge:
        if not p.is_file():
            raise UsageError(f"--merge: {p} is not a file (give records files of other runs)")
        if p.resolve() == rec.resolve():
            raise UsageError(f"--merge: {p} is the --records file itself")
    if args.report_only:
        if not rec.exists() and not merge:
            raise UsageError(
                f"--report-only: records file {rec} does not exist and no --merge files were "
                "given; nothing to report"
            )
    elif rec.exists() and not (args.resume or args.force):
        raise UsageError(
            f"records file {rec} already exists: pass --resume to continue that run or --force "
            "to start it over"
        )
    if args.json and rec.resolve() == Path(args.json).resolve():
        raise UsageError(f"--records and --json are the same file {rec}")
    opts.update(
        records=rec,
        resume=bool(args.resume),
        overwrite=bool(args.force),
        merge=merge,
        report_only=bool(args.report_only),
    )
    return opts


def inverse_main(args: argparse.Namespace) -> int:
    from .inverse import markdown_report, plot_results, run_inverse

    return _run_report_bench(
        args, "inverse", _inverse_options, run_inverse, markdown_report, plot_results
    )


def _ranks() -> Any:
    """The process group under ``torchrun`` (initialised here), else rank 0 of 1."""
    from ..distributed import init

    return init()


def _run_report_bench(
    args: argparse.Namespace,
    name: str,
    options: Any,
    run: Any,
    report: Any,
    plots: Any,
) -> int:
    """The shared handler of the runner-based benches: validate the options, run (an
    interrupt keeps the records and says how to resume), then write ``DIR/<name>.md``,
    the plots and ``--json``. Under ``torchrun`` every rank runs its share of the jobs and
    rank 0 alone merges the records and writes the report."""
    ctx = _ranks()
    try:
        opts = options(args)
    except UsageError as e:
        return _error(str(e))
    ctx.barrier()  # every rank checked the outputs before rank 0 creates any
    try:
        result = run(progress=not args.no_progress, **opts)
    except KeyboardInterrupt:
        _error(
            f"interrupted; the finished jobs are in {opts['records']}: rerun the same command "
            "with --resume to continue"
        )
        return 130
    except (ValueError, FileExistsError) as e:
        return _error(str(e).splitlines()[0])
    if not ctx.is_main:
        return 0
    text = report(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    panels = plots(result, out)
    result.pop("_edited", None)  # edited images (bench inversion), not JSON
    print(f"wrote {out / f'{name}.md'}")
    for path in panels:
        print(f"wrote {path}")
    _write_json(args.json, result)
    return 0
